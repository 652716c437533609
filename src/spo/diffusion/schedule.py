"""The DDIM sampling schedule: inference timesteps and alpha-bar look-ups, per row.

``DDIMSchedule`` is built from any diffusers scheduler config (SD-1.5 ships a PNDM config,
SDXL an Euler one): the config is read by diffusers' own ``DDIMScheduler`` so the timesteps
(spacing, ``steps_offset``) and the final-step convention (``set_alpha_to_one``) are the model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler
from torch import Tensor

from .ddim import (
    PREDICTION_TYPES,
    DDIMStepOutput,
    PredictionType,
    ddim_posterior,
    ddim_step,
    predict_x0_and_epsilon,
)


@dataclass
class DDIMSchedule:
    """Timesteps and noise levels of a DDIM sampler with ``num_inference_steps`` steps.

    Attributes:
        alphas_cumprod: alpha-bar for every training timestep, shape ``(num_train_timesteps,)``.
        final_alpha_cumprod: alpha-bar used when the previous timestep is below 0 (1.0 with
            ``set_alpha_to_one``, else alpha-bar at t = 0).
        timesteps: inference timesteps, descending, e.g. 951, 901, ..., 1 for SD-1.5 with 20 steps.
        num_train_timesteps: length T of the training schedule (1000).
        prediction_type: what the network predicts (``epsilon``, ``v_prediction``, ``sample``).
        clip_sample_range: clamp of x0_hat, or ``None`` when the scheduler does not clip.
    """

    alphas_cumprod: Tensor
    final_alpha_cumprod: float
    timesteps: Tensor
    num_train_timesteps: int
    prediction_type: PredictionType = "epsilon"
    clip_sample_range: float | None = None

    @classmethod
    def from_config(cls, scheduler_config: Any, num_inference_steps: int) -> "DDIMSchedule":
        """Build from a diffusers scheduler (or its config) of any class."""
        config = dict(getattr(scheduler_config, "config", scheduler_config))
        # Latent diffusion never clips x0 and SD/SDXL use alpha-bar(0) at the last step; a config
        # that omits these keys (e.g. an Euler config) must not get DDIM's opposite defaults.
        defaults = {"clip_sample": False, "set_alpha_to_one": False}
        declared = set(config) - set(config.get("_use_default_values", []))
        scheduler = DDIMScheduler.from_config(config, **{k: v for k, v in defaults.items() if k not in declared})
        if scheduler.config.thresholding:
            raise ValueError("dynamic thresholding schedulers are not supported by the SPO sampler")
        if scheduler.config.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {scheduler.config.prediction_type!r}")
        scheduler.set_timesteps(num_inference_steps)
        return cls(
            alphas_cumprod=scheduler.alphas_cumprod.clone(),
            final_alpha_cumprod=float(scheduler.final_alpha_cumprod),
            timesteps=scheduler.timesteps.clone().long(),
            num_train_timesteps=int(scheduler.config.num_train_timesteps),
            prediction_type=scheduler.config.prediction_type,
            clip_sample_range=(
                float(scheduler.config.clip_sample_range) if scheduler.config.clip_sample else None
            ),
        )

    @property
    def num_inference_steps(self) -> int:
        return int(self.timesteps.numel())

    @property
    def step_ratio(self) -> int:
        """Gap between consecutive inference timesteps (T // num_inference_steps), as diffusers."""
        return self.num_train_timesteps // self.num_inference_steps

    def previous_timestep(self, t: Tensor | int) -> Tensor:
        """t - step_ratio (may be negative at the last step: then ``final_alpha_cumprod`` applies)."""
        return torch.as_tensor(t).long() - self.step_ratio

    def alpha_bar(self, t: Tensor | int) -> Tensor:
        """alpha-bar at timestep(s) ``t``; negative t gives ``final_alpha_cumprod``."""
        t = torch.as_tensor(t).long().cpu()
        if bool((t >= self.num_train_timesteps).any()):
            raise ValueError(f"timestep beyond the schedule (T = {self.num_train_timesteps}): {t}")
        values = self.alphas_cumprod[t.clamp(min=0)]
        return torch.where(t >= 0, values, torch.full_like(values, self.final_alpha_cumprod))

    def alpha_bars(self, t: Tensor | int) -> tuple[Tensor, Tensor]:
        """``(alpha_bar_t, alpha_bar_prev)`` for timestep(s) ``t``."""
        return self.alpha_bar(t), self.alpha_bar(self.previous_timestep(t))

    def step(
        self,
        model_output: Tensor,
        t: Tensor | int,
        x_t: Tensor,
        *,
        eta: float = 1.0,
        noise: Tensor | None = None,
    ) -> DDIMStepOutput:
        """One DDIM step at timestep(s) ``t`` (scalar or one per row)."""
        a_t, a_prev = self.alpha_bars(t)
        return ddim_step(
            model_output,
            x_t,
            a_t.to(x_t.device),
            a_prev.to(x_t.device),
            eta=eta,
            prediction_type=self.prediction_type,
            noise=noise,
            clip_sample_range=self.clip_sample_range,
        )

    def posterior(self, model_output: Tensor, t: Tensor | int, x_t: Tensor, *, eta: float = 1.0) -> tuple[Tensor, Tensor]:
        """Mean mu and sigma_t of p(x_{t-1} | x_t) at timestep(s) ``t``: what log-probs need."""
        a_t, a_prev = self.alpha_bars(t)
        x0, eps = predict_x0_and_epsilon(model_output, x_t, a_t.to(x_t.device), self.prediction_type)
        if self.clip_sample_range is not None:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return ddim_posterior(x0, eps, a_t.to(x_t.device), a_prev.to(x_t.device), eta)

    def step_index(self, t: int) -> int:
        """Position of timestep ``t`` in ``timesteps``."""
        hits = (self.timesteps == int(t)).nonzero()
        if hits.numel() == 0:
            raise ValueError(f"timestep {t} is not on this schedule: {self.timesteps.tolist()}")
        return int(hits[0, 0])
