"""``spo eval``: a base toy model against an SPO run's fine-tuned model, same prompts, same seeds.

Scores with the toy world's oracles (alignment, aesthetic); the toy PickScore column joins when
the toy reward model ships (issue 5). Writes ``eval.json`` and a side-by-side grid (rows: base
and fine-tuned for each seed, same noise).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..backbones.base import BackboneLoadError
from ..images import image_grid, to_pil
from .evaluate import Estimate, sample_and_score
from .model import MARKER, ToyBackbone


def resolve_models(target: str | Path) -> tuple[Path, Path | None]:
    """(base model dir, LoRA dir or None) for a toy model directory or an SPO run directory."""
    target = Path(target).expanduser()
    if (target / MARKER).exists():
        return target, None
    config_file, lora = target / "config.yaml", target / "lora" / "pytorch_lora_weights.safetensors"
    if config_file.exists() and lora.exists():
        from ..config import load_config

        config = load_config(config_file)
        if config.model.backbone != "toy":
            raise BackboneLoadError(f"{target}: spo eval scores toy-world runs; this run trained {config.model.backbone!r}")
        return Path(config.model.pretrained), lora.parent
    raise BackboneLoadError(f"{target}: neither a toy model directory nor a finished SPO run (config.yaml + lora/)")


def evaluate_run(
    target: str | Path,
    prompts: Sequence[str],
    output: str | Path,
    *,
    seeds: int = 3,
    guidance_scale: float = 3.0,
    num_inference_steps: int = 20,
) -> dict[str, Any]:
    base_dir, lora_dir = resolve_models(target)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    kwargs = dict(seeds=seeds, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps)
    base = ToyBackbone.from_pretrained(str(base_dir), device="cpu")
    base_images, base_scores = sample_and_score(base, prompts, **kwargs)
    result: dict[str, Any] = {"prompts": list(prompts), "seeds": seeds, "guidance_scale": guidance_scale,
                              "base": {k: asdict(v) for k, v in base_scores.items()}}
    rows = [base_images.view(seeds, len(prompts), *base_images.shape[1:])]
    if lora_dir is not None:
        tuned = ToyBackbone.from_pretrained(str(base_dir), device="cpu")
        tuned.unet.load_lora_adapter(str(lora_dir), prefix="unet", weight_name="pytorch_lora_weights.safetensors")
        tuned.unet.requires_grad_(False)
        tuned_images, tuned_scores = sample_and_score(tuned, prompts, **kwargs)
        result["fine_tuned"] = {k: asdict(v) for k, v in tuned_scores.items()}
        rows.append(tuned_images.view(seeds, len(prompts), *tuned_images.shape[1:]))
    grid = torch.stack(rows, dim=1).flatten(0, 2)  # seed-major: base row, fine-tuned row, ...
    image_grid(to_pil(grid), cols=len(prompts), cell=64).save(output / "grid.png")
    (output / "eval.json").write_text(json.dumps(result, indent=2))
    result["grid"] = str(output / "grid.png")
    return result


def format_table(result: dict[str, Any]) -> str:
    models = [m for m in ("base", "fine_tuned") if m in result]
    lines = ["metric     | " + " | ".join(f"{m:<24}" for m in models), "-" * (13 + 27 * len(models))]
    for metric in result["base"]:
        cells = [str(Estimate(**result[m][metric])) for m in models]
        lines.append(f"{metric:<10} | " + " | ".join(f"{c:<24}" for c in cells))
    return "\n".join(lines)
