"""Loading, overriding, validating and saving :class:`~spo.config.schema.SPOConfig`.

A configuration is built in layers, each applied over the previous one:

1. the dataclass defaults (the SD-1.5 release values);
2. a preset (``presets/<name>.yaml``) or a user YAML file; a user file may name
   a starting point with a top-level ``preset: NAME`` key (a preset name, or a
   path to another YAML file relative to the file itself);
3. dotted command-line style overrides ``section.key=value``, in order, whose
   values are parsed with :func:`yaml.safe_load`.

Mappings are merged key by key: a YAML file only needs the values it changes.
Every value is type-checked (and, where harmless, coerced) against the field
annotations of the schema by pydantic (:mod:`spo.config.types`), unknown keys are rejected with suggestions, and the
result is checked by :func:`validate`.  All problems found are reported
together in one :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Hashable, Mapping, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from ..errors import SPOError
from ..files import atomic_write_text
from ..registry import BACKBONES, METHODS, RegistryError
from .schema import ObjectiveConfig, SPOConfig
from .types import TypeProblem, coerce
from .types import show as _show

__all__ = [
    "ConfigError",
    "available_presets",
    "load_config",
    "validate",
    "config_to_dict",
    "config_to_yaml",
    "save_config",
]

_PRESET_PACKAGE = "spo.config"
_PRESET_DIR = "presets"
_YAML_SUFFIXES = (".yaml", ".yml")


class ConfigError(SPOError, ValueError):
    """An invalid configuration: unknown key, wrong type or out-of-range value.

    Attributes:
        errors: The individual problems, one message each.  ``str(error)``
            is the single message, or all of them on one line when there are several
            (a command-line error is one ``error:`` line).
    """

    def __init__(self, errors: str | Sequence[str]) -> None:
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        if len(self.errors) == 1:
            message = self.errors[0]
        else:
            message = f"invalid configuration ({len(self.errors)} problems): " + "; ".join(self.errors)
        super().__init__(message)


# --------------------------------------------------------------------------- presets


def _preset_root() -> Any:
    return resources.files(_PRESET_PACKAGE).joinpath(_PRESET_DIR)


def available_presets() -> list[str]:
    """Return the names of the bundled presets (e.g. ``["sd15", "sdxl"]``), sorted."""
    root = _preset_root()
    names = [
        entry.name.rsplit(".", 1)[0]
        for entry in root.iterdir()
        if entry.is_file() and entry.name.endswith(_YAML_SUFFIXES)
    ]
    return sorted(names)


def _presets_hint() -> str:
    presets = available_presets()
    return "available presets: " + (", ".join(presets) if presets else "(none)") + (
        f" (each also as NAME{LOW_MEMORY_SUFFIX}: with the memory levers)" if presets else "")


# --------------------------------------------------------------------------- schema introspection


@lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of the dataclass ``cls``'s fields, in declaration order."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


@lru_cache(maxsize=None)
def _all_keys(cls: type = SPOConfig, prefix: str = "") -> tuple[str, ...]:
    """Every dotted key (sections and values) of the schema rooted at ``cls``."""
    keys: list[str] = []
    for name, tp in _field_types(cls).items():
        path = _join(prefix, name)
        keys.append(path)
        if tp is ObjectiveConfig:  # every method's settings
            keys.extend(dict.fromkeys(k for m in _method_configs().values() for k in _all_keys(m, path)))
        elif _is_section(tp):
            keys.extend(_all_keys(tp, path))
    return tuple(keys)


# --------------------------------------------------------------------------- the method's section


def _method_configs() -> dict[str, type]:
    """``objective.name`` -> the method's settings class, for every registered method."""
    return {name: METHODS.get(name).config_class for name in METHODS.names()}


def _select_method(config: SPOConfig, name: Any) -> None:
    """Make ``config.objective`` the settings of the method ``name``: a layer that names another
    method than the current one starts its section again from that method's defaults (an unknown
    name is reported once values are checked)."""
    if not isinstance(name, str) or name == config.objective.name or name not in METHODS:
        return
    config.objective = METHODS.get(name).config_class()


def _names_method(text: Any) -> bool:
    return isinstance(text, str) and text.split("=", 1)[0].strip() == "objective.name"


def _quote_list(items: Sequence[str]) -> str:
    quoted = [f"'{i}'" for i in items]
    if len(quoted) == 1:
        return quoted[0]
    return "one of " + ", ".join(quoted)


def _unknown_key_message(cls: type, key: str, prefix: str) -> str:
    """Message for ``key`` not being a field of section ``cls`` (at ``prefix``)."""
    full = _join(prefix, key)
    names = list(_field_types(cls))
    suggestions = [_join(prefix, m) for m in difflib.get_close_matches(key, names, n=3)]
    if not suggestions:
        # The right name in the wrong section (``pools.lr``), or a value key used
        # at the top level (``threshold``).
        suggestions = [k for k in _all_keys() if k.rsplit(".", 1)[-1] == key and k != full]
    if not suggestions:
        # A misspelt value key in the wrong place (``treshold`` at the top level).
        suggestions = [
            k for k in _all_keys()
            if difflib.get_close_matches(key, [k.rsplit(".", 1)[-1]], n=1, cutoff=0.8)
        ][:3]
    message = f"unknown config key '{full}'"
    if issubclass(cls, ObjectiveConfig):  # a setting of another method
        owners = [name for name, settings in _method_configs().items() if key in _field_types(settings)]
        if owners:
            return (f"{message}: it is not a setting of objective.name {cls.name!r} but of "
                    f"{_quote_list(owners)}; set objective.name first")
    if suggestions:
        return f"{message}; did you mean {_quote_list(suggestions)}?"
    where = f"section '{prefix}'" if prefix else "the top level"
    return f"{message}; valid keys in {where} are: {', '.join(names)}"


# --------------------------------------------------------------------------- applying layers


def _apply_mapping(
    section: Any, mapping: Mapping[Any, Any], prefix: str, errors: list[str], context: str
) -> None:
    """Merge ``mapping`` into the dataclass instance ``section`` in place.

    Problems are appended to ``errors`` (prefixed by ``context``); a value that
    fails its type check leaves the field unchanged.
    """
    types_ = _field_types(type(section))
    for key, value in mapping.items():
        if not isinstance(key, str):
            errors.append(f"{context}config keys must be strings, got {_show(key)} in "
                          f"{f'section {prefix!r}' if prefix else 'the top level'}")
            continue
        path = _join(prefix, key)
        if key not in types_:
            errors.append(context + _unknown_key_message(type(section), key, prefix))
            continue
        tp = types_[key]
        if _is_section(tp):
            if value is None:  # an empty section in YAML (``pools:`` with nothing below)
                continue
            if not isinstance(value, Mapping):
                errors.append(f"{context}config section '{path}' must be a mapping of keys "
                              f"to values, got {_show(value)}")
                continue
            if tp is ObjectiveConfig:
                _select_method(section, value.get("name"))
            _apply_mapping(getattr(section, key), value, path, errors, context)
            continue
        try:
            setattr(section, key, coerce(value, tp, path))
        except TypeProblem as exc:
            errors.extend(context + message for message in exc.messages)


def _apply_override(config: SPOConfig, text: str, errors: list[str]) -> None:
    """Apply one ``section.key=value`` override to ``config`` in place."""
    if not isinstance(text, str) or "=" not in text:
        errors.append(f"invalid override {text!r}: expected the form 'section.key=value', "
                      "e.g. 'pools.k=4' or 'objective.eps=null'")
        return
    key, raw = text.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p.strip() for p in parts):
        errors.append(f"invalid override {text!r}: the key before '=' must be a dotted "
                      "name such as 'pools.k'")
        return
    parts = [p.strip() for p in parts]
    context = f"override {text!r}: "
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        errors.append(f"{context}cannot parse value {raw!r} as YAML ({problem})")
        return

    section: Any = config
    prefix = ""
    for i, part in enumerate(parts):
        types_ = _field_types(type(section))
        if part not in types_:
            errors.append(context + _unknown_key_message(type(section), part, prefix))
            return
        tp = types_[part]
        path = _join(prefix, part)
        last = i == len(parts) - 1
        if _is_section(tp):
            if tp is ObjectiveConfig and (last or parts[i + 1] == "name"):
                _select_method(section, value.get("name") if last and isinstance(value, Mapping) else value)
            if last:
                if not isinstance(value, Mapping):
                    errors.append(f"{context}config section '{path}' must be a mapping of "
                                  f"keys to values, got {_show(value)}; set one value with "
                                  f"'{path}.KEY=VALUE'")
                else:
                    _apply_mapping(getattr(section, part), value, path, errors, context)
                return
            section = getattr(section, part)
            prefix = path
            continue
        if not last:
            errors.append(f"{context}'{path}' is a value, not a section, so '{key}' "
                          "does not exist")
            return
        try:
            # ``text=raw``: ``model.revision=0123``, ``sampling.negative_prompt=no`` or
            # ``data.prompts=a: b.txt`` are the strings typed where the field takes a string,
            # not the number, bool or mapping YAML reads.  Only ``null`` stays special.
            setattr(section, part, coerce(value, tp, path, text=raw))
        except TypeProblem as exc:
            errors.extend(context + message for message in exc.messages)
        return


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that rejects duplicate keys in a mapping."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    loader.flatten_mapping(node)
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, Hashable) and key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r}", key_node.start_mark,
            )
        seen[key] = None
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def _parse_yaml(text: str, label: str) -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"cannot parse {label} as YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label} must contain a mapping of config sections at the top "
                          f"level, got {_show(data)}")
    return data


def _looks_like_path(source: str) -> bool:
    return (
        source.endswith(_YAML_SUFFIXES)
        or "/" in source
        or "\\" in source
        or source.startswith(".")
    )


#: ``PRESET-lowmem``: any preset with every memory lever that leaves its numbers as they are or
#: was measured (README "Memory and speed on a GPU"): x0-hats decoded one at a time, gradient
#: checkpointing, text encoders in host memory between encodes, the preference model in host
#: memory outside the sampling phase
LOW_MEMORY_SUFFIX = "-lowmem"
LOW_MEMORY = {"model": {"gradient_checkpointing": True, "offload_text_encoders": True},
              "sampling": {"decode_batch_size": 1}, "preference": {"offload": True}}


def _is_preset(name: str) -> bool:
    """A bundled preset, or one with the ``-lowmem`` suffix."""
    presets = available_presets()
    return name in presets or (name.endswith(LOW_MEMORY_SUFFIX) and name[: -len(LOW_MEMORY_SUFFIX)] in presets)


def _load_layers(
    source: str | Path, base_dir: Path | None, seen: tuple[str, ...]
) -> list[tuple[str, dict[str, Any]]]:
    """Resolve ``source`` into ``(label, mapping)`` layers, outermost preset first."""
    if (isinstance(source, str) and source.endswith(LOW_MEMORY_SUFFIX) and not _looks_like_path(source)
            and source not in available_presets() and source[: -len(LOW_MEMORY_SUFFIX)] in available_presets()):
        base = source[: -len(LOW_MEMORY_SUFFIX)]
        levers = {section: dict(values) for section, values in LOW_MEMORY.items()}
        return [*_load_layers(base, base_dir, seen), (f"the {LOW_MEMORY_SUFFIX} suffix", levers)]
    if isinstance(source, str) and not _looks_like_path(source) and source in available_presets():
        label = f"preset '{source}'"
        text = _preset_root().joinpath(f"{source}.yaml").read_text(encoding="utf-8")
        identity = f"preset:{source}"
    else:
        path = Path(source).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        if not path.is_file():
            if isinstance(source, str) and not _looks_like_path(source):
                raise ConfigError(f"unknown preset '{source}' (and no such file); "
                                  f"{_presets_hint()}")
            raise ConfigError(f"config file '{path}' does not exist; {_presets_hint()}, "
                              "or give the path of a YAML file")
        label = f"config file '{path}'"
        text = path.read_text(encoding="utf-8")
        identity = str(path.resolve())
        base_dir = path.parent
    if identity in seen:
        chain = " -> ".join(seen + (identity,))
        raise ConfigError(f"circular 'preset' references: {chain}")

    data = _parse_yaml(text, label)
    layers: list[tuple[str, dict[str, Any]]] = []
    if "preset" in data:
        base = data.pop("preset")
        if not isinstance(base, str) or not base:
            raise ConfigError(f"'preset' in {label} must be a preset name or a YAML path, got "
                              f"{_show(base)}; {_presets_hint()}")
        if not _looks_like_path(base) and not _is_preset(base):
            raise ConfigError(f"unknown preset '{base}' named in {label}; {_presets_hint()}")
        layers.extend(_load_layers(base, base_dir, seen + (identity,)))
    layers.append((label, data))
    return layers


def load_config(source: str | Path | None = None, overrides: Sequence[str] = ()) -> SPOConfig:
    """Build, check and return an :class:`SPOConfig`.

    Args:
        source: A preset name (see :func:`available_presets`), the path of a
            YAML file, or ``None`` for the dataclass defaults.  A YAML file may
            start from a preset with a top-level ``preset: NAME`` key; its
            sections are merged key by key over that starting point.
        overrides: ``"section.key=value"`` strings applied in order after the
            file; values are parsed with :func:`yaml.safe_load`, so
            ``objective.eps=null``, ``lora.target_modules=[to_q,to_k]`` and
            ``optimizer.betas=[0.9,0.99]`` work.

    Raises:
        ConfigError: For an unknown preset or missing file, unparsable YAML,
            unknown keys, wrongly typed values or values that fail
            :func:`validate`; all key/type/value problems are listed together.
    """
    if isinstance(overrides, str):  # a lone string would be iterated char by char
        overrides = [overrides]
    config = SPOConfig()
    errors: list[str] = []
    if source is not None:
        for label, data in _load_layers(source, None, ()):
            _apply_mapping(config, data, "", errors, f"{label}: ")
    # ``objective.name=X`` first: the method's own settings are set on the method's section
    for text in sorted(overrides, key=lambda t: not _names_method(t)):
        _apply_override(config, text, errors)
    errors.extend(_problems(config))
    if errors:
        raise ConfigError(errors)
    return config


# --------------------------------------------------------------------------- validation


def _type_problems(obj: Any, cls: type, prefix: str) -> list[str]:
    """Strict type check of an already-built config (e.g. constructed in code).

    Each section is checked against its own class, which may be a subclass of the annotated
    one (the ``objective`` section is the settings class of ``objective.name``'s method)."""
    if not isinstance(obj, cls):
        return [f"{prefix or 'config'} must be a {cls.__name__}, got {_show(obj)}"]
    problems: list[str] = []
    for name, tp in _field_types(type(obj)).items():
        path = _join(prefix, name)
        if _is_section(tp):
            problems.extend(_type_problems(getattr(obj, name), tp, path))
            continue
        try:
            coerce(getattr(obj, name), tp, path, lenient=False)
        except TypeProblem as exc:
            problems.extend(exc.messages)
    return problems


def _method_problems(c: SPOConfig) -> list[str]:
    """The method's own checks (``objective.problems``), once its name is known."""
    name = c.objective.name
    if name not in METHODS:
        return [METHODS.unknown_message(name)]
    settings = METHODS.get(name).config_class
    if type(c.objective) is not settings:
        return [f"objective must be a {settings.__name__} (the settings of objective.name {name!r}), "
                f"got a {type(c.objective).__name__}"]
    problems = list(c.objective.problems(c))
    if c.sampling.decode_tile is not None and not getattr(METHODS.get(name), "needs_scorer", True):
        problems.append(f"sampling.decode_tile tiles the decodes for scoring, and objective.name={name} scores "
                        "nothing: set sampling.decode_tile=null")
    return problems


def _value_problems(c: SPOConfig) -> list[str]:
    """Range and consistency rules; assumes every field is well typed."""
    problems: list[str] = []

    def rule(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    m, s, p, opt, lo, tr, lg, ev = (
        c.model, c.sampling, c.pools, c.optimizer, c.lora, c.train, c.logging, c.eval
    )
    rule(c.seed >= 0, f"seed must be >= 0, got {c.seed!r}")
    if m.backbone not in BACKBONES:
        problems.append(BACKBONES.unknown_message(m.backbone))

    rule(m.resolution is None or (m.resolution > 0 and m.resolution % 8 == 0),
         f"model.resolution must be null (the pipeline's native size) or a positive multiple of 8 "
         f"(the VAE downsampling factor), got {m.resolution!r}")
    rule(s.decode_batch_size is None or s.decode_batch_size >= 1,
         f"sampling.decode_batch_size must be null (all at once) or >= 1, got {s.decode_batch_size!r}")
    rule(s.batch_size is None or s.batch_size >= 1,
         f"sampling.batch_size must be null (all at once) or >= 1, got {s.batch_size!r}")
    rule(s.decode_tile is None or (s.decode_tile > 0 and s.decode_tile % 8 == 0),
         f"sampling.decode_tile must be null (decode whole) or a positive multiple of 8 pixels, got {s.decode_tile!r}")
    rule(s.decode_tile is None or c.preference.decoder is None,
         "sampling.decode_tile tiles the VAE's decode, but preference.decoder replaces it for scoring: set one of them")

    rule(s.num_inference_steps >= 1,
         f"sampling.num_inference_steps must be >= 1, got {s.num_inference_steps!r}")
    rule(s.num_train_timesteps >= 1,
         f"sampling.num_train_timesteps must be >= 1, got {s.num_train_timesteps!r}")
    rule(s.num_inference_steps <= s.num_train_timesteps,
         f"sampling.num_inference_steps ({s.num_inference_steps}) must not exceed "
         f"sampling.num_train_timesteps ({s.num_train_timesteps})")
    rule(s.eta >= 0, f"sampling.eta must be >= 0, got {s.eta!r}")
    rule(s.guidance_scale > 0,
         f"sampling.guidance_scale must be > 0 (1.0 = no guidance), got {s.guidance_scale!r}")

    rule(p.k >= 2, f"pools.k must be >= 2 (a candidate pool needs at least two candidates "
                   f"to form a win/lose pair), got {p.k!r}")
    rule(0 <= p.threshold < 1,
         f"pools.threshold must satisfy 0 <= threshold < 1 (it is a gap between softmax "
         f"probabilities), got {p.threshold!r}")
    rule(p.inner_steps >= 1,
         f"pools.inner_steps must be >= 1 (1 = plain SPO), got {p.inner_steps!r}")
    if p.threshold_schedule != "constant":
        for name in ("threshold_min", "threshold_max"):
            value = getattr(p, name)
            rule(value is not None and 0 <= value < 1,
                 f"pools.{name} must be set in [0, 1) with pools.threshold_schedule={p.threshold_schedule}, got {value!r}")
    problems.extend(_method_problems(c))

    rule(c.preference.time_frequencies >= 1,
         f"preference.time_frequencies must be >= 1, got {c.preference.time_frequencies!r}")
    rule(c.preference.guidance_scale > 0,
         f"preference.guidance_scale must be > 0 (1.0 = no guidance), got {c.preference.guidance_scale!r}")
    if c.preference.kind == "latent" and c.preference.decoder is not None:
        problems.append("preference.decoder does not apply to preference.kind=latent (the latent reward model "
                        "decodes nothing): set preference.decoder=null")
    if c.preference.kind == "latent" and c.sampling.decode_tile is not None:
        problems.append("sampling.decode_tile does not apply to preference.kind=latent (the latent reward model "
                        "decodes nothing): set sampling.decode_tile=null")

    d = c.data
    rule(0 <= d.empty_caption_probability < 1,
         f"data.empty_caption_probability must be in [0, 1), got {d.empty_caption_probability!r}")

    rule(opt.lr > 0, f"optimizer.lr must be > 0, got {opt.lr!r}")
    rule(all(0 <= b < 1 for b in opt.betas),
         f"optimizer.betas must both satisfy 0 <= beta < 1, got {list(opt.betas)!r}")
    rule(opt.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {opt.weight_decay!r}")
    rule(opt.eps > 0, f"optimizer.eps must be > 0, got {opt.eps!r}")
    if opt.max_grad_norm is not None:
        rule(opt.max_grad_norm > 0,
             f"optimizer.max_grad_norm must be null (no clipping) or > 0, got "
             f"{opt.max_grad_norm!r}")
    rule(opt.warmup_rounds >= 0, f"optimizer.warmup_rounds must be >= 0, got {opt.warmup_rounds!r}")

    rule(lo.rank >= 1, f"lora.rank must be >= 1, got {lo.rank!r}")
    if lo.alpha is not None:
        rule(lo.alpha > 0, f"lora.alpha must be null (= rank) or > 0, got {lo.alpha!r}")
    rule(len(lo.target_modules) >= 1 and all(lo.target_modules),
         f"lora.target_modules must be a non-empty list of module names, got "
         f"{lo.target_modules!r}")
    rule(0 <= lo.dropout < 1, f"lora.dropout must satisfy 0 <= dropout < 1, got {lo.dropout!r}")

    for name in ("rounds", "prompts_per_round", "batch_size", "gradient_accumulation_steps",
                 "epochs_per_round"):
        value = getattr(tr, name)
        rule(value >= 1, f"train.{name} must be >= 1, got {value!r}")

    rule(lg.log_every >= 1, f"logging.log_every must be >= 1, got {lg.log_every!r}")
    rule(lg.checkpoint_every >= 1,
         f"logging.checkpoint_every must be >= 1, got {lg.checkpoint_every!r}")
    sp = c.spm
    for name in ("steps", "batch_size", "gradient_accumulation_steps", "validate_every", "checkpoint_every"):
        rule(getattr(sp, name) >= 1, f"spm.{name} must be >= 1, got {getattr(sp, name)!r}")
    rule(sp.lr > 0, f"spm.lr must be > 0, got {sp.lr!r}")
    rule(0 < sp.validation_fraction < 1, f"spm.validation_fraction must be in (0, 1), got {sp.validation_fraction!r}")
    rule(0 <= sp.relabel_threshold < 1, f"spm.relabel_threshold must be in [0, 1), got {sp.relabel_threshold!r}")
    rule(len(sp.validation_timesteps) >= 1 and all(t >= 0 for t in sp.validation_timesteps),
         f"spm.validation_timesteps must be a non-empty list of timesteps >= 0, got {sp.validation_timesteps!r}")
    if sp.validation_pairs is not None:
        rule(sp.validation_pairs >= 1, f"spm.validation_pairs must be null or >= 1, got {sp.validation_pairs!r}")
    if sp.guidance_scale is not None:
        rule(sp.guidance_scale > 0, f"spm.guidance_scale must be null or > 0, got {sp.guidance_scale!r}")
    rule(sp.weight_decay >= 0, f"spm.weight_decay must be >= 0, got {sp.weight_decay!r}")
    rule(all(0 <= b < 1 for b in sp.betas), f"spm.betas must each be in [0, 1), got {list(sp.betas)!r}")
    rule(sp.eps > 0, f"spm.eps must be > 0, got {sp.eps!r}")
    if sp.max_grad_norm is not None:
        rule(sp.max_grad_norm > 0, f"spm.max_grad_norm must be null or > 0, got {sp.max_grad_norm!r}")
    rule(sp.warmup_steps >= 0, f"spm.warmup_steps must be >= 0, got {sp.warmup_steps!r}")
    if sp.max_timestep is not None:
        rule(sp.max_timestep >= 0, f"spm.max_timestep must be null (every sampling timestep) or >= 0, "
                                   f"got {sp.max_timestep!r}")
    rule(lg.keep_checkpoints >= 1,
         f"logging.keep_checkpoints must be >= 1, got {lg.keep_checkpoints!r}")
    if c.train.num_processes is not None:
        rule(c.train.num_processes >= 1,
             f"train.num_processes must be >= 1, got {c.train.num_processes!r}")
    rule(lg.sample_every >= 0,
         f"logging.sample_every must be >= 0 (0 = off), got {lg.sample_every!r}")
    rule(lg.sample_count >= 1, f"logging.sample_count must be >= 1, got {lg.sample_count!r}")
    if lg.sample_prompts is not None:
        rule(len(lg.sample_prompts) >= 1 and all(p.strip() for p in lg.sample_prompts),
             f"logging.sample_prompts must be null or a non-empty list of non-empty prompts, got "
             f"{lg.sample_prompts!r}")

    rule(ev.seeds >= 1, f"eval.seeds must be >= 1, got {ev.seeds!r}")
    if ev.guidance_scale is not None:
        rule(ev.guidance_scale > 0,
             f"eval.guidance_scale must be null (= sampling.guidance_scale) or > 0, got "
             f"{ev.guidance_scale!r}")
    return problems


def _problems(config: SPOConfig) -> list[str]:
    type_problems = _type_problems(config, SPOConfig, "")
    if type_problems:
        return type_problems
    return _value_problems(config)


def validate(config: SPOConfig) -> None:
    """Check types and value ranges of ``config`` without loading any model.

    Raises:
        ConfigError: listing every problem found (each names the dotted key
            and the rule it breaks).
    """
    problems = _problems(config)
    if problems:
        raise ConfigError(problems)


# --------------------------------------------------------------------------- serialisation


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


class _ConfigDumper(yaml.SafeDumper):
    """Safe YAML dumper writing sections in block style and lists inline."""


_ConfigDumper.add_representer(
    list,
    lambda dumper, data: dumper.represent_sequence(
        "tag:yaml.org,2002:seq", data, flow_style=True
    ),
)


def config_to_dict(config: SPOConfig) -> dict[str, Any]:
    """Return ``config`` as nested plain dicts/lists/scalars (tuples become lists)."""
    return _plain(config)


def config_to_yaml(config: SPOConfig) -> str:
    """Return ``config`` as YAML, sections and keys in declaration order.

    The text loads back with :func:`load_config` to an equal object.
    """
    return yaml.dump(
        config_to_dict(config),
        Dumper=_ConfigDumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
    )


def save_config(config: SPOConfig, path: str | Path) -> Path:
    """Write ``config`` as YAML to ``path`` (creating parent folders; written to a temporary file
    and renamed, so a reader never sees half a file); return the path."""
    return atomic_write_text(path, config_to_yaml(config))
