"""What ``spo eval`` compares: run directories (base + their LoRA), plain models (a preset or a
config file: the base), and models ``spo train`` did not make (a fine-tuned diffusers pipeline, a
LoRA file: :mod:`spo.evaluation.external`), resolved to :class:`EvalModel` s that share one base
model and so one noise per image."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backbones import Backbone, load_backbone, resolve_dtype
from ..builtin import resolve_weights
from ..config import SPOConfig, load_config
from ..errors import ModelLoadError
from ..weights import parse_reference
from .evaluate import BASE, EvalModel
from .external import (
    LORA_FILES,
    WEIGHT_SUFFIXES,
    apply_lora,
    base_denoiser,
    check_lora,
    check_pipeline,
    load_denoiser,
    looks_like_hub_id,
    read_lora,
    resolve_lora,
    resolve_pipeline,
    target_name,
)

LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass
class Target:
    """One thing named on the command line. ``kind``: ``run`` (its config and LoRA), ``config`` (a
    preset or config file: the base model only), ``pipeline`` (a fine-tuned diffusers pipeline:
    ``unet`` = its denoiser's folder once :func:`prepare_targets` checked it) or ``lora`` (a LoRA
    file: ``lora`` once resolved). Pipelines and LoRA files carry no config: they are made with the
    base's (``--base``, or another target's). ``source`` is the text as given."""

    name: str
    config: SPOConfig | None
    run: Path | None = None
    lora: Path | None = None
    kind: str = "config"
    source: str | None = None
    unet: Path | None = None
    lora_naming: str | None = None

    @property
    def external(self) -> bool:
        """A model ``spo train`` did not make (a pipeline or a LoRA file): it needs a base's config."""
        return self.kind in ("pipeline", "lora")


def is_run_dir(path: str | Path) -> bool:
    p = Path(path).expanduser()
    return (p / "config.yaml").is_file() and (p / "lora" / LORA_FILE).is_file()


def resolve_target(text: str, overrides: Sequence[str] = ()) -> Target:
    """What ``text`` names, read without touching the network: a finished run directory
    (``config.yaml`` + ``lora/``); a fine-tuned diffusers pipeline (a directory with
    ``model_index.json``, a hub id ``owner/name`` or a folder of one ``owner/name/FOLDER``); a LoRA file (a weights file, a directory
    holding ``pytorch_lora_weights.safetensors`` or ``adapter_model.safetensors``, or a hub file
    ``REPO_ID/FILE``); else a preset or config file."""
    p = Path(text).expanduser()
    if p.is_dir():
        if is_run_dir(p):
            return Target(p.resolve().name, load_config(p / "config.yaml", list(overrides)), run=p, lora=p / "lora",
                          kind="run")
        if (p / "config.yaml").is_file():
            raise ModelLoadError(f"{text}: a run directory without lora/{LORA_FILE}: has the run finished?")
        if (p / "model_index.json").is_file():
            return Target(target_name(text, "pipeline"), None, kind="pipeline", source=text)
        if any((p / name).is_file() for name in LORA_FILES):
            return Target(target_name(text, "lora"), None, kind="lora", source=text)
        raise ModelLoadError(f"{text}: a directory that is no run (config.yaml + lora/), no diffusers pipeline "
                             f"(model_index.json) and holds no LoRA file ({' or '.join(LORA_FILES)})")
    if p.suffix in WEIGHT_SUFFIXES:
        if p.is_file() or parse_reference(text).path_in_repo is not None:  # a local file, or REPO_ID/FILE
            return Target(target_name(text, "lora"), None, kind="lora", source=text)
        raise ModelLoadError(f"{text}: no such file (a file of a hub repo is written REPO_ID/FILE)")
    if looks_like_hub_id(text) and p.suffix not in (".yaml", ".yml", ".json"):
        return Target(target_name(text, "pipeline"), None, kind="pipeline", source=text)
    return Target(Path(text).stem, load_config(text, list(overrides)))


def base_config(targets: Sequence[Target], base: str | None = None, overrides: Sequence[str] = ()) -> SPOConfig:
    """The configuration every model is made with: ``base`` (a preset, a config file or a run
    directory, with ``overrides``) when given, else the first target's that has one."""
    if base is not None:
        p = Path(base).expanduser()
        source = p / "config.yaml" if p.is_dir() and (p / "config.yaml").is_file() else base
        return load_config(source, list(overrides))
    for t in targets:
        if t.config is not None:
            return t.config
    named = next((t.source or t.name for t in targets if t.external), "")
    read_as = "" if Path(named).expanduser().exists() else "no such local path; read as a hub reference, "
    raise ModelLoadError(f"{named}: {read_as}a fine-tuned pipeline or a LoRA file is compared with a base model: name "
                         "it with --base PRESET_OR_CONFIG (e.g. --base sd15, plus model.pretrained=... to change it)")


def prepare_targets(targets: Sequence[Target], config: SPOConfig) -> None:
    """Resolve each pipeline and LoRA file (local, or fetched from the hub) and check it against
    the base's denoiser before any image is made: a pipeline of another architecture, a file that
    is no LoRA, or a LoRA that fits no module of the base fails here, naming the target."""
    external = [t for t in targets if t.external]
    if not external:
        return
    base = base_denoiser(config)
    for t in external:
        what = t.source or t.name
        if t.kind == "pipeline":
            t.unet = check_pipeline(resolve_pipeline(what, base.component, what), base, what)
        else:
            path = resolve_lora(what, what)
            lora = read_lora(path, base.component, what)
            check_lora(lora, base, what)
            t.lora, t.lora_naming = path, lora.naming


def _unique(key: str, alternative: str, keys: set[str]) -> str:
    """``key``, else ``ALTERNATIVE-key``, else ``key-2``, ``key-3``, ... (``alternative`` cleaned as
    a folder name, like the key)."""
    if key not in keys:
        return key
    alternative = re.sub(r"[^A-Za-z0-9._-]+", "-", alternative).strip("-.")
    if alternative and f"{alternative}-{key}" not in keys:
        return f"{alternative}-{key}"
    n = 2
    while f"{key}-{n}" in keys:
        n += 1
    return f"{key}-{n}"


def eval_models(targets: Sequence[Target], base: SPOConfig | None = None) -> list[EvalModel]:
    """``base`` (the targets' shared base model: ``base``'s, else the first config's) then one
    model per run, pipeline and LoRA file: a run keyed by its directory's name (made unique with
    its parent's), the others by :func:`~spo.evaluation.external.target_name` (made unique with
    the hub owner or parent folder, then a number). Targets must share the base model."""
    configs = ([base] if base is not None else []) + [t.config for t in targets if t.config is not None]
    if not configs:
        raise ModelLoadError("spo eval needs a base model: a run, a preset or config file, or --base")
    bases = {(c.model.backbone, resolve_weights(c.model.pretrained)) for c in configs}
    if len(bases) > 1:
        raise ModelLoadError(f"spo eval compares runs of one base model; these name several: {sorted(bases)}")
    first = configs[0]
    pretrained = resolve_weights(first.model.pretrained)
    models = [EvalModel(BASE, pretrained)]
    keys: set[str] = {BASE}
    for t in targets:
        if t.external:
            source = t.source or t.name
            parent = source.split("/")[0] if not Path(source).expanduser().exists() else \
                Path(source).expanduser().resolve().parent.name
            key = _unique(t.name, parent, keys)
            keys.add(key)
            models.append(EvalModel(key, pretrained, lora=str(t.lora) if t.lora is not None else None,
                                    unet=str(t.unet) if t.unet is not None else None, source=source,
                                    lora_naming=t.lora_naming))
            continue
        if t.run is None:
            continue
        key = t.name if t.name not in keys else f"{t.run.resolve().parent.name}-{t.name}"
        if key in keys:
            raise ModelLoadError(f"{t.run}: named twice")
        keys.add(key)
        models.append(EvalModel(key, resolve_weights(t.config.model.pretrained), lora=str(t.lora), run=str(t.run),
                                method=t.config.objective.name))
    return models


def model_loader(config: SPOConfig) -> Any:
    """``load_model(EvalModel) -> Backbone``: the config's backbone, with the model's fine-tuned
    denoiser in place of the base's, or its LoRA attached (frozen), when it has one."""

    def load(model: EvalModel) -> Backbone:
        what = model.source or model.key
        components = None
        if model.unet is not None:
            base = base_denoiser(config)
            components = {base.component: load_denoiser(model.unet, base.cls, resolve_dtype(config.model.dtype), what)}
        backbone = load_backbone(config.model, config.sampling.negative_prompt, components=components)
        if model.lora is not None and Path(model.lora).is_file():
            apply_lora(backbone.unet, read_lora(Path(model.lora), backbone.lora_prefix, what), what)
        elif model.lora is not None:
            backbone.unet.load_lora_adapter(model.lora, prefix=backbone.lora_prefix, weight_name=LORA_FILE)
            backbone.unet.requires_grad_(False)
        return backbone

    return load
