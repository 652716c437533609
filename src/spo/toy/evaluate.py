"""Scoring a toy model's samples with the oracles: mean and 95% interval over prompts x seeds."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..backbones import Backbone
from ..sampling import ddim_sample
from .grammar import parse_prompt
from .batched_oracles import aesthetic_batch, alignment_batch, to_oracle_images


@dataclass
class Estimate:
    """Mean with a normal-approximation 95% interval (1.96 standard errors)."""

    mean: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Estimate":
        arr = np.asarray(values, dtype=np.float64)
        half = 1.96 * arr.std(ddof=1) / math.sqrt(len(arr)) if len(arr) > 1 else float("nan")
        return cls(float(arr.mean()), float(arr.mean() - half), float(arr.mean() + half), len(arr))

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


@torch.no_grad()
def sample_and_score(
    backbone: Backbone,
    prompts: Sequence[str],
    *,
    seeds: int = 3,
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
    eta: float = 1.0,
    base_seed: int = 0,
    reward: Any = None,
) -> tuple[torch.Tensor, dict[str, Estimate], dict[str, list[float]]]:
    """Sample every prompt once per seed (fixed generators) and score with both oracles and, when
    given, a ``reward`` model (a :class:`~spo.preference.CLIPScorer`: the toy PickScore).

    Returns the images (seeds x prompts, in [-1, 1]), the estimates and the per-image scores
    (seed-major, for paired comparisons)."""
    for p in prompts:
        parse_prompt(p)  # a prompt outside the grammar fails here, named
    images = []
    for seed in range(seeds):
        latents = ddim_sample(backbone, list(prompts), num_inference_steps=num_inference_steps, eta=eta,
                              guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(base_seed + seed))
        images.append(backbone.decode(latents).cpu())
    all_images = torch.cat(images)
    pictures = to_oracle_images(all_images)
    all_prompts = list(prompts) * seeds
    values: dict[str, list[float]] = {}
    if reward is not None:
        values["pickscore"] = [float(v) for v in reward(all_images, all_prompts)]
    values["aesthetic"] = aesthetic_batch(pictures).tolist()
    values["alignment"] = alignment_batch(pictures, all_prompts).tolist()
    return all_images, {name: Estimate.of(v) for name, v in values.items()}, values
