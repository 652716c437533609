"""Pair choice within a candidate pool, and which candidate continues the trajectory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

PairRule = Literal["best_worst", "random"]
Resampler = Literal["random", "win", "lose"]
ThresholdSchedule = Literal["constant", "sigma", "variance", "linear"]


@dataclass
class PairChoice:
    """For each pool (row): the win and lose candidate indices, and whether the pair is valid.

    ``valid`` is False for a tie: softmax([s_win, s_lose])[0] - softmax(...)[1] <= threshold.
    ``gap`` is that softmax gap, tanh((s_win - s_lose) / 2).
    """

    win: Tensor
    lose: Tensor
    valid: Tensor
    gap: Tensor


def softmax_gap(score_a: Tensor, score_b: Tensor) -> Tensor:
    """softmax([a, b])[0] - softmax([a, b])[1] over two raw scores (logits)."""
    logits = torch.stack([score_a, score_b], dim=-1)
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return probs[..., 0] - probs[..., 1]


def choose_pairs(
    scores: Tensor,
    threshold: float,
    rule: PairRule = "best_worst",
    generator: torch.Generator | None = None,
) -> PairChoice:
    """Choose a win/lose pair in each row of ``scores`` (shape (B, k), raw preference logits).

    ``best_worst`` (the release): the highest- and lowest-scored candidates. ``random`` (the
    paper's ablation): two distinct candidates drawn uniformly, ordered by score. The pair is
    valid when the softmax gap of its two scores exceeds ``threshold`` (the tie rule) and every
    score of its row is finite (a NaN or inf score never makes a pair).
    """
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must have shape (B, k >= 2), got {tuple(scores.shape)}")
    batch, k = scores.shape
    if rule == "best_worst":
        win = scores.argmax(dim=1)
        lose = scores.argmin(dim=1)
    elif rule == "random":
        draws = torch.rand(batch, k, generator=generator, device="cpu").argsort(dim=1)[:, :2].to(scores.device)
        a, b = draws[:, 0], draws[:, 1]
        sa, sb = scores.gather(1, a[:, None])[:, 0], scores.gather(1, b[:, None])[:, 0]
        a_wins = sa >= sb
        win, lose = torch.where(a_wins, a, b), torch.where(a_wins, b, a)
    else:
        raise ValueError(f"unknown pair rule {rule!r}; expected 'best_worst' or 'random'")
    s_win = scores.gather(1, win[:, None])[:, 0]
    s_lose = scores.gather(1, lose[:, None])[:, 0]
    gap = softmax_gap(s_win, s_lose)
    # a pool with a non-finite score (e.g. an fp16 overflow of the preference model) is a tie
    valid = (gap > threshold) & (win != lose) & torch.isfinite(scores).all(dim=1)
    return PairChoice(win=win, lose=lose, valid=valid, gap=gap)


def choose_continuation(
    choice: PairChoice, k: int, resampler: Resampler = "random", generator: torch.Generator | None = None
) -> Tensor:
    """Index of the candidate that continues each trajectory.

    ``random`` (the paper): uniform over the k candidates, independent of the scores; ``win`` /
    ``lose``: the pair's win or lose candidate (the paper's resampler ablation).
    """
    if resampler == "random":
        batch = choice.win.shape[0]
        return torch.randint(0, k, (batch,), generator=generator, device="cpu").to(choice.win.device)
    if resampler == "win":
        return choice.win
    if resampler == "lose":
        return choice.lose
    raise ValueError(f"unknown resampler {resampler!r}; expected 'random', 'win' or 'lose'")


def tie_thresholds(
    schedule: Any,
    timesteps: Sequence[int | float],
    kind: ThresholdSchedule = "constant",
    threshold: float = 0.3,
    low: float | None = None,
    high: float | None = None,
) -> dict[float, float]:
    """The tie threshold at each sampling timestep (LPO's ``dynamic_threshold``).

    ``constant``: ``threshold`` everywhere. Otherwise ``low`` at the timestep where the measure is
    smallest and ``high`` where it is largest, linear in between, the measure being ``sigma``:
    the standard deviation sigma_t of the stochastic step at t (eta = 1) of ``schedule``;
    ``variance``: sigma_t squared; ``linear``: t itself. On SD's 20-step DDIM schedule sigma_t
    is the release's table (``compare_funcs.py``) to its 4 decimals.
    """
    if kind == "constant":
        return {t: float(threshold) for t in timesteps}
    if low is None or high is None:
        raise ValueError(f"threshold schedule {kind!r} needs both threshold_min and threshold_max")
    if kind == "linear":
        measure = {t: float(t) for t in timesteps}
    elif kind in ("sigma", "variance"):
        zero = torch.zeros(1, dtype=torch.float64)
        measure = {}
        for t in timesteps:
            _, std = schedule.posterior(zero, t, zero, eta=1.0)
            sigma = float(torch.as_tensor(std).reshape(-1)[0])
            measure[t] = sigma if kind == "sigma" else sigma * sigma
    else:
        raise ValueError(f"unknown threshold schedule {kind!r}; expected constant, sigma, variance or linear")
    lo, hi = min(measure.values()), max(measure.values())
    span = hi - lo
    return {t: float(low) if span == 0 else float(low + (m - lo) / span * (high - low)) for t, m in measure.items()}
