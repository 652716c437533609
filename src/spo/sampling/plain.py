"""Plain stochastic DDIM sampling through a backbone (no candidate pools)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..backbones import Backbone, Conditioning


@torch.no_grad()
def ddim_sample(
    backbone: Backbone,
    prompts: Sequence[str] | Conditioning,
    *,
    num_inference_steps: int = 20,
    eta: float = 1.0,
    guidance_scale: float = 5.0,
    latents: Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    start_step: int = 0,
) -> Tensor:
    """Sample x_0 latents with DDIM from x_T, or finish from ``latents`` at the schedule's
    ``start_step``-th timestep (a continuation: ``latents`` is x_t at that timestep).

    Noise is drawn as the diffusers pipelines draw it (x_T first if ``latents`` is None, then one
    standard-normal tensor per step from ``generator``), so the same seed gives the same latents
    as ``pipeline(..., eta=eta, generator=generator, output_type="latent")``.
    """
    if start_step and latents is None:
        raise ValueError("ddim_sample: start_step needs the latents x_t to continue from")
    from diffusers.utils.torch_utils import randn_tensor

    cond = prompts if isinstance(prompts, Conditioning) else backbone.encode_prompts(
        list(prompts), with_negative=guidance_scale > 1.0
    )
    x = backbone.initial_latents(len(cond), generator) if latents is None else latents.to(backbone.device, backbone.dtype)
    schedule = backbone.schedule(num_inference_steps)
    for t in tqdm(schedule.timesteps.tolist()[start_step:], desc="DDIM", disable=not progress, leave=False):
        out = backbone.predict(x, t, cond, guidance_scale)
        noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=out.dtype) if eta > 0 else None
        x = schedule.step(out, t, x, eta=eta, noise=noise).prev_sample
    return x
