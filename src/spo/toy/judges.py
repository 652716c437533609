"""Judges for the toy world's experiments: who scores a pool's candidates.

A judge is a :data:`spo.sampling.Scorer` (images in [-1, 1], prompts, timesteps -> raw scores,
read by the tie rule as logits). Besides the shipped reward models (any ``toy:`` reference or
model directory, loaded as a step-aware preference model of the given variant) there are two
controls, never a default of any command:

- ``ideal-aesthetic``: the aesthetic oracle itself, score = log aesthetic (minus the sum of its
  scaled defects), so the tie rule compares aesthetic *ratios*: with the toy threshold 0.07 a pair
  counts when the better candidate's aesthetic is at least 15% higher. What SPO could do with a
  judge that knows exactly what the evaluation measures.
- ``random``: seeded uniform scores (every pool's pair is random): what moving the LoRA does with
  pairs that carry no information.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .batched_oracles import aesthetic_defects_batch, to_oracle_images
from .oracles import EXCESS_SCALE, NOISE_SCALE, OFF_LINE_SCALE

#: controls by name; everything else is a reward model (see :func:`load_judge`)
CONTROL_JUDGES = ("ideal-aesthetic", "random")


class AestheticOracleJudge:
    """The ideal aesthetic judge: log aesthetic oracle of each image (timesteps ignored)."""

    def __call__(self, images: Tensor, prompts: Sequence[str], timesteps: Tensor | None = None) -> Tensor:
        d = aesthetic_defects_batch(to_oracle_images(images))
        log_aesthetic = -(d["noise"] / NOISE_SCALE + d["off_line"] / OFF_LINE_SCALE + d["excess"] / EXCESS_SCALE)
        return log_aesthetic.float().to(images.device)


class RandomJudge:
    """Uniform scores in [0, 10) from a seeded generator: best and worst are random."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: Tensor, prompts: Sequence[str], timesteps: Tensor | None = None) -> Tensor:
        return (torch.rand(images.shape[0], generator=self.generator) * 10).to(images.device)


def load_judge(name: str, *, variant: str = "step_aware", seed: int = 0, device: str = "cpu") -> Any:
    """A judge by name: ``ideal-aesthetic``, ``random`` (seeded by ``seed``), or a reward model
    (``toy:spm``, ``toy:pickscore``, a directory...) loaded as a step-aware preference model of
    ``variant`` (``clean`` scores every image as at t = 0: the clean reward model)."""
    if name == "ideal-aesthetic":
        return AestheticOracleJudge()
    if name == "random":
        return RandomJudge(seed)
    from ..preference import StepAwarePreferenceModel

    return StepAwarePreferenceModel.from_pretrained(name, None, variant=variant, device=device)
