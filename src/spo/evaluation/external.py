"""Models ``spo train`` did not make, evaluated against a base model exactly as a run is: a
fine-tuned diffusers pipeline, of which only the denoiser (the UNet; SD3's transformer) is taken,
and a LoRA file in diffusers', peft's or diffusers' older key naming (the SPO release's
``*_lora_diffusers.safetensors``).

Everything is checked against the base before any image is made, on a skeleton of the base's
denoiser built on the ``meta`` device (no weights read): a pipeline whose denoiser is not the
base's architecture, and a LoRA that does not fit the base's modules, fail with one
:class:`~spo.errors.ModelLoadError` line. The LoRA is then applied with diffusers' own loader
(``load_lora_adapter``) after diffusers' own key conversion (``convert_unet_state_dict_to_peft``),
the same call on the skeleton and on the real model.

Weights are read only as tensors: safetensors, or ``torch.load(weights_only=True)`` for a LoRA
``.bin`` (:func:`spo.weights.read_state_dict`); a pipeline's denoiser only from safetensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..builtin import resolve_weights
from ..config import SPOConfig
from ..errors import ModelLoadError
from ..weights import error_line, fetch_hub_file, parse_reference, read_state_dict, resolve_reference

#: suffixes of a weights file named as a target (anything else is a preset or a config file)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
#: file stems that say nothing of the model: such a target is named after its folder or repo
GENERIC_STEMS = frozenset({"pytorch_lora_weights", "adapter_model", "diffusion_pytorch_model", "model", "lora"})
#: a LoRA file saved by ``spo train`` / ``save_lora_weights`` (a directory holding it is a LoRA target)
LORA_FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
SAFETENSORS_WEIGHTS = "diffusion_pytorch_model.safetensors"
SAFETENSORS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
PEFT_PREFIX = "base_model.model."
ADAPTER = "spo-eval"
_LORA_KEY = re.compile(r"\.(lora_A|lora_B)\.(weight|bias)$|\.lora_magnitude_vector$")
_OLD_LORA = (".lora.down.", ".lora.up.", "_lora.down.", "_lora.up.", ".lora_linear_layer.")


@dataclass
class BaseDenoiser:
    """The base model's denoiser, as far as checking a target against it needs: its pipeline
    component name (``unet``; SD3: ``transformer``), its diffusers class and config."""

    component: str
    cls: type
    config: dict[str, Any]

    def skeleton(self) -> torch.nn.Module:
        """The denoiser built on the ``meta`` device: every module and shape, no weights."""
        with torch.device("meta"):
            return self.cls.from_config(self.config)


def base_denoiser(config: SPOConfig) -> BaseDenoiser:
    """The denoiser of the model ``config.model`` names (its ``model_index.json`` and the
    component's ``config.json``; a hub id downloads only those two small files)."""
    import diffusers

    from ..backbones import BACKBONES, check_model_path

    backbone = config.model.backbone
    diffusers_backbones = [name for name in BACKBONES.names() if BACKBONES.get(name).diffusers_format]
    if backbone not in diffusers_backbones:
        raise ModelLoadError(f"a fine-tuned pipeline or a LoRA file is evaluated against a diffusers base model "
                             f"(model.backbone one of {diffusers_backbones}), not model.backbone={backbone!r}")
    component = BACKBONES.get(backbone).lora_prefix
    pretrained = check_model_path(resolve_weights(config.model.pretrained, "model.pretrained"),
                                  revision=config.model.revision)
    try:
        index = diffusers.DiffusionPipeline.load_config(pretrained, revision=config.model.revision)
        class_name = index[component][1]
        cls = getattr(diffusers, class_name)
        denoiser_config = dict(cls.load_config(pretrained, subfolder=component, revision=config.model.revision))
    except Exception as err:  # noqa: BLE001 - missing files, offline hub, a pipeline without that component
        raise ModelLoadError(f"model.pretrained: cannot read the {component} of {pretrained!r}: "
                             f"{error_line(err)}") from None
    return BaseDenoiser(component, cls, denoiser_config)


# ----------------------------------------------------------------------------- fine-tuned pipelines
def looks_like_hub_id(text: str) -> bool:
    """A hub repo ``owner/name`` or a folder in one, ``owner/name/FOLDER``, that is no local path
    (:func:`spo.weights.parse_reference`)."""
    return parse_reference(text).repo_id is not None and "/" in text


def resolve_pipeline(ref: str, component: str, what: str) -> Path:
    """The local directory of the pipeline ``ref`` names (a directory with ``model_index.json``,
    or a hub repo ``owner/name`` or folder of one ``owner/name/FOLDER`` whose ``model_index.json``,
    ``COMPONENT/config.json`` and COMPONENT's safetensors weights are fetched, each with
    :func:`spo.weights.fetch_hub_file`; offline: from the hub cache)."""
    p = Path(ref).expanduser()
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise ModelLoadError(f"{what}: {str(p)!r} is not a diffusers pipeline directory (no model_index.json)")
        return p
    parsed = parse_reference(ref)
    repo, folder = parsed.repo_id or ref, f"{parsed.path_in_repo}/" if parsed.path_in_repo else ""

    def fetch(filename: str, lead: str | None = None) -> Path:
        return fetch_hub_file(repo, folder + filename, what, lead=lead)

    index = fetch("model_index.json", f"no such local directory, nor could the hub repo {ref!r} give its model_index.json")
    fetch(f"{component}/config.json", f"the hub repo {ref!r} has no {component}/config.json")
    try:
        fetch(f"{component}/{SAFETENSORS_WEIGHTS}")
    except ModelLoadError as single:  # maybe sharded
        try:
            shards = json.loads(fetch(f"{component}/{SAFETENSORS_INDEX}").read_text())["weight_map"]
            for shard in sorted(set(shards.values())):
                fetch(f"{component}/{shard}")
        except Exception:  # noqa: BLE001
            raise ModelLoadError(f"{what}: the hub repo {ref!r} has no safetensors weights for its {component} "
                                 f"(only safetensors are read): {str(single).removeprefix(f'{what}: ')}") from None
    return index.parent


def denoiser_weight_files(folder: Path, what: str) -> list[Path]:
    """The safetensors files a denoiser folder's weights are in (one file, or the shards its
    index lists); no safetensors weights is an error (pickled weights are never read)."""
    single = folder / SAFETENSORS_WEIGHTS
    if single.is_file():
        return [single]
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ModelLoadError(f"{what}: {str(index)!r} is not a safetensors index ({error_line(err)})") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelLoadError(f"{what}: {str(folder)!r} lacks the shard {missing[0]!r} its index lists")
        return [folder / s for s in shards]
    raise ModelLoadError(f"{what}: {str(folder)!r} holds no {SAFETENSORS_WEIGHTS} (only safetensors weights are read)")


def _architecture(model: torch.nn.Module) -> dict[str, Any]:
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


def check_pipeline(directory: Path, base: BaseDenoiser, what: str) -> Path:
    """The folder of the pipeline's denoiser, after checking that it is the base's architecture
    (the same class, and the same configuration once both are filled with their defaults: a
    pipeline of another model family fails here, naming what differs)."""
    try:
        index = json.loads((directory / "model_index.json").read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{what}: cannot read {str(directory / 'model_index.json')!r}: {error_line(err)}") from None
    entry = index.get(base.component) if isinstance(index, dict) else None
    kind = index.get("_class_name", "pipeline") if isinstance(index, dict) else "pipeline"
    if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
        raise ModelLoadError(f"{what}: this {kind} has no {base.component}, so it cannot be compared with the base")
    if entry[1] != base.cls.__name__:
        raise ModelLoadError(f"{what}: a {kind} whose {base.component} is a {entry[1]}; the base's is a "
                             f"{base.cls.__name__}: another architecture")
    folder = directory / base.component
    try:
        config = dict(base.cls.load_config(str(folder)))
        with torch.device("meta"):
            theirs = _architecture(base.cls.from_config(config))
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"{what}: cannot read its {base.component}'s config.json: {error_line(err)}") from None
    ours = _architecture(base.skeleton())
    differs = [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
    if differs:
        shown = "; ".join(f"{k} {theirs.get(k)!r} (base: {ours.get(k)!r})" for k in differs[:3])
        raise ModelLoadError(f"{what}: its {base.component} is another architecture than the base's "
                             f"({len(differs)} setting(s) differ: {shown})")
    denoiser_weight_files(folder, what)
    return folder


def load_denoiser(folder: str | Path, cls: type, dtype: torch.dtype, what: str) -> torch.nn.Module:
    """A pipeline's denoiser from its folder, safetensors only, in ``dtype``."""
    try:
        return cls.from_pretrained(str(folder), torch_dtype=dtype, use_safetensors=True)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"{what}: could not load a {cls.__name__} from {str(folder)!r}: {error_line(err)}") from None


def files_sha256(files: Sequence[Path]) -> str:
    """One digest over the files' names and bytes (a fine-tuned denoiser's identity on resume)."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        digest.update(f"{path.name}|{path.stat().st_size}|".encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- LoRA files
@dataclass
class LoRAWeights:
    """A LoRA file's tensors in the names ``load_lora_adapter`` reads (``PREFIX.<module>.lora_A.weight``),
    its alphas (``PREFIX.<module>.alpha`` -> value; ``None``: alpha = rank) and diffusers' adapter
    metadata (rank, alpha, targets: what ``spo train`` writes), and which naming the file used."""

    state_dict: dict[str, Tensor]
    network_alphas: dict[str, float] | None
    metadata: dict[str, Any] | None
    naming: str
    prefix: str


def resolve_lora(ref: str, what: str) -> Path:
    """The LoRA file ``ref`` names: a local file, a directory holding one (``pytorch_lora_weights.safetensors``
    or peft's ``adapter_model.safetensors``), or ``REPO_ID/FILE`` on the hub."""
    p = Path(ref).expanduser()
    if p.is_dir():
        for name in LORA_FILES:
            if (p / name).is_file():
                return p / name
        raise ModelLoadError(f"{what}: the directory {str(p)!r} holds no LoRA file ({' or '.join(LORA_FILES)})")
    return Path(resolve_reference(ref, what, "file"))


def _safetensors_metadata(path: Path) -> dict[str, Any] | None:
    """Diffusers' LoRA adapter metadata in a safetensors header (``spo train`` writes rank, alpha
    and targets there), else ``None``."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY)
        return json.loads(raw) if raw else None
    except Exception:  # noqa: BLE001 - not safetensors (a .bin), or no usable metadata
        return None


def _peft_adapter_config(path: Path, prefix: str) -> dict[str, Any] | None:
    """peft's ``adapter_config.json`` beside a peft-named file, as diffusers' adapter metadata."""
    config = path.parent / "adapter_config.json"
    if not config.is_file():
        return None
    from peft import LoraConfig

    try:
        values = LoraConfig.from_pretrained(str(path.parent)).to_dict()
    except Exception:  # noqa: BLE001 - unreadable: alpha = rank, as without it
        return None
    return {f"{prefix}.{k}": sorted(v) if isinstance(v, set) else v for k, v in values.items()}


def read_lora(path: Path, prefix: str, what: str) -> LoRAWeights:
    """Read a LoRA file and name its tensors as diffusers' ``load_lora_adapter`` reads them.

    Namings: diffusers' (``PREFIX.<module>.lora_A.weight`` / ``lora_B``: ``spo train``'s files);
    peft's (``base_model.model.<module>.lora_A.weight``: ``PeftModel.save_pretrained``; its
    ``adapter_config.json``, when beside the file, gives rank and alpha); diffusers' older one
    (``PREFIX.<module>.lora.down.weight`` / ``lora.up``, optionally ``PREFIX.<module>.alpha``:
    the SPO release's LoRA files), converted by diffusers' ``convert_unet_state_dict_to_peft``;
    and module keys without any prefix (``ModelMixin.save_lora_adapter``). A file with LoRA
    weights for a text encoder, in kohya's naming, or with no LoRA tensor is refused."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    tensors = read_state_dict(path, what)
    where = what if Path(what).expanduser() == path else f"{what} ({path})"
    keys = list(tensors)
    foreign = [k for k in keys if k.startswith(("text_encoder", "lora_te", "te_", "te1_", "te2_"))]
    if foreign:
        raise ModelLoadError(f"{where}: holds LoRA weights for a text encoder ({foreign[0]!r}); spo eval "
                             f"applies a LoRA to the {prefix} only, and without them it would be another model")
    if any(k.startswith("lora_unet_") for k in keys):
        raise ModelLoadError(f"{where}: is in kohya's (webui) naming, which spo eval does not read; use "
                             "the diffusers file of the same LoRA (e.g. the release's *_lora_diffusers.safetensors)")
    metadata = _safetensors_metadata(path)
    if all(k.startswith(PEFT_PREFIX) for k in keys):
        naming = "peft"
        tensors = {f"{prefix}.{k[len(PEFT_PREFIX):]}": v for k, v in tensors.items()}
        metadata = metadata or _peft_adapter_config(path, prefix)
    elif all(k.startswith(f"{prefix}.") for k in keys):
        naming = "diffusers-old" if any(m in k for k in keys for m in _OLD_LORA) else "diffusers"
    elif not any(k.startswith(f"{prefix}.") for k in keys) and any(_is_lora_key(k) for k in keys):
        naming = "unprefixed"
        tensors = {f"{prefix}.{k}": v for k, v in tensors.items()}
    else:
        other = next((k for k in keys if not k.startswith(f"{prefix}.")), keys[0])
        raise ModelLoadError(f"{where}: is no LoRA of a {prefix} in a naming spo eval reads "
                             f"(diffusers', peft's or diffusers' older): found {other!r}")
    alphas = {k: float(v.float().reshape(-1)[0]) for k, v in tensors.items() if k.endswith(".alpha") and v.numel() == 1}
    tensors = {k: v for k, v in tensors.items() if k not in alphas}
    state_dict = convert_unet_state_dict_to_peft(tensors)
    not_lora = [k for k in state_dict if not _LORA_KEY.search(k)]
    if not_lora or not state_dict:
        example = not_lora[0] if not_lora else "(nothing)"
        raise ModelLoadError(f"{where}: is no LoRA file: {example!r} is not a LoRA weight")
    modules: dict[str, set[str]] = {}
    for k in state_dict:
        match = re.search(r"\.(lora_[AB])\.weight$", k)
        if match:
            modules.setdefault(k[: match.start()], set()).add(match.group(1))
    half = next((m for m, parts in modules.items() if parts != {"lora_A", "lora_B"}), None)
    if half is not None:
        raise ModelLoadError(f"{where}: has only {sorted(modules[half])[0]} for {half!r}: an incomplete LoRA")
    return LoRAWeights(state_dict, alphas or None, metadata if not alphas else None, naming, prefix)


def _is_lora_key(key: str) -> bool:
    """A LoRA tensor's name in any of the namings read (peft's ``lora_A``, the older ``lora.down``)."""
    return bool(_LORA_KEY.search(key)) or any(m in key for m in _OLD_LORA)


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Diffusers logs a failed adapter load at error level before raising; the raised error is
    the one reported (as one line)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def _cause(err: BaseException) -> str:
    """The informative line of a loading error (a state-dict error's first size mismatch)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    line = next((x for x in lines if x.startswith("size mismatch")), None) or error_line(err)
    return line if len(line) <= 300 else line[:297] + "..."


def apply_lora(denoiser: torch.nn.Module, lora: LoRAWeights, what: str, *, low_cpu_mem_usage: bool = False) -> int:
    """Load ``lora`` into ``denoiser`` with diffusers' ``load_lora_adapter`` (frozen); every tensor
    of the file must land in a module, else a :class:`ModelLoadError`. Returns the number of
    adapted modules."""
    from peft.utils import get_peft_model_state_dict

    with _quiet_diffusers():
        try:
            denoiser.load_lora_adapter(dict(lora.state_dict), prefix=lora.prefix, network_alphas=lora.network_alphas,
                                       metadata=lora.metadata, adapter_name=ADAPTER,
                                       low_cpu_mem_usage=low_cpu_mem_usage)
        except Exception as err:  # noqa: BLE001 - target modules not found, shape mismatch: one line
            raise ModelLoadError(f"{what}: this LoRA does not fit the base's {lora.prefix}: {_cause(err)}") from None
    loaded = set(get_peft_model_state_dict(denoiser, adapter_name=ADAPTER))
    wanted = {k[len(lora.prefix) + 1:] for k in lora.state_dict}
    lost = sorted(wanted - loaded)
    if lost:
        raise ModelLoadError(f"{what}: {len(lost)} of {len(wanted)} LoRA tensors fit no module of the base's "
                             f"{lora.prefix} (e.g. {lost[0]!r}): a LoRA of another model?")
    denoiser.requires_grad_(False)
    return len({k.rsplit(".lora_", 1)[0] for k in wanted})


def check_lora(lora: LoRAWeights, base: BaseDenoiser, what: str) -> int:
    """Apply ``lora`` to a weightless skeleton of the base's denoiser: the same call as for the
    real model, so a LoRA that does not fit fails before any image is made."""
    return apply_lora(base.skeleton(), lora, what, low_cpu_mem_usage=True)


def tensors_sha256(tensors: Mapping[str, Tensor]) -> str:
    """A digest of tensors by name, dtype, shape and values (not a file's bytes)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


# ----------------------------------------------------------------------------- names
def target_name(ref: str, kind: str) -> str:
    """A readable name for a target: a hub pipeline's repo name, a directory's name, a LoRA file's
    stem (its folder's or repo's name when the stem says nothing, e.g. ``pytorch_lora_weights``);
    characters other than letters, digits, ``.``, ``_`` and ``-`` become ``-``."""
    text = ref.rstrip("/")
    p = Path(text).expanduser()
    is_file = kind != "pipeline" and p.suffix in WEIGHT_SUFFIXES
    name = p.stem if is_file else p.name
    if kind != "pipeline" and name in GENERIC_STEMS:
        if not p.exists() and text.count("/") >= 2:  # REPO_ID/FILE: the repo's name
            name = text.split("/")[1]
        else:
            folder = p.resolve().parent if is_file else p.resolve()
            while folder.name == "lora" and folder.parent != folder:  # a run's lora/: the run's name
                folder = folder.parent
            name = folder.name or name
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return clean or "model"
