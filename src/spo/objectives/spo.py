"""The SPO objective: a DPO loss on single DDIM transitions with clamped likelihood ratios.

For a win/lose pair of transitions x_t -> x_{t-1}^w and x_t -> x_{t-1}^l,

    r_w = p_theta(x_{t-1}^w | x_t, c) / p_ref(x_{t-1}^w | x_t, c)   (likewise r_l),
    loss = -log sigmoid(beta * log clamp(r_w, 1 - eps, 1 + eps) - beta * log clamp(r_l, 1 - eps, 1 + eps)),

with p the Gaussian of the stochastic DDIM step (per-element mean log-density by default), the
policy = UNet with LoRA on and the reference = the same UNet with adapters off, both with
classifier-free guidance as during sampling. The clamp (``eps``; None disables it) stops the
gradient once a ratio leaves the band: a trust region.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backbones import Backbone, Conditioning
from ..config import ObjectiveConfig, SPOConfig
from ..diffusion import Schedule, ddim_log_prob
from ..sampling import PoolSampler
from ..sampling.records import TransitionRecords
from .base import Collected, Curve, Method


@dataclass
class SPOMethodConfig(ObjectiveConfig):
    """SPO's settings (``objective.*`` with ``objective.name: spo``); the pools are ``pools.*``.

    Attributes:
        beta: Temperature ``beta`` of the DPO-style loss on the win/lose log-probability ratios
            (the release: 10).
        eps: Clamp of the policy/reference probability ratio to ``[1 - eps, 1 + eps]``; ``None``
            disables clamping.
        logprob_reduction: How per-element Gaussian log-probabilities of a step are reduced over
            latent dimensions (``"mean"`` as in the release, or ``"sum"``).
        cfg: Apply classifier-free guidance inside the policy/reference log-probability model
            during training, matching how the samples were generated.
    """

    name: str = "spo"
    beta: float = 10.0
    eps: float | None = 0.1
    logprob_reduction: Literal["mean", "sum"] = "mean"
    cfg: bool = True

    def loss_problems(self) -> list[str]:
        """The clamped-ratio DPO loss's rules (SPO's and D3PO's)."""
        problems = []
        if not self.beta > 0:
            problems.append(f"objective.beta must be > 0, got {self.beta!r}")
        if self.eps is not None and not 0 < self.eps < 1:
            problems.append(f"objective.eps must be null (no clamp) or satisfy 0 < eps < 1, got {self.eps!r}")
        return problems

    def problems(self, config: SPOConfig) -> list[str]:
        s, p = config.sampling, config.pools
        problems = []
        if not p.inner_steps <= s.num_inference_steps:
            problems.append(f"pools.inner_steps ({p.inner_steps}) must not exceed "
                            f"sampling.num_inference_steps ({s.num_inference_steps})")
        if not 0 <= p.divert_start_step < s.num_inference_steps:
            problems.append(f"pools.divert_start_step must satisfy 0 <= divert_start_step < "
                            f"sampling.num_inference_steps ({s.num_inference_steps}), got {p.divert_start_step!r}")
        if p.kappa is not None and not 0 <= p.kappa <= s.num_train_timesteps - 1:
            problems.append(f"pools.kappa={p.kappa!r} is beyond the schedule: it must be in "
                            f"[0, sampling.num_train_timesteps - 1] = [0, {s.num_train_timesteps - 1}]")
        return problems + self.loss_problems()


@dataclass
class SPOLossOutput:
    """The loss (a scalar) and per-pair log-ratios, plus float diagnostics for logging."""

    loss: Tensor
    log_ratio_win: Tensor
    log_ratio_lose: Tensor
    metrics: dict[str, float]


def spo_loss(
    logp_win: Tensor,
    logp_win_ref: Tensor,
    logp_lose: Tensor,
    logp_lose_ref: Tensor,
    *,
    beta: float = 10.0,
    eps: float | None = 0.1,
) -> SPOLossOutput:
    """The clamped-ratio DPO loss from per-pair log-probs under policy and reference.

    Diagnostics (unclamped ratios, so they keep moving after the clamp saturates):
    ``ratio_win`` / ``ratio_lose`` (mean r), ``clamp_fraction`` (share of the 2N ratios outside
    [1 - eps, 1 + eps]), ``reward_accuracy`` (share of pairs with beta * (log r_w - log r_l) > 0),
    ``reward_margin`` (its mean).
    """
    log_r_w = logp_win - logp_win_ref.detach()
    log_r_l = logp_lose - logp_lose_ref.detach()
    if eps is not None:
        lo, hi = math.log(1 - eps), math.log(1 + eps)
        clamped_w, clamped_l = log_r_w.clamp(lo, hi), log_r_l.clamp(lo, hi)
        outside = ((log_r_w < lo) | (log_r_w > hi)).float().sum() + ((log_r_l < lo) | (log_r_l > hi)).float().sum()
        clamp_fraction = float(outside) / (2 * max(1, log_r_w.numel()))
    else:
        clamped_w, clamped_l, clamp_fraction = log_r_w, log_r_l, 0.0
    logits = beta * (clamped_w - clamped_l)
    loss = -F.logsigmoid(logits).mean()
    with torch.no_grad():
        margin = beta * (log_r_w - log_r_l)
        metrics = {
            "loss": float(loss),
            "ratio_win": float(log_r_w.exp().mean()),
            "ratio_lose": float(log_r_l.exp().mean()),
            "clamp_fraction": clamp_fraction,
            "reward_accuracy": float((margin > 0).float().mean()),
            "reward_margin": float(margin.mean()),
        }
    return SPOLossOutput(loss=loss, log_ratio_win=log_r_w, log_ratio_lose=log_r_l, metrics=metrics)


def step_log_probs(
    backbone: Backbone,
    schedule: Schedule,
    cond: Conditioning,
    timesteps: Tensor,
    x_t: Tensor,
    x_prev: Tensor,
    *,
    guidance_scale: float,
    eta: float = 1.0,
    reduction: str = "mean",
    reference: bool = False,
) -> Tensor:
    """log p(x_prev | x_t, c) of single DDIM transitions at per-row timesteps, in one UNet call
    (CFG as during sampling): what DDPO's ratio to the sampling policy needs."""
    out = backbone.predict(x_t, timesteps, cond, guidance_scale, reference=reference)
    mean, std = schedule.posterior(out, timesteps.cpu(), x_t, eta=eta)
    return ddim_log_prob(x_prev, mean, std, reduction=reduction)  # type: ignore[arg-type]


def transition_log_probs(
    backbone: Backbone,
    schedule: Schedule,
    records: TransitionRecords,
    *,
    guidance_scale: float,
    eta: float = 1.0,
    reduction: str = "mean",
    reference: bool = False,
) -> tuple[Tensor, Tensor]:
    """log p(x_{t-1}^w | x_t^w) and log p(x_{t-1}^l | x_t^l) for every record, in ONE UNet call.

    Win and lose share the pass where they start from the same x_t (always in SPO, the
    branching step in MSPO): the batch is the win rows plus only the lose rows with their own x_t.
    """
    n = len(records)
    own = (~records.shared_x_t.to(records.timesteps.device)).nonzero()[:, 0]
    x_in = torch.cat([records.x_t_win, records.x_t_lose[own]])
    t_in = torch.cat([records.timesteps, records.timesteps[own]])
    cond_in = Conditioning.cat([records.cond, records.cond.index(own)]) if own.numel() else records.cond
    out = backbone.predict(x_in, t_in, cond_in, guidance_scale, reference=reference)
    mean, std = schedule.posterior(out, t_in.cpu(), x_in, eta=eta)
    # per-row timesteps: std has shape (rows, 1, ..., 1)
    mean_lose, std_lose = mean[:n].clone(), std[:n].clone()
    if own.numel():
        mean_lose[own], std_lose[own] = mean[n:], std[n:]
    logp_win = ddim_log_prob(records.x_prev_win, mean[:n], std[:n], reduction=reduction)  # type: ignore[arg-type]
    logp_lose = ddim_log_prob(records.x_prev_lose, mean_lose, std_lose, reduction=reduction)  # type: ignore[arg-type]
    return logp_win, logp_lose


class SPOObjective:
    """The SPO loss of a batch of records: policy log-probs (with grad) vs reference (without)."""

    def __init__(
        self,
        *,
        beta: float = 10.0,
        eps: float | None = 0.1,
        reduction: str = "mean",
        guidance_scale: float = 5.0,
        eta: float = 1.0,
    ) -> None:
        self.beta = beta
        self.eps = eps
        self.reduction = reduction
        self.guidance_scale = guidance_scale
        self.eta = eta

    @classmethod
    def from_config(cls, config: SPOConfig) -> "SPOObjective":
        o, s = config.objective, config.sampling
        return cls(
            beta=o.beta,
            eps=o.eps,
            reduction=o.logprob_reduction,
            guidance_scale=s.guidance_scale if o.cfg else 1.0,
            eta=s.eta,
        )

    def __call__(self, backbone: Backbone, schedule: Schedule, records: TransitionRecords) -> SPOLossOutput:
        kwargs = dict(guidance_scale=self.guidance_scale, eta=self.eta, reduction=self.reduction)
        with torch.no_grad():
            ref_w, ref_l = transition_log_probs(backbone, schedule, records, reference=True, **kwargs)  # type: ignore[arg-type]
        pol_w, pol_l = transition_log_probs(backbone, schedule, records, **kwargs)  # type: ignore[arg-type]
        return spo_loss(pol_w, ref_w, pol_l, ref_l, beta=self.beta, eps=self.eps)


def _mean(values: dict[Any, float]) -> float:
    """Mean of the finite values (a step whose scores were all non-finite holds NaN)."""
    finite = [v for v in values.values() if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


class SPOMethod(Method):
    """SPO (and MSPO): candidate pools scored by the step-aware preference model at each step
    t <= kappa, best/worst pairs past the tie threshold, the clamped-ratio DPO loss.

    A scorer whose ``needs_backbone`` attribute is true (a judge that samples with the policy
    itself) gets ``scorer.bind(backbone, config)`` once, here, before any sampling."""

    name = "spo"
    config_class = SPOMethodConfig
    metric_names = ("loss", "ratio_win", "ratio_lose", "clamp_fraction", "reward_accuracy", "reward_margin")
    curves = (
        Curve("accuracy", "Implicit-reward accuracy", "share of pairs", ("reward_accuracy",), reference=0.5),
        Curve("margin", "Implicit-reward margin", "margin", ("reward_margin",), reference=0.0),
        Curve("clamp", "Clamped / clipped fraction", "share", ("clamp_fraction",)),
        Curve("ratio", "Probability ratio (policy / sampler)", "ratio", ("ratio_win", "ratio_lose"), reference=1.0),
    )
    progress_metric = "reward_accuracy"

    def __init__(self, config: SPOConfig, backbone: Backbone, scorer: Any = None) -> None:
        super().__init__(config, backbone, scorer)
        if getattr(scorer, "needs_backbone", False):  # e.g. spo.toy.judges.BlendContinuationJudge
            scorer.bind(backbone, config)
        self.sampler = self.make_sampler(config, backbone, scorer)
        self.objective = SPOObjective.from_config(config)

    @staticmethod
    def make_sampler(config: SPOConfig, backbone: Backbone, scorer: Any) -> PoolSampler:
        return PoolSampler.from_config(backbone, scorer, config)

    def schedule(self) -> Schedule:
        return self.sampler.schedule()

    def collect(self, items: Any, generator: torch.Generator) -> Collected:
        if hasattr(self.scorer, "clear_cache"):
            self.scorer.clear_cache()
        rollout = self.sampler.rollout(list(items), generator)
        stats = rollout.stats
        trajectory = stats.trajectory_score
        return Collected(
            records=rollout.records, units=stats.pools, valid=stats.valid_pairs,
            log={
                "score_mean": _mean(stats.score_mean), "score_std": _mean(stats.score_std),
                "score_mean_per_t": stats.score_mean, "trajectory_score_per_t": trajectory,
                # the continuing trajectory's score at the last pool (its final image, scored at t = 0)
                "final_score": list(trajectory.values())[-1] if trajectory else float("nan"),
                "nonfinite_pools": stats.nonfinite_pools,
            },
        )

    def loss(self, backbone: Backbone, schedule: Schedule, records: Any) -> SPOLossOutput:
        return self.objective(backbone, schedule, records)


METHOD = SPOMethod
