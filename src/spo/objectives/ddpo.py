"""DDPO (Black et al., 2024): PPO on the denoising steps, with rewards of the final images.

Each prompt is sampled ``objective.samples_per_prompt`` times (stochastic DDIM, independent
x_T), the sampling policy's log-probability of every transition kept. A reward model scores the
final images; the advantage of a trajectory is its reward normalised per prompt (a buffer of the
prompt's recent rewards, :class:`PerPromptStatTracker`) or over the round's batch, clipped to
[-A_max, A_max]. Every step j of a trajectory then trains with PPO's clipped surrogate

    rho_j = p_theta(x_{j-1} | x_j, c) / p_old(x_{j-1} | x_j, c),
    loss_j = max(-A * rho_j, -A * clamp(rho_j, 1 - clip, 1 + clip)),

clip = 1e-4 and A_max = 5 in DDPO's code; logged: ``approx_kl`` = mean((log rho)^2) / 2 and
``clip_fraction`` = share of |rho - 1| > clip.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ..backbones import Backbone, Conditioning
from ..config import ObjectiveConfig, SPOConfig
from ..diffusion import Schedule
from ..sampling import ddim_sample, without_autocast
from ..sampling.records import Records
from .base import Collected, Curve, LossOutput, Method


@dataclass
class DDPOConfig(ObjectiveConfig):
    """DDPO's settings (``objective.name: ddpo``), the defaults of ddpo-pytorch.

    Attributes:
        samples_per_prompt: Trajectories per prompt in a round (the group a prompt's statistics
            see).
        clip_range: PPO clip of the ratio to the sampling policy (1e-4).
        adv_clip_max: Advantage clip (5).
        per_prompt_stat_tracking: Normalise rewards per prompt over a buffer of its recent
            rewards (else over the round's batch).
        stat_buffer_size: Rewards kept per prompt.
        stat_min_count: Rewards a prompt needs before its own statistics are used (below it,
            the batch's).
        logprob_reduction: How per-element Gaussian log-probabilities of a step are reduced over
            latent dimensions (``"mean"`` or ``"sum"``).
        cfg: Apply classifier-free guidance inside the log-probability model during training,
            matching how the samples were generated.
    """

    name: str = "ddpo"
    samples_per_prompt: int = 2
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    per_prompt_stat_tracking: bool = True
    stat_buffer_size: int = 16
    stat_min_count: int = 16
    logprob_reduction: Literal["mean", "sum"] = "mean"
    cfg: bool = True

    def problems(self, config: SPOConfig) -> list[str]:
        rules = [
            (self.samples_per_prompt >= 1, f"objective.samples_per_prompt must be >= 1, got {self.samples_per_prompt!r}"),
            (self.clip_range > 0, f"objective.clip_range must be > 0, got {self.clip_range!r}"),
            (self.adv_clip_max > 0, f"objective.adv_clip_max must be > 0, got {self.adv_clip_max!r}"),
            (self.stat_buffer_size >= 1, f"objective.stat_buffer_size must be >= 1, got {self.stat_buffer_size!r}"),
            (self.stat_min_count >= 1, f"objective.stat_min_count must be >= 1, got {self.stat_min_count!r}"),
        ]
        return [message for ok, message in rules if not ok]
from .spo import step_log_probs


def ppo_clip_loss(log_prob: Tensor, log_prob_old: Tensor, advantage: Tensor, *, clip: float = 1e-4,
                  adv_clip_max: float = 5.0) -> LossOutput:
    """PPO's clipped surrogate on per-transition log-probs against the sampling policy.

    ``advantage`` is clipped to [-adv_clip_max, adv_clip_max]; loss = mean(max(-A * rho,
    -A * clamp(rho, 1 - clip, 1 + clip))), rho = exp(log_prob - log_prob_old).
    """
    adv = advantage.clamp(-adv_clip_max, adv_clip_max).to(log_prob.dtype)
    log_ratio = log_prob - log_prob_old.detach().to(log_prob.dtype)
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip, 1 + clip)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        metrics = {
            "loss": float(loss),
            "ratio": float(ratio.mean()),
            "approx_kl": float(0.5 * (log_ratio**2).mean()),
            "clip_fraction": float(((ratio - 1).abs() > clip).float().mean()),
            "advantage": float(adv.mean()),
        }
    return LossOutput(loss=loss, metrics=metrics)


def batch_advantages(rewards: Tensor, eps: float = 1e-8) -> Tensor:
    """(r - mean) / (std + eps) over the batch (DDPO without per-prompt tracking)."""
    r = rewards.double()
    return ((r - r.mean()) / (r.std(unbiased=False) + eps)).to(rewards.dtype)


class PerPromptStatTracker:
    """DDPO's per-prompt reward normalisation: each prompt keeps a buffer of its last
    ``buffer_size`` rewards across rounds; a reward is normalised by its prompt's buffer
    (mean, std + 1e-6) once the buffer holds ``min_count`` rewards, else by the whole batch."""

    def __init__(self, buffer_size: int = 16, min_count: int = 16) -> None:
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[int, deque[float]] = {}

    def update(self, prompts: Sequence[int], rewards: Tensor) -> Tensor:
        r = rewards.double().cpu()
        out = torch.empty_like(r)
        ids = [int(p) for p in prompts]
        for prompt in dict.fromkeys(ids):
            rows = torch.tensor([i for i, p in enumerate(ids) if p == prompt])
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(r[rows].tolist())
            if len(buffer) < self.min_count:
                mean, std = r.mean(), r.std(unbiased=False)
            else:
                values = torch.tensor(list(buffer), dtype=torch.float64)
                mean, std = values.mean(), values.std(unbiased=False)
            out[rows] = (r[rows] - mean) / (std + 1e-6)
        return out.to(rewards.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {str(k): list(v) for k, v in self.buffers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffers = {int(k): deque(v, maxlen=self.buffer_size) for k, v in state.items()}


@dataclass
class StepRecords(Records):
    """Single transitions x_t -> x_{t-1} of whole trajectories (a trajectory's steps are
    consecutive rows), with the sampling policy's log-prob, the trajectory's final reward and,
    once :meth:`DDPOMethod.prepare` ran, its advantage."""

    cond: Conditioning
    timesteps: Tensor
    x_t: Tensor
    x_prev: Tensor
    log_prob: Tensor
    reward: Tensor
    advantage: Tensor
    prompt_index: Tensor


class DDPOMethod(Method):
    """DDPO with PPO-clip (``objective.clip_range``, ``objective.adv_clip_max``) and per-prompt
    (``objective.per_prompt_stat_tracking``) or per-batch advantages."""

    name = "ddpo"
    config_class = DDPOConfig
    metric_names = ("loss", "ratio", "approx_kl", "clip_fraction", "advantage")
    curves = (
        Curve("clamp", "Clamped / clipped fraction", "share", ("clip_fraction",)),
        Curve("ratio", "Probability ratio (policy / sampler)", "ratio", ("ratio",), reference=1.0),
        Curve("approx_kl", "Approximate KL", "KL", ("approx_kl",)),
        Curve("advantage", "Advantage", "advantage", ("advantage",), reference=0.0),
    )
    progress_metric = "approx_kl"

    def __init__(self, config: SPOConfig, backbone: Backbone, scorer: Any = None) -> None:
        super().__init__(config, backbone, scorer)
        o = config.objective
        self.tracker = PerPromptStatTracker(o.stat_buffer_size, o.stat_min_count) if o.per_prompt_stat_tracking else None
        self.prompt_ids: dict[str, int] = {}

    def items(self, prompts: Sequence[str]) -> Sequence[Any]:
        self.prompt_ids = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        return prompts

    @property
    def steps_per_trajectory(self) -> int:
        return self.config.sampling.num_inference_steps

    @torch.no_grad()
    def collect(self, items: Sequence[Any], generator: torch.Generator) -> Collected:
        s, k = self.config.sampling, self.config.objective.samples_per_prompt
        prompts = [p for p in items for _ in range(k)]
        bb = self.backbone
        cond = bb.encode_prompts(prompts, with_negative=s.guidance_scale > 1.0)
        traj = ddim_sample(bb, cond, num_inference_steps=s.num_inference_steps, eta=s.eta,
                           guidance_scale=s.guidance_scale, generator=generator, return_trajectory=True,
                           log_prob_reduction=self.config.objective.logprob_reduction)
        if hasattr(self.scorer, "clear_cache"):
            self.scorer.clear_cache()
        final = traj.latents
        with without_autocast(final.device):  # decoded and scored in their own dtypes, as the pools are
            images = bb.decode_for_scoring(final)  # preference.decoder when set: these images are only scored
            rewards = self.scorer(images, prompts, torch.zeros(len(prompts), dtype=torch.long, device=images.device))
        rewards = rewards.float().to(final.device)
        b, n, device = final.shape[0], traj.timesteps.numel(), final.device
        rows = torch.arange(b, device=device).repeat_interleave(n)  # trajectory-major: a trajectory's steps consecutive
        steps = torch.arange(n, device=device).repeat(b)
        records = StepRecords(
            cond=cond.index(rows),
            timesteps=traj.timesteps.to(device)[steps],
            x_t=traj.states[rows, steps],
            x_prev=traj.states[rows, steps + 1],
            log_prob=traj.log_probs[rows, steps].float(),
            reward=rewards[rows],
            advantage=torch.zeros(b * n, device=device),
            prompt_index=torch.tensor([self.prompt_ids.get(p, -1) for p in prompts], device=device)[rows],
        )
        return Collected(records=records, units=b, valid=b, log={
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False)),
            "final_score": float(rewards.mean()),  # the key SPO's round log gives its final images' score
        })

    def prepare(self, records: Records) -> Records:
        """Advantages of the gathered trajectories (identical on every process)."""
        assert isinstance(records, StepRecords)
        n = self.steps_per_trajectory
        if len(records) % n:
            raise RuntimeError(f"DDPO records ({len(records)}) are not whole trajectories of {n} steps")
        rewards = records.reward.view(-1, n)[:, 0]
        prompts = records.prompt_index.view(-1, n)[:, 0].tolist()
        if self.tracker is not None:
            adv = self.tracker.update(prompts, rewards)
        else:
            adv = batch_advantages(rewards)
        return records.replace(advantage=adv.to(records.reward.device).repeat_interleave(n))

    def loss(self, backbone: Backbone, schedule: Schedule, records: Records) -> LossOutput:
        assert isinstance(records, StepRecords)
        s, o = self.config.sampling, self.config.objective
        log_prob = step_log_probs(backbone, schedule, records.cond, records.timesteps, records.x_t, records.x_prev,
                                  guidance_scale=s.guidance_scale if o.cfg else 1.0, eta=s.eta,
                                  reduction=o.logprob_reduction)
        return ppo_clip_loss(log_prob, records.log_prob, records.advantage, clip=o.clip_range,
                             adv_clip_max=o.adv_clip_max)

    def state_dict(self) -> dict[str, Any]:
        return {"stat_tracker": self.tracker.state_dict()} if self.tracker is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.tracker is not None and "stat_tracker" in state:
            self.tracker.load_state_dict(state["stat_tracker"])


METHOD = DDPOMethod
