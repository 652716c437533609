"""Pool accuracy: what a preference model knows inside an SPO candidate pool.

SPO's judge never sees finished images: at step t it scores the k candidates x_{t-1} drawn from
one shared x_t by their x0-hat (the next pass's prediction, at the next timestep) and trains on
its best and worst. Whether that pair points the right way is a question about the *outcome*
each candidate leads to. The toy world can answer it: from the base model, draw pools of k
candidates at several t, finish every candidate several times with the stochastic sampler, and
label it by the mean oracle scores of its finished images (aesthetic, alignment, and the generic
blend 0.7 alignment + 0.3 aesthetic without its noise). Then, per t and judge:

- ``agreement``: among pools whose judge-best and judge-worst candidates have different labels,
  the share where the judge's best has the higher label (chance 0.5);
- ``agreement_valid`` / ``valid_rate``: the same among the pools whose pair passes the judge's
  tie threshold (the pairs SPO trains on), and the share of such pools;
- ``spearman``: the rank correlation of judge scores and labels within a pool (ties averaged),
  averaged over pools whose labels and scores are not all equal (chance 0);
- ``label_gap`` / ``label_gap_valid``: the mean label difference best - worst over all pools /
  over the valid ones (what one pair is worth, in oracle units).

Shares come with 95% Wilson intervals, means with normal-approximation ones.

Per t the pools also report how much of the outcome is decided at that step: the spread of the
candidates' labels (max - min) and the share of the label variance that lies between candidates
rather than between continuations of one candidate.

A latent judge (``takes_latents``: LPO's latent reward model, or the continuation control) is
measured on what LPO scores: the candidates' latents x_{t-1} themselves (``Pools.candidates``; for
the pixel-space toy model the images x_{t-1}), at the pool's branching timestep t; every other
judge scores x0-hat at ``score_t``. Its tie threshold may depend on t (a dict by branching t).

The pools (candidates, x0-hat images and labels) do not depend on the judge: they are drawn once
and cached, so every judge, including later builds', is measured on the same pools. A cache
written before the pools kept their candidates is refused (:class:`StalePoolsError`): redraw it
(the same seeds give the same pools).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..backbones import Backbone
from ..files import atomic_path
from ..sampling import ddim_sample
from ..sampling.pairs import softmax_gap
from ..training.seeding import derive_seed
from .batched_oracles import aesthetic_batch, alignment_batch, to_oracle_images
from .grammar import training_prompts
from .preference_data import AESTHETIC_WEIGHT, ALIGNMENT_WEIGHT

LABELS = ("aesthetic", "alignment", "blend")


@dataclass
class PoolAccuracySettings:
    """Which pools are drawn (every draw seeded from ``seed``)."""

    prompts: int = 96
    timesteps: list[int] = field(default_factory=lambda: [751, 601, 451, 301, 151, 51])
    k: int = 4
    continuations: int = 4
    num_inference_steps: int = 20
    guidance_scale: float = 3.0
    eta: float = 1.0
    batch_size: int = 64  # rows per UNet call when finishing candidates
    seed: int = 0


@dataclass
class Pools:
    """The pools drawn at one timestep t: P prompts x k candidates."""

    t: int  # the branching timestep: x_t -> the candidates x_{t-1}; latent judges score them at t
    score_t: int  # the timestep the judges score x0-hat at (the next one; 0 after the last step)
    continuations: int  # finished images behind each label
    images: Tensor  # (P, k, 3, H, W) x0-hat in [-1, 1]
    labels: dict[str, Tensor]  # name -> (P, k): mean oracle score over the continuations
    label_sd: dict[str, Tensor]  # name -> (P, k): sd over the continuations
    candidates: Tensor  # (P, k, C, h, w) the candidates' latents x_{t-1} (toy: 3 x 32 x 32 pixels, unclamped)


class StalePoolsError(ValueError):
    """A pool cache written before the pools kept their candidates' latents."""


def pool_prompts(settings: PoolAccuracySettings) -> list[str]:
    """``settings.prompts`` training prompts in a seeded order (repeating when more are asked)."""
    prompts = training_prompts()
    order = np.random.default_rng(derive_seed(settings.seed, "pool-prompts")).permutation(len(prompts))
    return [prompts[int(order[i % len(prompts)])] for i in range(settings.prompts)]


def _oracle_labels(images: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
    pictures = to_oracle_images(images)
    aesthetic, alignment = aesthetic_batch(pictures), alignment_batch(pictures, list(prompts))
    return {"aesthetic": aesthetic, "alignment": alignment, "blend": ALIGNMENT_WEIGHT * alignment + AESTHETIC_WEIGHT * aesthetic}


@torch.no_grad()
def draw_pools(backbone: Backbone, settings: PoolAccuracySettings, progress: bool = True) -> list[Pools]:
    """One base-model trajectory per prompt down to each requested t; there, k candidates from the
    shared x_t (one pass, k noises, as SPO draws them), their x0-hat from the next pass, and
    ``continuations`` stochastic finishes of each candidate, labelled by the oracles."""
    prompts = pool_prompts(settings)
    p, k, c = len(prompts), settings.k, settings.continuations
    generator = torch.Generator().manual_seed(derive_seed(settings.seed, "pool-accuracy"))
    schedule = backbone.schedule(settings.num_inference_steps)
    ts = schedule.timesteps.tolist()
    missing = [t for t in settings.timesteps if t not in ts]
    if missing:
        raise ValueError(f"timesteps {missing} are not on the {settings.num_inference_steps}-step schedule {ts}")
    wanted = sorted(ts.index(t) for t in settings.timesteps)
    cond = backbone.encode_prompts(prompts, with_negative=settings.guidance_scale > 1.0)
    cfg, eta = settings.guidance_scale, settings.eta

    def noise(shape: torch.Size) -> Tensor:
        return torch.randn(shape, generator=generator).to(backbone.device, backbone.dtype)

    x = backbone.initial_latents(p, generator)
    states = {}
    for i, t in enumerate(ts[: wanted[-1] + 1]):  # the shared trajectory, kept at every wanted step
        if i in wanted:
            states[i] = x
        x = schedule.step(backbone.predict(x, t, cond, cfg), t, x, eta=eta, noise=noise(x.shape)).prev_sample

    rows_per_t = p * k * c
    bar = tqdm(total=len(wanted) * rows_per_t, desc="finishing pool candidates", unit="image", disable=not progress)
    pools = []
    cond_k = cond.repeat_interleave(k)
    for i in wanted:
        t, x_t = ts[i], states[i]
        out = backbone.predict(x_t, t, cond, cfg).repeat_interleave(k, dim=0)
        x_k = x_t.repeat_interleave(k, dim=0)
        candidates = schedule.step(out, t, x_k, eta=eta, noise=noise(x_k.shape)).prev_sample
        if i + 1 < len(ts):
            score_t = ts[i + 1]
            out_next = backbone.predict(candidates, score_t, cond_k, cfg)
            x0_hat = schedule.predict_x0(out_next, score_t, candidates)
        else:
            score_t, x0_hat = 0, candidates
        finals = []
        starts = candidates.repeat_interleave(c, dim=0)
        cond_kc = cond_k.repeat_interleave(c)
        for s in range(0, starts.shape[0], settings.batch_size):
            rows = torch.arange(s, min(s + settings.batch_size, starts.shape[0]))
            if i + 1 < len(ts):
                finals.append(ddim_sample(backbone, cond_kc.index(rows), num_inference_steps=settings.num_inference_steps,
                                          eta=eta, guidance_scale=cfg, latents=starts[rows], generator=generator,
                                          start_step=i + 1))
            else:
                finals.append(starts[rows])
            bar.update(len(rows))
        images = backbone.decode(torch.cat(finals)).float().cpu()
        labels = _oracle_labels(images, [q for q in prompts for _ in range(k * c)])
        pools.append(Pools(
            t=t, score_t=score_t, continuations=c if i + 1 < len(ts) else 1, images=backbone.decode(x0_hat).float().cpu().view(p, k, *images.shape[1:]),
            labels={n: v.view(p, k, c).mean(dim=2) for n, v in labels.items()},
            label_sd={n: v.view(p, k, c).std(dim=2, unbiased=c > 1) for n, v in labels.items()},
            candidates=candidates.float().cpu().view(p, k, *candidates.shape[1:]),
        ))
    bar.close()
    return pools


def save_pools(pools: list[Pools], settings: PoolAccuracySettings, path: str | Path) -> None:
    """Cache the pools (tensors and plain types only: read back with ``torch.load(weights_only=True)``)."""
    with atomic_path(path) as tmp:
        torch.save({"settings": asdict(settings), "pools": [asdict(pool) for pool in pools]}, tmp)


def load_pools(path: str | Path, settings: PoolAccuracySettings) -> list[Pools] | None:
    """The cached pools if ``path`` holds pools drawn with ``settings``, else ``None``; a cache of
    these settings written before the pools kept their candidates' latents raises
    :class:`StalePoolsError` (redraw it: the latent judges need the candidates)."""
    path = Path(path)
    if not path.exists():
        return None
    saved = torch.load(path, weights_only=True)
    if saved["settings"] != asdict(settings):
        return None
    if any("candidates" not in pool for pool in saved["pools"]):
        raise StalePoolsError(
            f"{path} holds pools drawn before they kept their candidates' latents x_(t-1), which the latent judges "
            "score: delete it to redraw the pools (the same seeds give the same pools and labels), or pass another cache")
    return [Pools(**pool) for pool in saved["pools"]]


def _ranks(x: Tensor) -> Tensor:
    """Ranks within each row (1 = lowest), ties averaged."""
    less = (x[:, None, :] < x[:, :, None]).sum(dim=2).double()
    equal = (x[:, None, :] == x[:, :, None]).sum(dim=2).double()
    return less + (equal + 1) / 2


def _share(successes: Tensor) -> list[float]:
    """A proportion and its 95% Wilson interval (inside [0, 1] even for few or extreme counts)."""
    n = successes.numel()
    if n == 0:
        return [math.nan, math.nan, math.nan]
    p, z = float(successes.double().mean()), 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(p, 4), round(centre - half, 4), round(centre + half, 4)]


def _interval(values: Tensor) -> list[float]:
    """Mean and its 95% normal-approximation interval; NaNs when there is nothing to average."""
    n = values.numel()
    if n == 0:
        return [math.nan, math.nan, math.nan]
    mean = float(values.double().mean())
    half = 1.96 * float(values.double().std()) / math.sqrt(n) if n > 1 else math.nan
    return [round(mean, 4), round(mean - half, 4), round(mean + half, 4)]


def _pairs(scores: Tensor, labels: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per pool: (judge-best label - judge-worst label, decided, valid, right) in float64."""
    best, worst = scores.argmax(dim=1, keepdim=True), scores.argmin(dim=1, keepdim=True)
    label_best, label_worst = labels.gather(1, best)[:, 0], labels.gather(1, worst)[:, 0]
    decided = label_best != label_worst
    # the tie rule as the sampler applies it (float32 scores)
    valid = softmax_gap(scores.gather(1, best)[:, 0].float(), scores.gather(1, worst)[:, 0].float()) > threshold
    return label_best - label_worst, decided, valid, (label_best > label_worst).double()


def pool_metrics(scores: Tensor, labels: Tensor, threshold: float) -> dict[str, Any]:
    """The module docstring's measures for (P, k) judge scores against (P, k) labels."""
    return _metrics_and_trained_pairs(scores, labels, threshold)[0]


def _metrics_and_trained_pairs(scores: Tensor, labels: Tensor, threshold: float) -> tuple[dict[str, Any], Tensor, Tensor]:
    """(pool_metrics, right-or-wrong of the decided valid pairs, the valid mask)."""
    scores, labels = scores.double().cpu(), labels.double().cpu()
    gap, decided, valid, right = _pairs(scores, labels, threshold)
    varied = (labels.max(dim=1).values > labels.min(dim=1).values) & (scores.max(dim=1).values > scores.min(dim=1).values)
    rs, rl = _ranks(scores[varied]), _ranks(labels[varied])
    rs, rl = rs - rs.mean(dim=1, keepdim=True), rl - rl.mean(dim=1, keepdim=True)
    spearman = (rs * rl).sum(dim=1) / ((rs * rs).sum(dim=1) * (rl * rl).sum(dim=1)).sqrt()
    metrics = {
        "pools": int(scores.shape[0]),
        "decided_pools": int(decided.sum()),
        "agreement": _share(right[decided]),
        "valid_rate": round(float(valid.double().mean()), 4),
        "agreement_valid": _share(right[decided & valid]),
        "decided_valid_pools": int((decided & valid).sum()),
        "spearman": _interval(spearman),
        "label_gap": _interval(gap),
        "label_gap_valid": _interval(gap[valid]),
    }
    return metrics, right[decided & valid], valid


def pool_statistics(pool: Pools) -> dict[str, Any]:
    """How much the outcome differs between candidates at this t (judge-independent).

    ``decided_share``: of the variance of one finished image's label within a pool, the share
    explained by which candidate it came from: (var of candidate means - within / c) / total,
    with within = the variance between continuations of one candidate (0 at the last step)."""
    out: dict[str, Any] = {"t": pool.t, "score_t": pool.score_t}
    for name in LABELS:
        labels, sd = pool.labels[name].double(), pool.label_sd[name].double()
        within = float((sd**2).mean())
        between = max(0.0, float(labels.var(dim=1, unbiased=True).mean()) - within / pool.continuations)
        unknown = pool.continuations < 2 and pool.score_t != 0  # one continuation: no within-candidate variance
        out[name] = {
            "mean": round(float(labels.mean()), 4),
            "spread": _interval(labels.max(dim=1).values - labels.min(dim=1).values),
            "decided_share": math.nan if unknown or between + within == 0 else round(between / (between + within), 4),
        }
    return out


def judge_pools(judge: Any, pool: Pools, prompts: Sequence[str], batch_size: int = 256) -> Tensor:
    """(P, k) scores by ``judge`` of the pool's x0-hat images at the pool's scoring timestep, or,
    for a latent judge (``takes_latents``), of the candidates' latents at the branching t (LPO)."""
    latent = bool(getattr(judge, "takes_latents", False))
    p, k = pool.images.shape[:2]
    flat = (pool.candidates if latent else pool.images).flatten(0, 1)
    flat_prompts = [q for q in prompts for _ in range(k)]
    scores = []
    with torch.no_grad():
        for s in range(0, flat.shape[0], batch_size):
            chunk = flat[s : s + batch_size]
            ts = torch.full((chunk.shape[0],), pool.t if latent else pool.score_t, dtype=torch.long)
            scores.append(judge(chunk, flat_prompts[s : s + batch_size], ts).float().cpu())
    return torch.cat(scores).view(p, k)


def threshold_at(threshold: float | Mapping[int, float], t: int) -> float:
    """The tie threshold of a pool branching at ``t``: a number, or a dict by branching t (LPO's)."""
    if isinstance(threshold, Mapping):
        return float(threshold[int(t)])
    return float(threshold)


def measure(judges: dict[str, tuple[Any, float | Mapping[int, float]]], pools: list[Pools],
            prompts: Sequence[str]) -> dict[str, Any]:
    """Per t: the pools' statistics, and for each judge (judge, tie threshold: a number, or a dict
    by the pool's branching t) its measures against every label. ``trained_pairs``: per judge and
    label, the agreement of the pairs that pass the tie threshold, pooled over every t measured
    (each t weighs by how many of its pools give a pair, as in SPO's training, though over the
    measured t rather than all pooled steps), with the number of such pairs and the share of pools
    that give one. ``seconds_judging``: each judge's scoring time over all pools."""
    result: dict[str, Any] = {"per_t": [], "trained_pairs": {}, "seconds_judging": dict.fromkeys(judges, 0.0)}
    pooled: dict[str, dict[str, list[Tensor]]] = {name: {label: [] for label in LABELS} for name in judges}
    valid_counts: dict[str, list[int]] = {name: [0, 0] for name in judges}
    for pool in pools:
        entry = pool_statistics(pool)
        entry["judges"] = {}
        for name, (judge, threshold) in judges.items():
            start = time.perf_counter()
            scores = judge_pools(judge, pool, prompts)
            result["seconds_judging"][name] = round(result["seconds_judging"][name] + time.perf_counter() - start, 2)
            entry["judges"][name] = {}
            tie = threshold_at(threshold, pool.t)
            for label in LABELS:  # the valid mask depends on the scores only: the same for every label
                metrics, trained, valid = _metrics_and_trained_pairs(scores, pool.labels[label], tie)
                entry["judges"][name][label] = metrics
                pooled[name][label].append(trained)
            valid_counts[name][0] += int(valid.sum())
            valid_counts[name][1] += int(valid.numel())
        result["per_t"].append(entry)
    for name in judges:
        result["trained_pairs"][name] = {
            "valid_rate": round(valid_counts[name][0] / max(valid_counts[name][1], 1), 4),
            **{label: {"agreement_valid": _share(torch.cat(pooled[name][label])),
                       "decided_valid_pools": int(sum(t.numel() for t in pooled[name][label]))}
               for label in LABELS},
        }
    return result
