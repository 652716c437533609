"""Images for GenEval (djghosh13/geneval), in its folder layout, to be scored in its own environment.

GenEval's detector stack (mmdet 2.x, mmcv-full 1.7, CUDA) cannot be installed beside ours, so
``spo eval --geneval evaluation_metadata.jsonl`` only writes what its ``evaluate_images.py``
reads: ``OUT/<model>/<%05d>/metadata.jsonl`` (the prompt's metadata line) and
``OUT/<model>/<%05d>/samples/<%04d>.png`` (``images_per_prompt`` images, 4 in GenEval's own
generation script), and nothing else inside ``OUT/<model>`` (``OUT/<model>.model.json`` records
what made the images). The same fixed noise per image as ``spo eval``, so it resumes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..backbones import Backbone
from ..data.prompts import PromptsError
from ..files import atomic_write_text
from .evaluate import EvalModel, check_record
from .generate import ImageJob, generate_images


def load_geneval_metadata(path: str | Path) -> list[dict[str, Any]]:
    """GenEval's ``evaluation_metadata.jsonl``: one JSON object with a ``prompt`` per line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PromptsError(f"--geneval {str(p)!r}: no such file")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptsError(f"--geneval {str(p)!r}: line {n} is not JSON: {err}") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise PromptsError(f"--geneval {str(p)!r}: line {n} has no \"prompt\" string")
        rows.append(row)
    if not rows:
        raise PromptsError(f"--geneval {str(p)!r}: no prompt")
    return rows


def write_geneval_images(
    models: Sequence[EvalModel],
    metadata: Sequence[dict[str, Any]],
    output: str | Path,
    *,
    load_model: Callable[[EvalModel], Backbone],
    images_per_prompt: int = 4,
    seed: int = 0,
    num_inference_steps: int = 20,
    eta: float = 1.0,
    guidance_scale: float = 5.0,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Path]:
    """Write every model's images in GenEval's layout under ``output/<model key>``; return the
    folders (each one is what GenEval's ``evaluate_images.py`` takes)."""
    output = Path(output)
    folders = {}
    for model in models:
        folder = output / model.key
        protocol = {"geneval_prompts": len(metadata), "images_per_prompt": images_per_prompt, "seed": seed,
                    "num_inference_steps": num_inference_steps, "eta": eta, "guidance_scale": guidance_scale}
        # the record sits beside the folder: GenEval reads every entry inside it
        check_record(output / f"{model.key}.model.json", {"protocol": protocol, "model": model.identity()})
        for i, row in enumerate(metadata):
            meta = folder / f"{i:05d}" / "metadata.jsonl"
            if not meta.exists():
                atomic_write_text(meta, json.dumps(row) + "\n")
        jobs = [ImageJob(i, s, row["prompt"]) for s in range(images_per_prompt) for i, row in enumerate(metadata)]

        def path_of(job: ImageJob, folder: Path = folder) -> Path:
            return folder / f"{job.prompt_index:05d}" / "samples" / f"{job.seed_index:04d}.png"

        if any(not path_of(j).exists() for j in jobs):
            backbone = load_model(model)
            generate_images(backbone, jobs, path_of, seed=seed, num_inference_steps=num_inference_steps, eta=eta,
                            guidance_scale=guidance_scale, batch_size=batch_size, progress=progress,
                            desc=f"GenEval {model.key}")
            del backbone
        folders[model.key] = folder
    return folders
