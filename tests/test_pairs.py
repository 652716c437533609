"""Pair choice and the tie rule, on hand-made score sets."""

from __future__ import annotations

import math

import pytest
import torch

from spo.sampling import choose_continuation, choose_pairs, softmax_gap


def _gap(a: float, b: float) -> float:
    ea, eb = math.exp(a), math.exp(b)
    return (ea - eb) / (ea + eb)


def test_best_worst_and_tie_rule() -> None:
    scores = torch.tensor(
        [
            [20.0, 21.0, 20.5, 19.0],  # best 1, worst 3: gap = tanh(1) = 0.76 > 0.3
            [20.0, 20.2, 20.1, 20.3],  # best 3, worst 0: gap = tanh(0.15) = 0.149 <= 0.3: tie
            [5.0, 5.0, 5.0, 5.0],  # all equal: tie
            [0.0, 0.62, 0.1, 0.3],  # gap = tanh(0.31) = 0.3004 > 0.3 (just above)
        ]
    )
    choice = choose_pairs(scores, threshold=0.3)
    assert choice.win.tolist()[:2] == [1, 3] and choice.lose.tolist()[:2] == [3, 0]
    assert choice.valid.tolist() == [True, False, False, True]
    expected = [_gap(21, 19), _gap(20.3, 20.0), 0.0, _gap(0.62, 0.0)]
    torch.testing.assert_close(choice.gap, torch.tensor(expected), atol=1e-6, rtol=0)
    # the threshold is strict: a gap equal to it is a tie (float64 scores stay float64)
    exact = torch.tensor([[math.atanh(0.3) * 2, 0.0]], dtype=torch.float64)
    gap = float(softmax_gap(exact[:, 0], exact[:, 1])[0])
    assert gap == pytest.approx(0.3, abs=1e-12)
    assert not bool(choose_pairs(exact, threshold=gap).valid[0])
    assert bool(choose_pairs(exact, threshold=math.nextafter(gap, 0.0)).valid[0])


def test_threshold_zero_keeps_every_pool_with_distinct_scores() -> None:
    scores = torch.tensor([[1.0, 1.0001], [2.0, 2.0]])
    assert choose_pairs(scores, threshold=0.0).valid.tolist() == [True, False]


def test_softmax_gap_is_tanh_of_half_difference() -> None:
    a, b = torch.tensor([3.0, -1.0]), torch.tensor([1.0, 2.0])
    torch.testing.assert_close(softmax_gap(a, b), torch.tanh((a - b) / 2))


def test_random_pair_is_ordered_by_score_and_distinct() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(200, 4, generator=g)
    choice = choose_pairs(scores, threshold=0.0, rule="random", generator=g)
    assert bool((choice.win != choice.lose).all())
    s_w = scores.gather(1, choice.win[:, None])[:, 0]
    s_l = scores.gather(1, choice.lose[:, None])[:, 0]
    assert bool((s_w >= s_l).all())
    # unlike best/worst, random pairs are often not the extremes
    assert float((choice.win != scores.argmax(1)).float().mean()) > 0.2


def test_resamplers() -> None:
    scores = torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 4.0]])
    choice = choose_pairs(scores, threshold=0.0)
    assert choose_continuation(choice, 3, "win").tolist() == [1, 2]
    assert choose_continuation(choice, 3, "lose").tolist() == [0, 1]
    draws = torch.cat([choose_continuation(choice, 3, "random", torch.Generator().manual_seed(i)) for i in range(300)])
    counts = torch.bincount(draws, minlength=3).float() / draws.numel()
    assert bool(((counts - 1 / 3).abs() < 0.06).all())  # uniform, independent of the scores
    with pytest.raises(ValueError, match="resampler"):
        choose_continuation(choice, 3, "best")  # type: ignore[arg-type]


def test_bad_shapes() -> None:
    with pytest.raises(ValueError, match="k >= 2"):
        choose_pairs(torch.zeros(3, 1), 0.3)
