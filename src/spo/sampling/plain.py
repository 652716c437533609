"""Plain stochastic DDIM sampling through a backbone (no candidate pools)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..backbones import Backbone, Conditioning
from ..diffusion import ddim_log_prob


@dataclass
class Trajectory:
    """A sampled trajectory batch: ``states`` (B, n + 1, ...) = x_T (or the start) .. x_0,
    ``timesteps`` (n,) the t of each transition states[:, i] -> states[:, i + 1], and
    ``log_probs`` (B, n) the log-density of each transition under the policy that drew it
    (per-element mean by default, as the objectives use). What DDPO trains on."""

    states: Tensor
    timesteps: Tensor
    log_probs: Tensor

    @property
    def latents(self) -> Tensor:
        return self.states[:, -1]


def _generators(generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Generator | list[torch.Generator] | None:
    return list(generator) if isinstance(generator, (list, tuple)) else generator


@torch.no_grad()
def ddim_sample(
    backbone: Backbone,
    prompts: Sequence[str] | Conditioning,
    *,
    num_inference_steps: int = 20,
    eta: float = 1.0,
    guidance_scale: float = 5.0,
    latents: Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    progress: bool = False,
    start_step: int = 0,
    return_trajectory: bool = False,
    log_prob_reduction: str = "mean",
) -> Tensor | Trajectory:
    """Sample x_0 latents with DDIM from x_T, or finish from ``latents`` at the schedule's
    ``start_step``-th timestep (a continuation: ``latents`` is x_t at that timestep).

    Noise is drawn as the diffusers pipelines draw it (x_T first if ``latents`` is None, then one
    standard-normal tensor per step from ``generator``), so the same seed gives the same latents
    as ``pipeline(..., eta=eta, generator=generator, output_type="latent")``.

    ``return_trajectory``: return a :class:`Trajectory` (every state and each transition's
    log-probability, ``log_prob_reduction`` over the non-batch dimensions) instead of x_0.

    ``generator`` may be a list with one generator per row (as in diffusers): each row's noise
    then depends only on its own generator, so an image does not depend on its batch.
    """
    if start_step and latents is None:
        raise ValueError("ddim_sample: start_step needs the latents x_t to continue from")
    from diffusers.utils.torch_utils import randn_tensor

    cond = prompts if isinstance(prompts, Conditioning) else backbone.encode_prompts(
        list(prompts), with_negative=guidance_scale > 1.0
    )
    x = backbone.initial_latents(len(cond), _generators(generator)) if latents is None else latents.to(backbone.device, backbone.dtype)
    schedule = backbone.schedule(num_inference_steps)
    if return_trajectory and eta <= 0:
        raise ValueError("ddim_sample: a trajectory's log-probabilities need eta > 0")
    timesteps = schedule.timesteps.tolist()[start_step:]
    states, log_probs = [x], []
    for t in tqdm(timesteps, desc="DDIM", disable=not progress, leave=False):
        out = backbone.predict(x, t, cond, guidance_scale)
        noise = randn_tensor(x.shape, generator=_generators(generator), device=x.device, dtype=out.dtype) if eta > 0 else None
        step = schedule.step(out, t, x, eta=eta, noise=noise)
        if return_trajectory:
            log_probs.append(ddim_log_prob(step.prev_sample, step.mean, step.std, reduction=log_prob_reduction))
            states.append(step.prev_sample)
        x = step.prev_sample
    if return_trajectory:
        return Trajectory(
            states=torch.stack(states, dim=1),
            timesteps=torch.tensor(timesteps, dtype=schedule.timesteps.dtype),
            log_probs=torch.stack(log_probs, dim=1) if log_probs else x.new_zeros(x.shape[0], 0),
        )
    return x
