"""The baselines' losses against hand computations (float64), and DDPO's advantage statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spo.objectives.ddpo import PerPromptStatTracker, batch_advantages, ppo_clip_loss
from spo.objectives.diffusion_dpo import diffusion_dpo_loss
from spo.objectives.spo import spo_loss


def _logsigmoid(x: np.ndarray) -> np.ndarray:
    return -np.log1p(np.exp(-x))


def test_diffusion_dpo_loss_matches_hand_computation() -> None:
    rng = np.random.default_rng(0)
    e = rng.uniform(0.1, 0.3, size=(4, 6))  # policy win, policy lose, ref win, ref lose (6 pairs)
    beta = 5000.0
    inside = -0.5 * beta * ((e[0] - e[1]) - (e[2] - e[3]))
    expected = float(np.mean(-_logsigmoid(inside)))
    t = torch.tensor(e, requires_grad=True)
    out = diffusion_dpo_loss(t[0], t[1], t[2], t[3], beta=beta)
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-9)
    assert out.metrics["implicit_accuracy"] == pytest.approx(float(np.mean(inside > 0)))
    out.loss.backward()
    # d loss / d L_w = 0.5 * beta * sigmoid(-inside) / N; the reference gets no gradient
    sig = 1 / (1 + np.exp(inside))
    np.testing.assert_allclose(t.grad[0].numpy(), 0.5 * beta * sig / 6, rtol=1e-9)
    np.testing.assert_allclose(t.grad[1].numpy(), -0.5 * beta * sig / 6, rtol=1e-9)
    assert float(t.grad[2:].abs().sum()) == 0.0


def test_diffusion_dpo_loss_is_log_2_when_policy_is_reference() -> None:
    err_w, err_l = torch.rand(5), torch.rand(5)
    out = diffusion_dpo_loss(err_w, err_l, err_w.clone(), err_l.clone())
    assert float(out.loss) == pytest.approx(math.log(2), abs=1e-7)
    assert out.metrics["implicit_accuracy"] == 0.0


def test_d3po_loss_is_the_clamped_ratio_dpo_loss_in_ratio_space() -> None:
    """D3PO's code clamps the ratio exp(logp - logp_ref) to [1 - eps, 1 + eps], then takes
    -log sigmoid(beta * (log r_w - log r_l)); SPO's loss clamps the log-ratio: the same."""
    rng = np.random.default_rng(1)
    lp = rng.normal(-1.0, 0.15, size=(4, 32))
    beta, eps = 0.1, 0.1
    r_w = np.clip(np.exp(lp[0] - lp[1]), 1 - eps, 1 + eps)
    r_l = np.clip(np.exp(lp[2] - lp[3]), 1 - eps, 1 + eps)
    expected = float(np.mean(-_logsigmoid(beta * (np.log(r_w) - np.log(r_l)))))
    t = torch.tensor(lp)
    out = spo_loss(t[0], t[1], t[2], t[3], beta=beta, eps=eps)
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-9)
    assert 0 < out.metrics["clamp_fraction"] < 1  # the band is exercised on both sides


def test_ppo_clip_loss_matches_hand_computation_and_clips() -> None:
    log_old = torch.zeros(6, dtype=torch.float64)
    # ratios 1, 1 + 5e-5 (inside), 1 + 1e-3 and 1 - 1e-3 (outside) with positive and negative advantages
    ratio = torch.tensor([1.0, 1 + 5e-5, 1 + 1e-3, 1 + 1e-3, 1 - 1e-3, 1 - 1e-3], dtype=torch.float64)
    adv = torch.tensor([2.0, -1.0, 3.0, -3.0, 3.0, -7.0], dtype=torch.float64)
    log_new = ratio.log().requires_grad_(True)
    out = ppo_clip_loss(log_new, log_old, adv, clip=1e-4, adv_clip_max=5.0)
    a = adv.clamp(-5, 5).numpy()
    r = ratio.numpy()
    expected = np.mean(np.maximum(-a * r, -a * np.clip(r, 1 - 1e-4, 1 + 1e-4)))
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-12)
    assert out.metrics["clip_fraction"] == pytest.approx(4 / 6)
    assert out.metrics["approx_kl"] == pytest.approx(float(0.5 * np.mean(np.log(r) ** 2)), rel=1e-9)
    out.loss.backward()
    grad = log_new.grad.numpy()
    # unclipped rows: d/dlogp (-A * r) / N = -A * r / N; a row past the clip on the side its
    # advantage pushes towards has zero gradient; a row on the other side keeps its gradient
    np.testing.assert_allclose(grad[:2], -a[:2] * r[:2] / 6, rtol=1e-9)
    assert grad[2] == 0.0 and grad[5] == 0.0  # A > 0 with r > 1 + clip; A < 0 with r < 1 - clip
    np.testing.assert_allclose(grad[[3, 4]], -a[[3, 4]] * r[[3, 4]] / 6, rtol=1e-9)


def test_ppo_ratio_is_one_on_policy() -> None:
    lp = torch.randn(8)
    out = ppo_clip_loss(lp.clone(), lp, torch.randn(8))
    assert out.metrics["ratio"] == 1.0 and out.metrics["approx_kl"] == 0.0 and out.metrics["clip_fraction"] == 0.0


def test_advantages_per_batch_and_per_prompt_by_hand() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    r = rewards.numpy()
    np.testing.assert_allclose(batch_advantages(rewards).numpy(), (r - r.mean()) / (r.std() + 1e-8), rtol=1e-12)

    tracker = PerPromptStatTracker(buffer_size=3, min_count=3)
    # prompt 7 has 2 rewards (< min_count): the batch's statistics; prompt 9 has 2 too
    first = tracker.update([7, 7, 9, 9], rewards)
    np.testing.assert_allclose(first.numpy(), (r - r.mean()) / (r.std() + 1e-6), rtol=1e-12)
    # prompt 7 now holds [1, 2, 4] (buffer 3 keeps the last three of 1, 2, 4): its own statistics
    second = tracker.update([7, 9], torch.tensor([4.0, 10.0], dtype=torch.float64))
    own = np.array([1.0, 2.0, 4.0])
    assert float(second[0]) == pytest.approx((4.0 - own.mean()) / (own.std() + 1e-6))
    nine = np.array([3.0, 6.0, 10.0])
    assert float(second[1]) == pytest.approx((10.0 - nine.mean()) / (nine.std() + 1e-6))
    third = tracker.update([7], torch.tensor([5.0], dtype=torch.float64))  # buffer: [2, 4, 5]
    kept = np.array([2.0, 4.0, 5.0])
    assert float(third[0]) == pytest.approx((5.0 - kept.mean()) / (kept.std() + 1e-6))
    restored = PerPromptStatTracker(buffer_size=3, min_count=3)
    restored.load_state_dict(tracker.state_dict())
    assert restored.state_dict() == tracker.state_dict() == {"7": [2.0, 4.0, 5.0], "9": [3.0, 6.0, 10.0]}
