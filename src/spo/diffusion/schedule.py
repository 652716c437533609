"""Sampling schedules behind one interface: what the sampler, the objectives and SPM training
ask of "the schedule", whatever the model family.

``DDIMSchedule`` (SD-1.5, SDXL, the toy model) is built from any diffusers scheduler config
(SD-1.5 ships a PNDM config, SDXL an Euler one): the config is read by diffusers' own
``DDIMScheduler`` so the timesteps (spacing, ``steps_offset``) and the final-step convention
(``set_alpha_to_one``) are the model's. ``FlowSDESchedule`` (SD3, the toy flow model) reads a
``FlowMatchEulerDiscreteScheduler`` config and steps with the flow SDE of :mod:`.flow`.
:func:`schedule_from_config` picks by the config's class.

The interface: ``timesteps`` (what the network is called with, descending), ``step`` (draw one
transition: ``eta`` is DDIM's eta, or the flow SDE's noise level), ``posterior`` (its mean and
std, for log-probs), ``predict_x0``, and for training on noised data ``training_timesteps``,
``add_noise`` and ``training_target``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler
from torch import Tensor

from .flow import flow_sde_posterior, flow_x0
from .ddim import (
    PREDICTION_TYPES,
    DDIMStepOutput,
    PredictionType,
    ddim_posterior,
    ddim_step,
    draw_transition,
    expand_to,
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

    def predict_x0(self, model_output: Tensor, t: Tensor | int, x_t: Tensor) -> Tensor:
        """x0_hat from the network's output at timestep(s) ``t`` (not clipped), in fp32 or wider."""
        x0, _ = predict_x0_and_epsilon(model_output, x_t, self.alpha_bar(t).to(x_t.device), self.prediction_type)
        return x0

    # ------------------------------------------------------------------ training on noised data
    def training_timesteps(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` training timesteps, uniform over 0 .. T - 1 (DDPM's training distribution)."""
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, per row, in fp32 (alpha-bar rounded to
        fp16 is ~7% off in sqrt(1 - abar) at small t)."""
        a = expand_to(self.alpha_bar(t).to(x0.device, torch.float32), x0.float())
        return a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network should output at ``add_noise(x0, noise, t)``: eps, or v."""
        if self.prediction_type == "epsilon":
            return noise.float()
        if self.prediction_type == "v_prediction":
            a = expand_to(self.alpha_bar(t).to(x0.device, torch.float32), x0.float())
            return a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()
        raise ValueError(f"training on noised data needs an epsilon or v prediction, not {self.prediction_type!r}")


@dataclass
class FlowSDESchedule:
    """The flow-matching SDE sampler with ``num_inference_steps`` steps (Flow-GRPO's step).

    Attributes:
        sigmas: the scheduler's sigmas, descending, with the terminal 0 appended: ``(N + 1,)``.
        timesteps: what the network is called with, ``sigmas[:-1] * num_train_timesteps`` (floats).
        num_train_timesteps: 1000 for SD3.
        prediction_type: ``"flow"`` (velocity v = eps - x0).
    """

    sigmas: Tensor
    timesteps: Tensor
    num_train_timesteps: int
    prediction_type: str = "flow"

    @classmethod
    def from_config(cls, scheduler_config: Any, num_inference_steps: int) -> "FlowSDESchedule":
        """Build from a ``FlowMatchEulerDiscreteScheduler`` (or its config): its own
        ``set_timesteps`` gives the sigmas (shift included)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = dict(getattr(scheduler_config, "config", scheduler_config))
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        if scheduler.config.use_dynamic_shifting:
            raise ValueError("flow schedulers with dynamic shifting (FLUX: the shift depends on the image size) "
                             "are not supported")
        scheduler.set_timesteps(num_inference_steps)
        return cls(sigmas=scheduler.sigmas.clone().float().cpu(), timesteps=scheduler.timesteps.clone().float().cpu(),
                   num_train_timesteps=int(scheduler.config.num_train_timesteps))

    @property
    def num_inference_steps(self) -> int:
        return int(self.timesteps.numel())

    def step_index(self, t: Tensor | float) -> Tensor | int:
        """Position(s) of timestep(s) ``t`` in ``timesteps`` (an int for a scalar)."""
        tt = torch.as_tensor(t, dtype=torch.float32).cpu()
        flat = tt.reshape(-1)
        gap = (flat[:, None] - self.timesteps[None, :]).abs()
        index = gap.argmin(dim=1)
        if bool((gap.gather(1, index[:, None]) > 1e-3).any()):
            raise ValueError(f"timestep(s) {flat.tolist()} not on this schedule: {self.timesteps.tolist()}")
        return int(index[0]) if tt.ndim == 0 else index.view(tt.shape)

    def sigma_pair(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """``(sigma, sigma_next)`` of the step(s) at timestep(s) ``t``."""
        index = torch.as_tensor(self.step_index(t))
        return self.sigmas[index], self.sigmas[index + 1]

    def posterior(self, model_output: Tensor, t: Tensor | float, x_t: Tensor, *, eta: float = 0.7) -> tuple[Tensor, Tensor]:
        """Mean and std of the SDE transition at timestep(s) ``t``, noise level ``eta``."""
        s, s_next = self.sigma_pair(t)
        return flow_sde_posterior(model_output, x_t, s.to(x_t.device), s_next.to(x_t.device), noise_level=eta,
                                  sigma_max=float(self.sigmas[1]))

    def step(self, model_output: Tensor, t: Tensor | float, x_t: Tensor, *, eta: float = 0.7,
             noise: Tensor | None = None) -> DDIMStepOutput:
        """One SDE step (``eta`` = 0: the Euler step of diffusers' ``FlowMatchEulerDiscreteScheduler``)."""
        mean, std = self.posterior(model_output, t, x_t, eta=eta)
        prev = draw_transition(mean, std, noise, stochastic=eta > 0, what="a flow SDE step with noise level > 0")
        s, _ = self.sigma_pair(t)
        x0 = flow_x0(model_output, x_t, s.to(x_t.device))
        return DDIMStepOutput(prev_sample=prev.to(x_t.dtype), pred_original_sample=x0,
                              pred_epsilon=x0 + model_output.to(x0.dtype), mean=mean, std=std)

    def predict_x0(self, model_output: Tensor, t: Tensor | float, x_t: Tensor) -> Tensor:
        """x0_hat = x - s v at timestep(s) ``t`` (any t: s = t / T)."""
        s = torch.as_tensor(t, dtype=torch.float32).to(x_t.device) / self.num_train_timesteps
        return flow_x0(model_output, x_t, s)

    # ------------------------------------------------------------------ training on noised data
    def training_timesteps(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` training timesteps T * s with s uniform in (0, 1]."""
        return (1 - torch.rand(n, generator=generator)) * self.num_train_timesteps

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_s = (1 - s) x0 + s eps with s = t / T, per row, in fp32."""
        s = expand_to(torch.as_tensor(t, dtype=torch.float32).to(x0.device) / self.num_train_timesteps, x0.float())
        return (1 - s) * x0.float() + s * noise.float()

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The velocity v = eps - x0."""
        return noise.float() - x0.float()


Schedule = DDIMSchedule | FlowSDESchedule

#: scheduler classes whose configs give a flow schedule; every other config gives DDIM
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


def is_flow_config(scheduler: Any) -> bool:
    """Whether ``scheduler`` (a diffusers scheduler, or a config dict that names its
    ``_class_name`` as saved configs do) is a flow-matching scheduler."""
    if hasattr(scheduler, "config"):
        return type(scheduler).__name__ in FLOW_SCHEDULERS
    return dict(scheduler).get("_class_name") in FLOW_SCHEDULERS


def schedule_from_config(scheduler_config: Any, num_inference_steps: int) -> Schedule:
    """The schedule a model's scheduler (or its saved config) implies: flow SDE for
    flow-matching schedulers, DDIM for every other (noise-prediction) scheduler."""
    if is_flow_config(scheduler_config):
        return FlowSDESchedule.from_config(scheduler_config, num_inference_steps)
    return DDIMSchedule.from_config(scheduler_config, num_inference_steps)
