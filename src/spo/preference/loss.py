"""The SPM training loss: two-way cross-entropy against (label_0, label_1), tie-corrected and
weighted by 1 / (examples sharing the prompt)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def preference_pair_loss(
    scores_0: Tensor, scores_1: Tensor, labels: Tensor, weights: Tensor | None = None,
    weight_sum: Tensor | float | None = None,
) -> Tensor:
    """Weighted mean over pairs of -(y0 log p0 + y1 log p1) [+ log 0.5 for a tie].

    ``p = softmax([s0, s1])`` over the raw scores (exp(logit_scale) * cosine); ``labels`` is
    (N, 2); ties (0.5, 0.5) get log 0.5 added so that a perfectly tied prediction costs 0;
    ``weights`` (N,) are normalised over the batch: divided by their sum, or by ``weight_sum``
    when given (the sum over the batch gathered from every process, as the release's
    ``SPMCriterion.calc_loss`` normalises; this process's pairs then give its share of that loss).
    """
    logits = torch.stack([scores_0, scores_1], dim=-1)
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    labels = labels.to(logp)
    ce = -(labels * logp).sum(dim=-1)
    tie = (labels[:, 0] == labels[:, 1]).to(ce.dtype)
    ce = ce + tie * math.log(0.5)
    w = torch.ones_like(ce) if weights is None else weights.to(ce)
    return (w * ce).sum() / (w.sum() if weight_sum is None else weight_sum)


def release_accuracy(scores_0: Tensor, scores_1: Tensor, labels: Tensor, ties: bool) -> tuple[float, int]:
    """(correct, counted) as the release's ``SPMTask.run_inference`` counts: each pair adds
    ``(s0 > s1) * label_0 + (s0 < s1) * label_1``; with ``ties`` a tied label (0.5, 0.5) counts
    (half right when the scores differ), without it tied pairs are left out."""
    labels = labels.to(scores_0.device, torch.float64)
    keep = torch.ones_like(labels[:, 0], dtype=torch.bool) if ties else labels[:, 0] != labels[:, 1]
    correct = (scores_0 > scores_1).double() * labels[:, 0] + (scores_0 < scores_1).double() * labels[:, 1]
    return float(correct[keep].sum()), int(keep.sum())


def pair_accuracy(scores_0: Tensor, scores_1: Tensor, labels: Tensor) -> tuple[int, int]:
    """(correct, counted) over non-tied pairs: the higher score is the labelled winner."""
    decided = labels[:, 0] != labels[:, 1]
    predicted_0 = scores_0 > scores_1
    correct = (predicted_0 == (labels[:, 0] > labels[:, 1])) & decided
    return int(correct.sum()), int(decided.sum())
