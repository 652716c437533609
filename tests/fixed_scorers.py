"""Shared by the trainer tests: the prompts they train on and a fixed, learnable scorer."""

from __future__ import annotations

import torch

PROMPTS = ["a red circle", "a blue square", "two green triangles", "a yellow star", "a purple cat", "an orange dog"]


def brightness(images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor) -> torch.Tensor:
    """A fixed, learnable preference (or reward): brighter images win."""
    return images.mean(dim=(1, 2, 3)) * 100


class LatentBrightness:
    """A fixed, learnable preference of latents (LPO's judge reads x_{t-1} at t, never decoded
    images): the brighter latent wins. ``calls`` keeps (batch rows, timesteps) of each call."""

    takes_latents = True

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[int]]] = []

    def __call__(self, latents: torch.Tensor, prompts: list[str], timesteps: torch.Tensor) -> torch.Tensor:
        assert latents.ndim == 4 and len(prompts) == latents.shape[0] == timesteps.shape[0]
        self.calls.append((latents.shape[0], [int(t) for t in timesteps.tolist()]))
        return latents.float().mean(dim=(1, 2, 3)) * 100
