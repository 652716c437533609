"""Shared by the trainer tests: the prompts they train on and a fixed, learnable scorer."""

from __future__ import annotations

import torch

PROMPTS = ["a red circle", "a blue square", "two green triangles", "a yellow star", "a purple cat", "an orange dog"]


def brightness(images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor) -> torch.Tensor:
    """A fixed, learnable preference (or reward): brighter images win."""
    return images.mean(dim=(1, 2, 3)) * 100
