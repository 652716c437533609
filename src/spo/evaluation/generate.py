"""Generate images for a prompt set with fixed seeds, through a backbone, and write them out.

:func:`generate_images` is the evaluation's generator: each image (prompt i, seed s) has its own
noise, drawn from a generator seeded by (seed, s, i) alone, so an image does not depend on its
batch, on the batch size or on what ran before; base and fine-tuned models get the same noise;
images are written as they are made, so an interrupted evaluation resumes without redoing them.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..backbones import Backbone, load_backbone
from ..config import SPOConfig
from ..errors import SPOError
from ..files import atomic_path
from ..images import image_grid, save_images, to_pil
from ..sampling import ddim_sample
from ..training.output import output_problem

#: ``per_image``: one generator per image (any batch size gives the same images);
#: ``per_seed``: one generator per seed drawing the whole prompt set as one batch (the toy
#: world's evaluations were measured this way, so they stay reproducible)
NOISE_LAYOUTS = ("per_image", "per_seed")


class EvaluationError(SPOError, RuntimeError):
    """An evaluation that cannot go on (e.g. its directory holds another evaluation's images)."""


@dataclass(frozen=True)
class ImageJob:
    """One image to make: prompt ``prompt_index`` with seed ``seed_index``."""

    prompt_index: int
    seed_index: int
    prompt: str

    @property
    def name(self) -> str:
        return f"p{self.prompt_index:05d}_s{self.seed_index:02d}.png"


def image_seed(seed: int, seed_index: int, prompt_index: int) -> int:
    """The seed of image (prompt_index, seed_index) of an evaluation seeded ``seed``."""
    digest = hashlib.sha256(f"spo-eval/{seed}/{seed_index}/{prompt_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def write_png_atomic(image: Tensor, path: Path) -> None:
    """Save one image in [-1, 1] as PNG through a temporary file, so a kill leaves no half file."""
    with atomic_path(path) as tmp:
        to_pil(image[None])[0].save(tmp, format="PNG")


@torch.no_grad()
def generate_images(
    backbone: Backbone,
    jobs: Sequence[ImageJob],
    path_of: Callable[[ImageJob], Path],
    *,
    seed: int,
    num_inference_steps: int,
    eta: float,
    guidance_scale: float,
    noise: str = "per_image",
    batch_size: int = 8,
    on_batch: Callable[[Sequence[ImageJob], Tensor], None] | None = None,
    progress: bool = True,
    desc: str = "generating",
    skip_existing: bool = True,
) -> int:
    """Make every job whose file (``path_of(job)``) is missing (every job without
    ``skip_existing``); return how many were made.

    ``on_batch(jobs, images)`` sees each batch (images in [-1, 1], on the CPU) before its files
    are written (the evaluator scores them there). With ``noise="per_seed"`` ``jobs`` must hold
    the whole prompt set for each seed; a seed with any image missing is made again whole.
    """
    if noise not in NOISE_LAYOUTS:
        raise ValueError(f"noise must be one of {NOISE_LAYOUTS}, not {noise!r}")
    def missing(job: ImageJob) -> bool:
        return not skip_existing or not path_of(job).exists()

    if noise == "per_image":
        todo = [j for j in jobs if missing(j)]
        batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    else:
        by_seed: dict[int, list[ImageJob]] = {}
        for j in jobs:
            by_seed.setdefault(j.seed_index, []).append(j)
        batches = [sorted(js, key=lambda j: j.prompt_index) for js in by_seed.values()
                   if any(missing(j) for j in js)]
    made = 0
    bar = tqdm(total=sum(len(b) for b in batches), desc=desc, unit="image", disable=not progress)
    for batch in batches:
        if noise == "per_image":
            generator: torch.Generator | list[torch.Generator] = [
                torch.Generator().manual_seed(image_seed(seed, j.seed_index, j.prompt_index)) for j in batch
            ]
        else:
            generator = torch.Generator().manual_seed(seed + batch[0].seed_index)
        latents = ddim_sample(backbone, [j.prompt for j in batch], num_inference_steps=num_inference_steps,
                              eta=eta, guidance_scale=guidance_scale, generator=generator)
        images = backbone.decode(latents).float().cpu()
        if on_batch is not None:
            on_batch(batch, images)
        for job, image in zip(batch, images):
            write_png_atomic(image, path_of(job))
        made += len(batch)
        bar.update(len(batch))
    bar.close()
    return made


def load_png(path: str | Path) -> Tensor:
    """A PNG as (3, H, W) floats in [-1, 1]."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1


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
    """``spo sample``: every prompt once per seed with the config's DDIM settings, the same noise
    per image as ``spo eval``; write ``images/``, a grid (one row per seed) and ``generation.json``."""
    start = time.perf_counter()
    output = Path(output)
    problem = output_problem(output, resume=True)  # (a rerun rewrites its own images)
    if problem:
        raise EvaluationError(problem)
    backbone = backbone or load_backbone(config.model, config.sampling.negative_prompt)
    s = config.sampling
    jobs = [ImageJob(i, k, p) for k in range(seeds) for i, p in enumerate(prompts)]
    rows: list[Tensor] = []
    def path_of(job: ImageJob) -> Path:  # image_NNNN.png, seed-major, as spo sample has always named them
        return output / "images" / f"image_{job.seed_index * len(prompts) + job.prompt_index:04d}.png"

    generate_images(backbone, jobs, path_of, seed=config.seed,
                    num_inference_steps=s.num_inference_steps, eta=s.eta, guidance_scale=s.guidance_scale,
                    batch_size=batch_size, on_batch=lambda _, images: rows.append(images), skip_existing=False)
    images = torch.cat(rows)
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
                "noise": "per_image",
                "seconds": round(seconds, 3),
            },
            indent=2,
        )
    )
    return GenerationResult(output=output, grid=grid_path, num_images=len(images), seconds=seconds)


__all__ = ["GenerationResult", "ImageJob", "NOISE_LAYOUTS", "generate", "generate_images", "image_seed", "load_png",
           "save_images", "write_png_atomic"]
