"""Candidate-pool rollouts: SPO (one step per branch) and MSPO (j steps per branch).

One rollout of B prompts, following the authors' release:

1. plain DDIM while the step index is before the divert step (t > kappa);
2. at a branching step t: k candidates x_{t-1} from the shared x_t, drawn from ONE UNet pass
   (same mean and sigma, k noises); with MSPO each candidate then runs j - 1 more steps alone;
3. the branches' next UNet pass (needed anyway to continue) gives x0-hat, which is decoded and
   scored by the preference model at that next timestep (t = 0 with the decoded final latents);
4. pair choice (best/worst, tie threshold) turns every cached transition of the win and lose
   branches into a training record;
5. one candidate (uniformly at random by default) continues, reusing its UNet pass.

A scorer of latents (``takes_latents``: LPO's latent reward model) instead scores the branches'
latents themselves right after the segment, at the timestep of the segment's last step, as
LPO's pipeline does (``lpo/custom_diffusers/multi_sample_pipeline.py``: the k candidates
x_{t-1} scored at t); nothing is decoded, and the next UNet pass runs on the continuing
candidate only. The tie threshold may depend on the pool's timestep (``pools.threshold_schedule``).

With ``fold_last_step`` (the release's SDXL pipeline) a pool that would start at the very last
step is not drawn: that step is folded into the preceding segment, whose candidates each take it
on their own before they are scored (segment lengths j, ..., j, j + 1 when j does not divide the
remaining steps; SPO's last two steps form one segment).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from ..backbones import Backbone, Conditioning
from ..config import SPOConfig
from ..diffusion import Schedule
from .pairs import PairRule, Resampler, ThresholdSchedule, choose_continuation, choose_pairs, tie_thresholds
from .records import TransitionRecords

PoolScorer = Callable[[Tensor, Sequence[str], Tensor], Tensor]
"""A preference scorer of a pool's images at their timesteps: (images in [-1, 1] (N, 3, H, W), N prompts,
N timesteps) -> N raw scores. Any such callable (not an evaluation :class:`spo.evaluation.scorers.Scorer`).
One whose ``takes_latents`` attribute is true gets the candidates' latents (N, C, h, w) instead."""


def without_autocast(device: torch.device) -> Any:
    """A context with autocast off on ``device``: the trainer's mixed precision (``acc.autocast``)
    is for the policy; the preference model scores in ``preference.dtype`` (an fp32 SPM in fp32,
    as the release's, whose LoRA runs use no autocast at all)."""
    return torch.autocast(device_type=device.type, enabled=False)


@dataclass
class RolloutStats:
    """What happened in one rollout, for logging and benchmarks.

    ``score_mean`` / ``score_std``: over all candidates of the pools branching at each timestep.
    ``trajectory_score``: mean score of the continuing candidate at each branching timestep.
    ``unet_rows``, ``decoded``, ``scored``: work done (UNet batch rows incl. CFG, images decoded
    and scored), so benchmarks can compare the time to the floor. ``nonfinite_pools``: pools
    whose scores held a NaN or inf (ties; the score statistics leave those scores out).
    """

    pools: int = 0
    valid_pairs: int = 0
    score_mean: dict[int, float] = field(default_factory=dict)
    score_std: dict[int, float] = field(default_factory=dict)
    trajectory_score: dict[int, float] = field(default_factory=dict)
    valid_per_step: dict[int, int] = field(default_factory=dict)
    unet_calls: int = 0
    unet_rows: int = 0
    decoded: int = 0
    scored: int = 0
    #: pools with a non-finite score (counted as ties, never a pair)
    nonfinite_pools: int = 0

    @property
    def valid_pair_rate(self) -> float:
        return self.valid_pairs / self.pools if self.pools else 0.0


@dataclass
class Rollout:
    records: TransitionRecords
    stats: RolloutStats
    final_latents: Tensor


def divert_index(timesteps: Sequence[int], divert_start_step: int, kappa: int | None) -> int:
    """Index of the first step that draws a pool: ``divert_start_step``, or with the paper's
    ``kappa`` the first step whose timestep t <= kappa."""
    if kappa is None:
        return min(divert_start_step, len(timesteps))
    for i, t in enumerate(timesteps):
        if t <= kappa:
            return i
    return len(timesteps)


def branch_steps(num_steps: int, first: int, inner_steps: int, fold_last_step: bool = False) -> list[int]:
    """Step indices that branch: first, first + j, first + 2j, ... (below ``num_steps``); with
    ``fold_last_step`` a branch at the last step is dropped (folded into the segment before it)."""
    return [i for i, _ in pool_segments(num_steps, first, inner_steps, fold_last_step)]


def pool_segments(num_steps: int, first: int, inner_steps: int, fold_last_step: bool = False) -> list[tuple[int, int]]:
    """(branching step, steps in its segment) for every pool of a rollout: segments of j =
    ``inner_steps`` steps from ``first`` on, the last one cut at ``num_steps``. With
    ``fold_last_step`` a segment that would start at the last step joins the one before it, as
    the release's SDXL pipeline does (it branches only where ``i != len(timesteps) - 1``)."""
    j = max(1, inner_steps)
    out: list[tuple[int, int]] = []
    i = first
    while i < num_steps:
        m = min(j, num_steps - i)
        if fold_last_step and i + m == num_steps - 1:
            m += 1
        out.append((i, m))
        i += m
    return out


class PoolSampler:
    """Rolls out trajectories with candidate pools and returns win/lose transition records.

    Args:
        backbone: the diffusion model (policy: LoRA adapters on).
        scorer: any :data:`PoolScorer`; the step-aware preference model plugs in here.
        k: candidates per pool. threshold: tie threshold on the softmax gap.
        divert_start_step / kappa: where pools start (see :func:`divert_index`).
        inner_steps: MSPO j (1 = SPO). resampler / pair: the paper's ablation variants.
        decode_batch_size: decode and score at most this many images at once (None = all).
        fold_last_step: never open a pool at the last step; fold it into the segment before
            (the release's SDXL pipeline; its SD-1.5 pipeline pools the last step too).
        threshold_schedule / threshold_min / threshold_max: a tie threshold that depends on the
            pool's timestep (:func:`~spo.sampling.pairs.tie_thresholds`; ``constant``: ``threshold``).

    A scorer whose ``takes_unclamped_images`` attribute is true gets the VAE's decoded x0-hat as
    it is (the release's SPM resizes the unclamped image, then clamps); others get it clamped to
    [-1, 1].
    """

    def __init__(
        self,
        backbone: Backbone,
        scorer: PoolScorer,
        *,
        num_inference_steps: int = 20,
        eta: float = 1.0,
        guidance_scale: float = 5.0,
        k: int = 4,
        threshold: float = 0.3,
        divert_start_step: int = 4,
        kappa: int | None = None,
        inner_steps: int = 1,
        resampler: Resampler = "random",
        pair: PairRule = "best_worst",
        decode_batch_size: int | None = None,
        fold_last_step: bool = False,
        threshold_schedule: ThresholdSchedule = "constant",
        threshold_min: float | None = None,
        threshold_max: float | None = None,
    ) -> None:
        if k < 2:
            raise ValueError(f"a candidate pool needs k >= 2, got {k}")
        self.backbone = backbone
        self.scorer = scorer
        self.num_inference_steps = num_inference_steps
        self.eta = eta
        self.guidance_scale = guidance_scale
        self.k = k
        self.threshold = threshold
        self.divert_start_step = divert_start_step
        self.kappa = kappa
        self.inner_steps = inner_steps
        self.resampler = resampler
        self.pair = pair
        self.decode_batch_size = decode_batch_size
        self.fold_last_step = fold_last_step
        self.threshold_schedule = threshold_schedule
        self.threshold_min, self.threshold_max = threshold_min, threshold_max
        #: does the scorer read latents (LPO's latent reward model) rather than decoded images?
        self.scores_latents = bool(getattr(scorer, "takes_latents", False))

    @classmethod
    def from_config(cls, backbone: Backbone, scorer: PoolScorer, config: SPOConfig, **kwargs: Any) -> "PoolSampler":
        s, p = config.sampling, config.pools
        return cls(
            backbone,
            scorer,
            num_inference_steps=s.num_inference_steps,
            eta=s.eta,
            guidance_scale=s.guidance_scale,
            k=p.k,
            threshold=p.threshold,
            divert_start_step=p.divert_start_step,
            kappa=p.kappa,
            inner_steps=p.inner_steps,
            resampler=p.resampler,
            pair=p.pair,
            fold_last_step=p.fold_last_step,
            threshold_schedule=p.threshold_schedule,
            threshold_min=p.threshold_min,
            threshold_max=p.threshold_max,
            **{"decode_batch_size": s.decode_batch_size, **kwargs},
        )

    def schedule(self) -> Schedule:
        return self.backbone.schedule(self.num_inference_steps)

    def thresholds(self) -> dict[float, float]:
        """The tie threshold at each sampling timestep."""
        schedule = self.schedule()
        return tie_thresholds(schedule, schedule.timesteps.tolist(), self.threshold_schedule, self.threshold,
                              self.threshold_min, self.threshold_max)

    # ------------------------------------------------------------------------------ helpers
    def _predict(self, x: Tensor, t: int, cond: Conditioning, stats: RolloutStats) -> Tensor:
        stats.unet_calls += 1
        stats.unet_rows += x.shape[0] * (2 if self.guidance_scale > 1.0 else 1)
        return self.backbone.predict(x, t, cond, self.guidance_scale)

    def _noise(self, shape: Sequence[int], generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:
        return randn_tensor(tuple(shape), generator=generator, device=self.backbone.device, dtype=dtype)

    def _score(self, x0: Tensor, prompts: Sequence[str], t: int, stats: RolloutStats) -> Tensor:
        """Decode x0-hat in chunks of ``decode_batch_size`` (the VAE decoder's activations are the
        round's memory peak), then score all images in one call (chunked scoring saved no memory
        and tripled its time at full size: docs/benchmarks.md); both outside the trainer's
        autocast, the preference model in its own dtype, as the release's."""
        chunk = self.decode_batch_size or x0.shape[0]
        clamp = not getattr(self.scorer, "takes_unclamped_images", False)
        with without_autocast(x0.device):
            images = torch.cat([self.backbone.decode_for_scoring(x0[start : start + chunk], clamp=clamp)
                                for start in range(0, x0.shape[0], chunk)])  # preference.decoder if set
            ts = torch.full((images.shape[0],), t, dtype=self.schedule().timesteps.dtype, device=images.device)
            scores = self.scorer(images, list(prompts), ts).float().to(x0.device)
        stats.decoded += images.shape[0]
        stats.scored += images.shape[0]
        return scores

    def _score_latents(self, latents: Tensor, prompts: Sequence[str], t: int, stats: RolloutStats) -> Tensor:
        """Score the candidates' latents themselves at ``t`` (a latent reward model): no decode;
        in the model's own dtype, outside the trainer's autocast (LPO's release uses none with LoRA)."""
        ts = torch.full((latents.shape[0],), t, dtype=self.schedule().timesteps.dtype, device=latents.device)
        with without_autocast(latents.device):
            scores = self.scorer(latents, list(prompts), ts).float().to(latents.device)
        stats.scored += latents.shape[0]
        return scores

    # ------------------------------------------------------------------------------ rollout
    @torch.no_grad()
    def rollout(
        self,
        prompts: Sequence[str],
        generator: torch.Generator | None = None,
        cond: Conditioning | None = None,
    ) -> Rollout:
        """Sample one trajectory per prompt with candidate pools; return the valid records."""
        prompts = list(prompts)
        batch, k = len(prompts), self.k
        bb = self.backbone
        schedule = self.schedule()
        ts = schedule.timesteps.tolist()
        n = len(ts)
        cond = cond if cond is not None else bb.encode_prompts(prompts, with_negative=self.guidance_scale > 1.0)
        cond_k = cond.repeat_interleave(k)
        prompts_k = [p for p in prompts for _ in range(k)]
        prompt_index = torch.arange(batch, device=bb.device)
        stats = RolloutStats()
        records: list[TransitionRecords] = []

        x = bb.initial_latents(batch, generator)
        out = self._predict(x, ts[0], cond, stats)
        first = divert_index(ts, self.divert_start_step, self.kappa)
        lengths = dict(pool_segments(n, first, self.inner_steps, self.fold_last_step))
        thresholds = self.thresholds()
        i = 0
        while i < n:
            t = ts[i]
            if i < first:  # plain DDIM: t > kappa
                x = schedule.step(out, t, x, eta=self.eta, noise=self._noise(x.shape, generator, out.dtype)).prev_sample
                i += 1
                if i < n:
                    out = self._predict(x, ts[i], cond, stats)
                continue

            # ---- a pool: k candidates x_{t-1} from the shared x_t (one pass, k noises)
            m = lengths[i]
            x_k = x.repeat_interleave(k, dim=0)
            out_k = out.repeat_interleave(k, dim=0)
            noise = self._noise(x_k.shape, generator, out.dtype)
            cur = schedule.step(out_k, t, x_k, eta=self.eta, noise=noise).prev_sample
            transitions = [(i, t, x_k, cur)]
            # ---- MSPO: each branch runs j - 1 more steps on its own
            for inner in range(1, m):
                t_in = ts[i + inner]
                out_c = self._predict(cur, t_in, cond_k, stats)
                nxt = schedule.step(out_c, t_in, cur, eta=self.eta, noise=self._noise(cur.shape, generator, out_c.dtype))
                transitions.append((i + inner, t_in, cur, nxt.prev_sample))
                cur = nxt.prev_sample
            end = i + m
            if self.scores_latents:  # ---- LPO: the branches' latents, at the segment's last timestep
                out_next = None
                scores = self._score_latents(cur, prompts_k, ts[end - 1], stats).view(batch, k)
            else:  # ---- SPO: the next pass's x0-prediction, decoded (t = 0 at the end)
                if end < n:
                    out_next = self._predict(cur, ts[end], cond_k, stats)
                    x0_hat = schedule.predict_x0(out_next, ts[end], cur)
                    score_t = ts[end]
                else:
                    out_next, x0_hat, score_t = None, cur, 0
                scores = self._score(x0_hat.to(cur.dtype), prompts_k, score_t, stats).view(batch, k)
            choice = choose_pairs(scores, thresholds[t], self.pair, generator)
            valid = choice.valid.nonzero()[:, 0]
            stats.pools += batch
            stats.valid_pairs += int(valid.numel())
            stats.valid_per_step[t] = int(valid.numel())
            finite = torch.isfinite(scores)
            stats.nonfinite_pools += int((~finite.all(dim=1)).sum())
            kept = scores[finite]
            stats.score_mean[t] = float(kept.mean()) if kept.numel() else float("nan")
            stats.score_std[t] = float(kept.std(unbiased=False)) if kept.numel() else float("nan")
            if valid.numel() > 0:
                rows = torch.arange(batch, device=scores.device)[valid]
                win, lose = choice.win[valid], choice.lose[valid]
                for step_idx, t_m, x_from, x_to in transitions:
                    x_from = x_from.view(batch, k, *x_from.shape[1:])
                    x_to = x_to.view(batch, k, *x_to.shape[1:])
                    records.append(
                        TransitionRecords(
                            cond=cond.index(rows),
                            timesteps=torch.full((rows.numel(),), t_m, dtype=schedule.timesteps.dtype, device=bb.device),
                            x_t_win=x_from[rows, win],
                            x_prev_win=x_to[rows, win],
                            x_t_lose=x_from[rows, lose],
                            x_prev_lose=x_to[rows, lose],
                            score_win=scores[rows, win],
                            score_lose=scores[rows, lose],
                            step_index=torch.full((rows.numel(),), step_idx, dtype=torch.long, device=bb.device),
                            prompt_index=prompt_index[rows],
                        )
                    )
            # ---- continue from one candidate, reusing its pass
            keep = choose_continuation(choice, k, self.resampler, generator)
            rows_all = torch.arange(batch, device=keep.device)
            kept = scores[rows_all, keep]
            kept = kept[torch.isfinite(kept)]
            stats.trajectory_score[t] = float(kept.mean()) if kept.numel() else float("nan")
            x = cur.view(batch, k, *cur.shape[1:])[rows_all, keep]
            if out_next is not None:
                out = out_next.view(batch, k, *out_next.shape[1:])[rows_all, keep]
            elif end < n:  # a latent scorer needed no pass on the branches: only the continuing one
                out = self._predict(x, ts[end], cond, stats)
            i = end

        merged = TransitionRecords.cat(records) if records else _empty_records(cond, x, schedule.timesteps.dtype)
        return Rollout(records=merged, stats=stats, final_latents=x)


def _empty_records(cond: Conditioning, x: Tensor, timestep_dtype: torch.dtype) -> TransitionRecords:
    none = torch.zeros(0, dtype=torch.long, device=x.device)
    empty_x = x[:0]
    return TransitionRecords(
        cond=cond.index(none),
        timesteps=torch.zeros(0, dtype=timestep_dtype, device=x.device),
        x_t_win=empty_x,
        x_prev_win=empty_x,
        x_t_lose=empty_x,
        x_prev_lose=empty_x,
        score_win=torch.zeros(0, device=x.device),
        score_lose=torch.zeros(0, device=x.device),
        step_index=none,
        prompt_index=none,
    )
