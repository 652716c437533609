"""``spo eval``: a base toy model against an SPO run's fine-tuned model, same prompts, same seeds.

Scores with the toy PickScore (the generic reward, the paper's PickScore column), the aesthetic
oracle (for the LAION aesthetic score) and the alignment oracle (for GenEval). Writes
``eval.json`` and a side-by-side grid (rows: base and fine-tuned for each seed, same noise).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..backbones.base import BackboneLoadError
from ..builtin import resolve_weights
from ..images import image_grid, to_pil
from ..preference.clip_scorer import CLIPScorer
from .evaluate import Estimate, sample_and_score
from .model import MARKER, ToyBackbone


#: the evaluation's generic reward: the v1 toy PickScore, fixed so that every run is measured by
#: the same yardstick (later builds' reward models are judges, not the metric)
EVAL_REWARD = "toy:pickscore-v1"


def resolve_models(target: str | Path) -> tuple[Path, Path | None]:
    """(base model dir, LoRA dir or None) for a toy model directory or an SPO run directory."""
    target = Path(resolve_weights(str(target), "spo eval")).expanduser()
    if (target / MARKER).exists():
        return target, None
    config_file, lora = target / "config.yaml", target / "lora" / "pytorch_lora_weights.safetensors"
    if config_file.exists() and lora.exists():
        from ..config import load_config

        config = load_config(config_file)
        if config.model.backbone != "toy":
            raise BackboneLoadError(f"{target}: spo eval scores toy-world runs; this run trained {config.model.backbone!r}")
        return Path(resolve_weights(config.model.pretrained, "model.pretrained")), lora.parent
    raise BackboneLoadError(f"{target}: neither a toy model directory nor a finished SPO run (config.yaml + lora/)")


def load_reward(reward: str | None) -> CLIPScorer | None:
    """A CLIPScorer for ``reward`` (the toy PickScore, or any CLIPModel directory); ``None`` for ``None``."""
    if reward is None:
        return None
    return CLIPScorer.from_pretrained(reward, device="cpu")


def evaluate_run(
    target: str | Path,
    prompts: Sequence[str],
    output: str | Path,
    *,
    seeds: int = 3,
    guidance_scale: float = 3.0,
    num_inference_steps: int = 20,
    reward: str | None = EVAL_REWARD,
    lora: str | Path | None = None,
    base_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Sample base (and fine-tuned) with the same seeds; score with the toy PickScore, the
    aesthetic and the alignment oracle; write ``eval.json`` and ``grid.png`` into ``output``.

    ``lora`` (a directory holding ``pytorch_lora_weights.safetensors``) replaces the run's final
    LoRA, e.g. a copy kept from an earlier point of the run. ``base_cache`` (a file) keeps the
    base model's images and scores for these settings, so that many runs of one base model are
    evaluated against one sampling of it. With a fine-tuned model,
    ``difference`` holds the paired difference fine-tuned - base (same prompt, same seed) with
    its 95% interval."""
    base_dir, lora_dir = resolve_models(target)
    if lora is not None:
        lora_dir = Path(lora)
        if not (lora_dir / "pytorch_lora_weights.safetensors").exists():
            raise BackboneLoadError(f"{lora_dir}: no pytorch_lora_weights.safetensors")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    scorer = load_reward(reward)
    kwargs = dict(seeds=seeds, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, reward=scorer)
    key = {"base_model": str(base_dir), "prompts": list(prompts), "seeds": seeds, "guidance_scale": guidance_scale,
           "num_inference_steps": num_inference_steps, "reward_model": reward}
    cached = torch.load(base_cache, weights_only=True) if base_cache and Path(base_cache).exists() else None
    if cached is not None and cached["key"] == key:
        base_images, base_values = cached["images"], cached["values"]
        base_scores = {k: Estimate.of(v) for k, v in base_values.items()}
    else:
        base = ToyBackbone.from_pretrained(str(base_dir), device="cpu")
        base_images, base_scores, base_values = sample_and_score(base, prompts, **kwargs)
        if base_cache:
            Path(base_cache).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(base_cache).with_suffix(f".tmp{os.getpid()}")
            torch.save({"key": key, "images": base_images, "values": base_values}, tmp)
            tmp.replace(base_cache)
    result: dict[str, Any] = {"prompts": list(prompts), "seeds": seeds, "guidance_scale": guidance_scale,
                              "num_inference_steps": num_inference_steps, "reward_model": reward,
                              "base_model": str(base_dir), "lora": str(lora_dir) if lora_dir else None,
                              "base": {k: asdict(v) for k, v in base_scores.items()}}
    rows = [base_images.view(seeds, len(prompts), *base_images.shape[1:])]
    if lora_dir is not None:
        tuned = ToyBackbone.from_pretrained(str(base_dir), device="cpu")
        tuned.unet.load_lora_adapter(str(lora_dir), prefix="unet", weight_name="pytorch_lora_weights.safetensors")
        tuned.unet.requires_grad_(False)
        tuned_images, tuned_scores, tuned_values = sample_and_score(tuned, prompts, **kwargs)
        result["fine_tuned"] = {k: asdict(v) for k, v in tuned_scores.items()}
        result["difference"] = {
            k: asdict(Estimate.of([t - b for t, b in zip(tuned_values[k], base_values[k])])) for k in base_values
        }
        rows.append(tuned_images.view(seeds, len(prompts), *tuned_images.shape[1:]))
    grid = torch.stack(rows, dim=1).flatten(0, 2)  # seed-major: base row, fine-tuned row, ...
    image_grid(to_pil(grid), cols=len(prompts), cell=64).save(output / "grid.png")
    (output / "eval.json").write_text(json.dumps(result, indent=2))
    result["grid"] = str(output / "grid.png")
    return result


def format_table(result: dict[str, Any]) -> str:
    """Rows: metrics; columns: base, fine-tuned and their paired difference (mean [95% interval])."""
    columns = [c for c in ("base", "fine_tuned", "difference") if c in result]
    names = {"base": "base", "fine_tuned": "fine-tuned (SPO)", "difference": "difference (paired)"}
    lines = ["metric     | " + " | ".join(f"{names[c]:<26}" for c in columns), "-" * (13 + 29 * len(columns))]
    for metric in result["base"]:
        cells = []
        for c in columns:
            e = Estimate(**result[c][metric])
            cells.append(f"{e.mean:+.3f} [{e.low:+.3f}, {e.high:+.3f}]" if c == "difference" else str(e))
        lines.append(f"{metric:<10} | " + " | ".join(f"{cell:<26}" for cell in cells))
    return "\n".join(lines)
