"""The SPO loss against float64 hand computations, and the transition log-probs on tiny models."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from spo.backbones import SD15Backbone, SD3Backbone, SDXLBackbone
from spo.config import LoRAConfig
from spo.config import load_config
from spo.objectives import SPOObjective, spo_loss, transition_log_probs
from spo.sampling import PoolSampler

BACKBONES = {"sd15": SD15Backbone, "sdxl": SDXLBackbone, "sd3": SD3Backbone}


def _reference_loss(lw, lwr, ll, llr, beta, eps):  # noqa: ANN001, ANN202
    total, acc, margin, clamped = 0.0, 0, 0.0, 0
    for a, b, c, d in zip(lw, lwr, ll, llr):
        rw, rl = math.exp(a - b), math.exp(c - d)
        if eps is not None:
            clamped += (not (1 - eps <= rw <= 1 + eps)) + (not (1 - eps <= rl <= 1 + eps))
            rw_c, rl_c = min(max(rw, 1 - eps), 1 + eps), min(max(rl, 1 - eps), 1 + eps)
        else:
            rw_c, rl_c = rw, rl
        z = beta * (math.log(rw_c) - math.log(rl_c))
        total += -math.log(1 / (1 + math.exp(-z)))
        m = beta * (math.log(rw) - math.log(rl))
        acc += m > 0
        margin += m
    n = len(lw)
    return total / n, acc / n, margin / n, clamped / (2 * n)


@pytest.mark.parametrize("eps", [0.1, None])
def test_loss_matches_hand_computation(eps: float | None) -> None:
    g = torch.Generator().manual_seed(0)
    lw, lwr, ll, llr = (torch.randn(16, generator=g, dtype=torch.float64) * 0.08 for _ in range(4))
    out = spo_loss(lw, lwr, ll, llr, beta=10.0, eps=eps)
    loss, acc, margin, clamp = _reference_loss(lw.tolist(), lwr.tolist(), ll.tolist(), llr.tolist(), 10.0, eps)
    assert float(out.loss) == pytest.approx(loss, rel=1e-12)
    assert out.metrics["reward_accuracy"] == pytest.approx(acc)
    assert out.metrics["reward_margin"] == pytest.approx(margin, rel=1e-9)
    assert out.metrics["clamp_fraction"] == pytest.approx(clamp)
    if eps is not None:
        assert 0 < clamp < 1  # the draw has ratios on both sides of the band


def test_loss_is_log2_at_equal_policy_and_reference() -> None:
    x = torch.randn(8)
    out = spo_loss(x, x, x + 1, x + 1)
    assert float(out.loss) == pytest.approx(math.log(2))
    assert out.metrics["ratio_win"] == 1.0 and out.metrics["ratio_lose"] == 1.0
    assert out.metrics["reward_accuracy"] == 0.0


def test_clamp_stops_the_gradient_outside_the_band() -> None:
    lw = torch.tensor([0.5, 0.01], requires_grad=True)  # ratios e^0.5 = 1.65 (outside), 1.01 (inside)
    zero = torch.zeros(2)
    spo_loss(lw, zero, zero, zero, beta=10.0, eps=0.1).loss.backward()
    assert float(lw.grad[0]) == 0.0 and float(lw.grad[1]) < 0.0
    lw.grad = None
    spo_loss(lw, zero, zero, zero, beta=10.0, eps=None).loss.backward()
    assert float(lw.grad[0]) < 0.0  # no trust region without eps


def _rollout(kind: str, path: Path, inner_steps: int = 1):  # noqa: ANN202
    backbone = BACKBONES[kind].from_pretrained(str(path), device="cpu")
    backbone.attach_lora(LoRAConfig(rank=4))
    scorer = lambda im, p, t: im.mean(dim=(1, 2, 3)) * 100 + torch.arange(im.shape[0]) * 1e-3  # noqa: E731
    sampler = PoolSampler(backbone, scorer, num_inference_steps=10, k=3, threshold=0.0, inner_steps=inner_steps)
    return backbone, sampler, sampler.rollout(["a red circle", "a blue square"], torch.Generator().manual_seed(0)).records


def test_first_step_loss_is_log2(tiny_any_path: tuple[str, Path]) -> None:
    kind, path = tiny_any_path
    backbone, sampler, records = _rollout(kind, path)
    objective = SPOObjective.from_config(load_config("sd15"))
    assert objective.guidance_scale == 5.0  # CFG inside the log-prob model, as in sampling
    out = objective(backbone, sampler.schedule(), records)
    assert float(out.loss.detach()) == pytest.approx(math.log(2), abs=1e-6)
    assert out.metrics["ratio_win"] == pytest.approx(1.0, abs=1e-6)
    assert out.metrics["ratio_lose"] == pytest.approx(1.0, abs=1e-6)
    out.loss.backward()
    grads = [p.grad for p in backbone.trainable_parameters() if p.grad is not None]
    assert grads and any(float(g.abs().max()) > 0 for g in grads)


def test_lpo_first_step_loss_is_log2(tiny_any_path: tuple[str, Path]) -> None:
    """LPO's objective (SPO's loss at beta 500) on a latent-judged rollout with the LPO release's
    pools (from the first step, the sigma tie threshold): log 2 and ratios 1 at initialisation,
    and a gradient on the LoRA."""
    from fixed_scorers import LatentBrightness

    kind, path = tiny_any_path
    backbone = BACKBONES[kind].from_pretrained(str(path), device="cpu")
    backbone.attach_lora(LoRAConfig(rank=4))
    config = load_config("sd15-lpo", ["sampling.num_inference_steps=6"])
    sampler = PoolSampler.from_config(backbone, LatentBrightness(), config)
    assert sampler.scores_latents and sampler.divert_start_step == 0 and sampler.threshold_schedule == "sigma"
    rollout = sampler.rollout(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
    assert rollout.stats.decoded == 0 and len(rollout.records) > 0
    objective = SPOObjective.from_config(config)
    assert objective.beta == 500.0 and objective.guidance_scale == 5.0
    out = objective(backbone, sampler.schedule(), rollout.records)
    assert float(out.loss.detach()) == pytest.approx(math.log(2), abs=1e-6)
    assert out.metrics["ratio_win"] == pytest.approx(1.0, abs=1e-6)
    assert out.metrics["ratio_lose"] == pytest.approx(1.0, abs=1e-6)
    out.loss.backward()
    grads = [p.grad for p in backbone.trainable_parameters() if p.grad is not None]
    assert grads and any(float(g.abs().max()) > 0 for g in grads)


def test_log_probs_against_float64_per_record(tiny_sd15_path: Path) -> None:
    """MSPO records (some with their own x_t): one batched call equals a per-record float64
    computation from alpha-bar."""
    backbone, sampler, records = _rollout("sd15", tiny_sd15_path, inner_steps=3)
    schedule = sampler.schedule()
    assert not bool(records.shared_x_t.all()) and bool(records.shared_x_t.any())
    with torch.no_grad():
        logp_w, logp_l = transition_log_probs(backbone, schedule, records, guidance_scale=5.0)
    abar = schedule.alphas_cumprod.double()
    for i in range(len(records)):
        t = int(records.timesteps[i])
        a_t, a_prev = abar[t], (abar[t - 100] if t >= 100 else abar[0])
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        for x_t, x_prev, got in [
            (records.x_t_win[i : i + 1], records.x_prev_win[i : i + 1], logp_w[i]),
            (records.x_t_lose[i : i + 1], records.x_prev_lose[i : i + 1], logp_l[i]),
        ]:
            with torch.no_grad():
                eps = backbone.predict(x_t, t, records.cond.index([i]), 5.0).double()
            x0 = (x_t.double() - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            mu = a_prev.sqrt() * x0 + (1 - a_prev - var).sqrt() * eps
            ref = torch.distributions.Normal(mu, var.sqrt()).log_prob(x_prev.double()).mean()
            assert float(got) == pytest.approx(float(ref), abs=5e-4)


def test_guidance_matters_in_the_log_prob(tiny_sd15_path: Path) -> None:
    backbone, sampler, records = _rollout("sd15", tiny_sd15_path)
    with torch.no_grad():
        guided, _ = transition_log_probs(backbone, sampler.schedule(), records, guidance_scale=5.0)
        plain, _ = transition_log_probs(backbone, sampler.schedule(), records, guidance_scale=1.0)
    assert float((guided - plain).abs().max()) > 1e-4
    assert SPOObjective.from_config(load_config("sd15", ["objective.cfg=false"])).guidance_scale == 1.0
