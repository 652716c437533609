"""What ``spo eval`` compares: run directories (base + their LoRA) or plain models (a preset or
a config file), resolved to :class:`EvalModel` s that share one base model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backbones import Backbone, load_backbone
from ..builtin import resolve_weights
from ..config import SPOConfig, load_config
from ..errors import ModelLoadError
from .evaluate import BASE, EvalModel

LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass
class Target:
    """One thing named on the command line: its config and, for a run, its run dir and LoRA."""

    name: str
    config: SPOConfig
    run: Path | None = None
    lora: Path | None = None


def is_run_dir(path: str | Path) -> bool:
    p = Path(path).expanduser()
    return (p / "config.yaml").is_file() and (p / "lora" / LORA_FILE).is_file()


def resolve_target(text: str, overrides: Sequence[str] = ()) -> Target:
    """A finished run directory (``config.yaml`` + ``lora/``), or a preset / config file."""
    p = Path(text).expanduser()
    if p.is_dir():
        if is_run_dir(p):
            return Target(p.resolve().name, load_config(p / "config.yaml", list(overrides)), run=p, lora=p / "lora")
        if (p / "config.yaml").is_file():
            raise ModelLoadError(f"{text}: a run directory without lora/{LORA_FILE}: has the run finished?")
    return Target(Path(text).stem, load_config(text, list(overrides)))


def eval_models(targets: Sequence[Target]) -> list[EvalModel]:
    """``base`` (the targets' shared base model) then one model per run, keyed by the run's
    directory name (made unique with its parent's). Targets must share the base model."""
    bases = {(t.config.model.backbone, resolve_weights(t.config.model.pretrained)) for t in targets}
    if len(bases) > 1:
        raise ModelLoadError(f"spo eval compares runs of one base model; these name several: {sorted(bases)}")
    first = targets[0].config
    models = [EvalModel(BASE, resolve_weights(first.model.pretrained))]
    keys: set[str] = {BASE}
    for t in targets:
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
    """``load_model(EvalModel) -> Backbone``: the config's backbone, with the model's LoRA
    attached (frozen) when it has one."""

    def load(model: EvalModel) -> Backbone:
        backbone = load_backbone(config.model, config.sampling.negative_prompt)
        if model.lora is not None:
            backbone.unet.load_lora_adapter(model.lora, prefix=backbone.lora_prefix, weight_name=LORA_FILE)
            backbone.unet.requires_grad_(False)
        return backbone

    return load
