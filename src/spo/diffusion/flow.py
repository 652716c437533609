"""The flow-matching SDE step as pure tensor functions (rectified flow: SD3, SD3.5).

A flow model predicts the velocity v = eps - x0 at x_s = (1 - s) x0 + s eps, s = sigma in
[0, 1]. Its sampler (Euler, x_{s'} = x_s + v (s' - s)) is deterministic, so it has no
transition probability for SPO's DPO loss. Flow-GRPO (Liu et al., 2025) replaces it by the
Euler-Maruyama step of an SDE with the same marginals, a Gaussian

    x_{s'} ~ N(mean, (std * sqrt(-dt))^2 I),   dt = s' - s < 0,
    std    = a * sqrt(s / (1 - s))             (s := sigma_max in 1 - s when s = 1),
    mean   = x (1 + std^2 dt / (2 s)) + v (1 + std^2 (1 - s) / (2 s)) dt,

where ``a`` is the noise level (``sampling.eta`` plays this role for flow backbones; 0.7 by
default) and sigma_max is the schedule's second sigma (the first below 1). ``a = 0`` gives the
Euler step exactly. x0_hat = x - s v. Everything runs in at least float32 (bf16/fp16 overflow in
these terms), samples come back in the input's dtype. Values may be per row: ``sigma`` of shape
``(B,)``.
"""

from __future__ import annotations

from torch import Tensor

from .ddim import _compute_dtype, expand_to


def flow_sde_std(sigma: Tensor | float, noise_level: float, sigma_max: float | Tensor) -> Tensor:
    """``std = a * sqrt(s / (1 - s))`` with ``s`` replaced by ``sigma_max`` in ``1 - s`` where s = 1."""
    import torch

    s = torch.as_tensor(sigma)
    s = s if s.is_floating_point() else s.float()
    one_minus = 1 - torch.where(s >= 1, torch.as_tensor(sigma_max, dtype=s.dtype, device=s.device), s)
    return noise_level * (s / one_minus).sqrt()


def flow_x0(velocity: Tensor, x: Tensor, sigma: Tensor | float) -> Tensor:
    """x0_hat = x - s v (in the compute dtype)."""
    dtype = _compute_dtype(x)
    return x.to(dtype) - expand_to(sigma, x) * velocity.to(dtype)


def flow_sde_posterior(
    velocity: Tensor,
    x: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    *,
    noise_level: float,
    sigma_max: float | Tensor,
) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation (``std * sqrt(-dt)``, shape ``(B, 1, ..., 1)`` or 0-d) of the
    SDE transition from ``x`` at ``sigma`` to ``sigma_next``."""
    dtype = _compute_dtype(x)
    s, s_next = expand_to(sigma, x), expand_to(sigma_next, x)
    dt = s_next - s
    std = flow_sde_std(s, noise_level, sigma_max).to(dtype)
    v, xx = velocity.to(dtype), x.to(dtype)
    mean = xx * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
    return mean, std * (-dt).sqrt()
