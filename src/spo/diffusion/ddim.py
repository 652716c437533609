"""The stochastic DDIM step as pure tensor functions.

One DDIM transition x_t -> x_{t-1} (Song et al., 2021, eq. 12) is a Gaussian

    x_{t-1} ~ N(mu_theta(x_t, t), sigma_t^2 I),
    mu      = sqrt(abar_prev) * x0_hat + sqrt(1 - abar_prev - sigma_t^2) * eps_hat,
    sigma_t = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)),

where ``abar`` is the cumulative product of the noise schedule's alphas (``alpha_bar``) and
(x0_hat, eps_hat) come from the network's output. Sampling (candidate pools) and training (the
log-probabilities of win and lose transitions) both use these functions, so the two can never
disagree. Every function accepts per-row timesteps: ``alpha_bar_t`` may be a scalar or a tensor of
shape ``(B,)``.

Arithmetic runs in at least float32 (float64 stays float64); samples are returned in the input's
dtype, log-probabilities in the computation dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

PredictionType = Literal["epsilon", "v_prediction", "sample"]
Reduction = Literal["mean", "sum", "none"]

PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def expand_to(value: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast a scalar or a per-row ``(B,)`` tensor to ``like``'s rank: shape ``(B, 1, ..., 1)``."""
    dtype = _compute_dtype(like)
    value = torch.as_tensor(value, device=like.device, dtype=dtype)
    if value.ndim == 0:
        return value
    if value.ndim != 1 or value.shape[0] != like.shape[0]:
        raise ValueError(
            f"per-row schedule values must have shape ({like.shape[0]},), got {tuple(value.shape)}"
        )
    return value.reshape(-1, *([1] * (like.ndim - 1)))


def predict_x0_and_epsilon(
    model_output: Tensor,
    x_t: Tensor,
    alpha_bar_t: Tensor | float,
    prediction_type: PredictionType = "epsilon",
) -> tuple[Tensor, Tensor]:
    """Return ``(x0_hat, eps_hat)`` from the network's output at ``x_t``.

    ``prediction_type`` is the diffusers name of what the network predicts: ``"epsilon"`` (noise),
    ``"v_prediction"`` (v = sqrt(abar) eps - sqrt(1 - abar) x0) or ``"sample"`` (x0 itself).
    """
    dtype = _compute_dtype(x_t)
    out = model_output.to(dtype)
    x = x_t.to(dtype)
    a = expand_to(alpha_bar_t, x)
    sqrt_a, sqrt_1ma = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "epsilon":
        eps = out
        x0 = (x - sqrt_1ma * eps) / sqrt_a
    elif prediction_type == "sample":
        x0 = out
        eps = (x - sqrt_a * x0) / sqrt_1ma
    elif prediction_type == "v_prediction":
        x0 = sqrt_a * x - sqrt_1ma * out
        eps = sqrt_a * out + sqrt_1ma * x
    else:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}"
        )
    return x0, eps


def epsilon_from_x0(x0: Tensor, x_t: Tensor, alpha_bar_t: Tensor | float) -> Tensor:
    """The noise implied by ``x0`` at ``x_t``: (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
    a = expand_to(alpha_bar_t, x_t)
    return (x_t.to(a.dtype) - a.sqrt() * x0.to(a.dtype)) / (1 - a).sqrt()


def ddim_variance(alpha_bar_t: Tensor | float, alpha_bar_prev: Tensor | float) -> Tensor:
    """sigma_t^2 / eta^2 = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)."""
    a_t = torch.as_tensor(alpha_bar_t)
    a_prev = torch.as_tensor(alpha_bar_prev, dtype=a_t.dtype if a_t.is_floating_point() else None)
    return (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)


def ddim_posterior(
    x0: Tensor,
    epsilon: Tensor,
    alpha_bar_t: Tensor | float,
    alpha_bar_prev: Tensor | float,
    eta: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Mean ``mu`` and standard deviation ``sigma_t`` of the DDIM transition p(x_{t-1} | x_t).

    ``sigma_t`` has shape ``(B, 1, ..., 1)`` (or is 0-d for scalar schedule values).
    """
    dtype = _compute_dtype(x0)
    a_t = expand_to(alpha_bar_t, x0)
    a_prev = expand_to(alpha_bar_prev, x0)
    std = eta * ddim_variance(a_t, a_prev).clamp(min=0).sqrt()
    direction = (1 - a_prev - std**2).clamp(min=0).sqrt()
    mean = a_prev.sqrt() * x0.to(dtype) + direction * epsilon.to(dtype)
    return mean, std


def ddim_log_prob(
    x_prev: Tensor, mean: Tensor, std: Tensor | float, reduction: Reduction = "mean"
) -> Tensor:
    """Gaussian log-density log N(x_prev; mean, std^2 I) of a DDIM transition.

    ``reduction="mean"`` (the release's choice, which fixes the scale beta acts on) averages the
    per-element log-density over all non-batch dimensions; ``"sum"`` gives the exact log-density
    of the whole latent; ``"none"`` returns it per element.
    """
    dtype = _compute_dtype(mean)
    std_t = torch.as_tensor(std, device=mean.device, dtype=dtype)
    if std_t.ndim == 1:
        std_t = expand_to(std_t, mean)
    if bool((std_t <= 0).any()):
        raise ValueError(
            "the DDIM transition is deterministic (sigma_t = 0: eta = 0, or a final step with "
            "set_alpha_to_one); its log-probability is undefined"
        )
    diff = x_prev.to(dtype) - mean.to(dtype)
    log_prob = -(diff**2) / (2 * std_t**2) - std_t.log() - 0.5 * math.log(2 * math.pi)
    if reduction == "none":
        return log_prob
    dims = tuple(range(1, log_prob.ndim))
    if reduction == "mean":
        return log_prob.mean(dim=dims)
    if reduction == "sum":
        return log_prob.sum(dim=dims)
    raise ValueError(f"unknown reduction {reduction!r}; expected 'mean', 'sum' or 'none'")


def draw_transition(mean: Tensor, std: Tensor, noise: Tensor | None, *, stochastic: bool, what: str) -> Tensor:
    """x' = mean + std * noise for a stochastic step (``noise`` standard normal, owned by the
    caller so that sampling and diffusers stay in step), or the mean for a deterministic one."""
    if not stochastic:
        return mean
    if noise is None:
        raise ValueError(f"{what} needs `noise` (a standard-normal tensor)")
    return mean + std * noise.to(mean.dtype)


@dataclass
class DDIMStepOutput:
    """One DDIM transition: the drawn ``prev_sample`` and everything needed to score or train it."""

    prev_sample: Tensor
    pred_original_sample: Tensor
    pred_epsilon: Tensor
    mean: Tensor
    std: Tensor


def ddim_step(
    model_output: Tensor,
    x_t: Tensor,
    alpha_bar_t: Tensor | float,
    alpha_bar_prev: Tensor | float,
    *,
    eta: float = 1.0,
    prediction_type: PredictionType = "epsilon",
    noise: Tensor | None = None,
    clip_sample_range: float | None = None,
) -> DDIMStepOutput:
    """One stochastic DDIM step x_t -> x_{t-1} = mu + sigma_t * noise.

    ``noise`` is the standard-normal draw (``None`` with ``eta > 0`` is an error: the caller owns
    the randomness, so sampling and diffusers stay in step). ``clip_sample_range`` clamps x0_hat as
    diffusers' ``clip_sample`` does (epsilon is not recomputed, as in diffusers' default).
    """
    x0, eps = predict_x0_and_epsilon(model_output, x_t, alpha_bar_t, prediction_type)
    if clip_sample_range is not None:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    mean, std = ddim_posterior(x0, eps, alpha_bar_t, alpha_bar_prev, eta)
    prev = draw_transition(mean, std, noise if eta > 0 else None, stochastic=eta > 0, what="ddim_step with eta > 0")
    return DDIMStepOutput(
        prev_sample=prev.to(x_t.dtype),
        pred_original_sample=x0,
        pred_epsilon=eps,
        mean=mean,
        std=std,
    )
