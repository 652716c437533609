"""Generate images for a prompt set with fixed seeds, through a backbone, and write them out."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..backbones import Backbone, load_backbone
from ..config import SPOConfig
from ..images import image_grid, save_images, to_pil
from ..sampling import ddim_sample


@dataclass
class GenerationResult:
    """Where the images went and how long it took."""

    output: Path
    grid: Path
    num_images: int
    seconds: float


@torch.no_grad()
def generate(
    config: SPOConfig,
    prompts: Sequence[str],
    output: str | Path,
    *,
    seeds: int = 1,
    batch_size: int = 8,
    backbone: Backbone | None = None,
    grid_cell: int | None = None,
) -> GenerationResult:
    """Sample every prompt once per seed (seed = ``config.seed + i``) with the config's DDIM
    settings; write ``images/``, a grid (one row per seed) and ``generation.json``."""
    start = time.perf_counter()
    output = Path(output)
    backbone = backbone or load_backbone(config.model, config.sampling.negative_prompt)
    s = config.sampling
    rows: list[torch.Tensor] = []
    jobs = [(i, j) for i in range(seeds) for j in range(0, len(prompts), batch_size)]
    for seed_index, start_index in tqdm(jobs, desc="generating", unit="batch"):
        # one generator per (seed, batch): the same images whatever ran before
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + seed_index * 10_007 + start_index)
        latents = ddim_sample(
            backbone,
            list(prompts[start_index : start_index + batch_size]),
            num_inference_steps=s.num_inference_steps,
            eta=s.eta,
            guidance_scale=s.guidance_scale,
            generator=generator,
        )
        rows.append(backbone.decode(latents).cpu())
    images = torch.cat(rows)
    save_images(images, output / "images")
    grid_path = output / "grid.png"
    image_grid(to_pil(images), cols=len(prompts), cell=grid_cell).save(grid_path)
    seconds = time.perf_counter() - start
    (output / "generation.json").write_text(
        json.dumps(
            {
                "model": config.model.pretrained,
                "prompts": list(prompts),
                "seeds": seeds,
                "seed": config.seed,
                "num_inference_steps": s.num_inference_steps,
                "eta": s.eta,
                "guidance_scale": s.guidance_scale,
                "seconds": round(seconds, 3),
            },
            indent=2,
        )
    )
    return GenerationResult(output=output, grid=grid_path, num_images=len(images), seconds=seconds)
