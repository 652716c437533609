"""Scoring a toy model's samples with the oracles: mean and 95% interval over prompts x seeds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..backbones import Backbone
from ..evaluation.stats import Estimate
from ..sampling import ddim_sample
from .grammar import parse_prompt
from .batched_oracles import aesthetic_batch, alignment_batch, to_oracle_images


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
