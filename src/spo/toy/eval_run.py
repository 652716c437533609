"""``spo eval`` on the toy world: a base toy model against a run's fine-tuned model, same
prompts, same noise, through the evaluation's one code path (:mod:`spo.evaluation.evaluate`).

Scores with the toy PickScore (the generic reward, the paper's PickScore column), the aesthetic
oracle (for the LAION aesthetic score) and the alignment oracle (for GenEval).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..backbones.base import BackboneLoadError
from ..builtin import resolve_weights
from ..evaluation.evaluate import BASE, EvalModel, Protocol, evaluate, format_table
from .model import MARKER, ToyBackbone
from .scorers import EVAL_REWARD, toy_scorers


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


def load_toy_model(model: EvalModel) -> ToyBackbone:
    """The toy base model, with the model's LoRA attached (frozen) when it has one."""
    backbone = ToyBackbone.from_pretrained(model.pretrained, device="cpu")
    if model.lora is not None:
        backbone.unet.load_lora_adapter(model.lora, prefix="unet", weight_name="pytorch_lora_weights.safetensors")
        backbone.unet.requires_grad_(False)
    return backbone


def evaluate_run(
    target: str | Path,
    prompts: Sequence[str],
    output: str | Path,
    *,
    seeds: int = 3,
    guidance_scale: float = 3.0,
    num_inference_steps: int = 20,
    eta: float = 1.0,
    reward: str | None = EVAL_REWARD,
    lora: str | Path | None = None,
    base_cache: str | Path | None = None,
    progress: bool = False,
    source: str = "prompts",
) -> dict[str, Any]:
    """Base (and fine-tuned) toy model, same noise, through :func:`spo.evaluation.evaluate`:
    scored by the toy PickScore (``reward``; None: none), the aesthetic and the alignment oracle.

    ``lora`` (a directory holding ``pytorch_lora_weights.safetensors``) replaces the run's final
    LoRA, e.g. a copy kept from an earlier point of the run. ``base_cache`` (a directory) keeps
    the base model's images and scores, so that many runs of one base model are evaluated
    against one sampling of it. Noise: one generator per seed over the whole prompt set (the
    layout every toy result in docs/toy-world.md was measured with). ``eta``: DDIM's (1.0, as
    the toy preset trains), or for the flow toy model the SDE's noise level.

    Returns eval.json's content plus, for the toy benchmarks, ``base`` / ``fine_tuned`` /
    ``difference`` (the fine-tuned model's), ``grid`` and ``prompts``."""
    base_dir, lora_dir = resolve_models(target)
    if lora is not None:
        lora_dir = Path(lora)
        if not (lora_dir / "pytorch_lora_weights.safetensors").exists():
            raise BackboneLoadError(f"{lora_dir}: no pytorch_lora_weights.safetensors")
    models = [EvalModel(BASE, str(base_dir))]
    if lora_dir is not None:
        models.append(EvalModel("fine_tuned", str(base_dir), lora=str(lora_dir), run=str(target), method=_method_of(target)))
    protocol = Protocol(list(prompts), source, seeds=seeds, seed=0, num_inference_steps=num_inference_steps, eta=eta,
                        guidance_scale=guidance_scale, noise="per_seed", extra={"reward_model": reward})
    result = evaluate(models, protocol, toy_scorers(reward), output, load_model=load_toy_model,
                      batch_size=len(prompts), image_dirs={BASE: Path(base_cache)} if base_cache else None,
                      grid_seeds=seeds, grid_cell=64, progress=progress)
    result["base"] = result["results"][BASE]
    if lora_dir is not None:
        result["fine_tuned"] = result["results"]["fine_tuned"]
        result["difference"] = result["differences"]["fine_tuned"]
    result.update(prompts=list(prompts), seeds=seeds, reward_model=reward,
                  grid=str(Path(output) / result["grids"][models[-1].key][0]))
    return result


def base_vs_fine_tuned(saved: dict[str, Any]) -> dict[str, Any]:
    """``base`` / ``fine_tuned`` / ``difference`` of a toy eval.json (spo-eval/1, or the flat
    layout of the toy evaluations before it), for the toy benchmarks."""
    if "results" not in saved:
        return saved
    return {"base": saved["results"]["base"], "fine_tuned": saved["results"]["fine_tuned"],
            "difference": saved["differences"]["fine_tuned"]}


def _method_of(target: str | Path) -> str | None:
    config_file = Path(target) / "config.yaml"
    if not config_file.exists():
        return None
    from ..config import load_config

    return load_config(config_file).objective.name
__all__ = ["EVAL_REWARD", "base_vs_fine_tuned", "evaluate_run", "format_table", "load_toy_model", "resolve_models"]
