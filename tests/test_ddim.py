"""The stochastic DDIM maths against diffusers' DDIMScheduler and float64 closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from spo.diffusion import (
    DDIMSchedule,
    ddim_log_prob,
    ddim_posterior,
    ddim_step,
    predict_x0_and_epsilon,
)

SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def _scheduler(prediction_type: str, set_alpha_to_one: bool, clip: bool = False) -> DDIMScheduler:
    return DDIMScheduler(
        **SD_SCHEDULE, prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one, clip_sample=clip
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_step_matches_diffusers(prediction_type: str, set_alpha_to_one: bool, eta: float) -> None:
    scheduler = _scheduler(prediction_type, set_alpha_to_one)
    scheduler.set_timesteps(20)
    schedule = DDIMSchedule.from_config(scheduler.config, 20)
    assert schedule.timesteps.tolist() == scheduler.timesteps.tolist()
    gen = torch.Generator().manual_seed(0)
    for t in [951, 751, 501, 51, 1]:  # t = 1 is the last step: previous timestep < 0
        x_t = torch.randn(3, 4, 8, 8, generator=gen)
        out = torch.randn(3, 4, 8, 8, generator=gen)
        noise = torch.randn(3, 4, 8, 8, generator=gen)
        ref = scheduler.step(out, t, x_t, eta=eta, variance_noise=noise if eta > 0 else None)
        ours = schedule.step(out, t, x_t, eta=eta, noise=noise)
        torch.testing.assert_close(ours.pred_original_sample, ref.pred_original_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.prev_sample, ref.prev_sample, rtol=1e-5, atol=1e-5)


def test_clip_sample_matches_diffusers() -> None:
    scheduler = _scheduler("epsilon", False, clip=True)
    scheduler.set_timesteps(10)
    schedule = DDIMSchedule.from_config(scheduler.config, 10)
    x_t, out, noise = (torch.randn(2, 3, 4, 4) * 3 for _ in range(3))
    ref = scheduler.step(out, 901, x_t, eta=1.0, variance_noise=noise)
    ours = schedule.step(out, 901, x_t, eta=1.0, noise=noise)
    assert ours.pred_original_sample.abs().max() <= 1.0
    torch.testing.assert_close(ours.prev_sample, ref.prev_sample, rtol=1e-5, atol=1e-5)


def test_batched_timesteps_match_row_by_row() -> None:
    scheduler = _scheduler("epsilon", False)
    scheduler.set_timesteps(20)
    schedule = DDIMSchedule.from_config(scheduler.config, 20)
    ts = torch.tensor([951, 501, 1, 251])
    x_t, out, noise = (torch.randn(4, 4, 8, 8) for _ in range(3))
    batched = schedule.step(out, ts, x_t, eta=1.0, noise=noise)
    for i, t in enumerate(ts.tolist()):
        ref = scheduler.step(out[i : i + 1], t, x_t[i : i + 1], eta=1.0, variance_noise=noise[i : i + 1])
        torch.testing.assert_close(batched.prev_sample[i : i + 1], ref.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batched.pred_original_sample[i : i + 1], ref.pred_original_sample)


def test_final_alpha_convention() -> None:
    for flag, expected in [(True, 1.0), (False, None)]:
        schedule = DDIMSchedule.from_config(_scheduler("epsilon", flag).config, 20)
        a_t, a_prev = schedule.alpha_bars(1)
        want = expected if expected is not None else float(schedule.alphas_cumprod[0])
        assert float(a_prev) == pytest.approx(want)
    with pytest.raises(ValueError, match="beyond the schedule"):
        schedule.alpha_bar(1000)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_types_recover_x0_and_eps(prediction_type: str) -> None:
    """Build x_t from known (x0, eps) in float64; each parametrisation must give them back."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    a = torch.tensor([0.9, 0.3, 0.01], dtype=torch.float64)
    s_a, s_1ma = a.sqrt().view(-1, 1, 1, 1), (1 - a).sqrt().view(-1, 1, 1, 1)
    x_t = s_a * x0 + s_1ma * eps
    output = {"epsilon": eps, "sample": x0, "v_prediction": s_a * eps - s_1ma * x0}[prediction_type]
    got_x0, got_eps = predict_x0_and_epsilon(output, x_t, a, prediction_type)  # type: ignore[arg-type]
    assert got_x0.dtype == torch.float64
    torch.testing.assert_close(got_x0, x0)
    torch.testing.assert_close(got_eps, eps)


def test_eta_one_posterior_is_the_ddpm_posterior() -> None:
    """With eta = 1 the DDIM transition equals q(x_{t-1} | x_t, x0) of DDPM (Ho et al., eq. 7)."""
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64)
    a_t = torch.tensor([0.2, 0.6], dtype=torch.float64)
    a_prev = torch.tensor([0.3, 0.75], dtype=torch.float64)
    v = lambda a: a.view(-1, 1, 1, 1)  # noqa: E731
    x_t = v(a_t).sqrt() * x0 + v(1 - a_t).sqrt() * noise
    eps = (x_t - v(a_t).sqrt() * x0) / v(1 - a_t).sqrt()
    mean, std = ddim_posterior(x0, eps, a_t, a_prev, eta=1.0)
    alpha = a_t / a_prev
    beta = 1 - alpha
    ddpm_mean = v(a_prev.sqrt() * beta / (1 - a_t)) * x0 + v(alpha.sqrt() * (1 - a_prev) / (1 - a_t)) * x_t
    ddpm_std = ((1 - a_prev) / (1 - a_t) * beta).sqrt()
    torch.testing.assert_close(mean, ddpm_mean)
    torch.testing.assert_close(std.flatten(), ddpm_std)
    # eta = 0 is deterministic DDIM: sigma = 0 and the mean re-noises x0 with the same eps
    mean0, std0 = ddim_posterior(x0, eps, a_t, a_prev, eta=0.0)
    assert float(std0.abs().max()) == 0.0
    torch.testing.assert_close(mean0, v(a_prev).sqrt() * x0 + v(1 - a_prev).sqrt() * eps)


def test_log_prob_matches_float64_normal() -> None:
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(4, 4, 6, 6, generator=g)
    std = torch.tensor([0.1, 0.5, 1.0, 2.0])
    x = mean + std.view(-1, 1, 1, 1) * torch.randn(4, 4, 6, 6, generator=g)
    ref = torch.distributions.Normal(mean.double(), std.double().view(-1, 1, 1, 1).expand_as(mean)).log_prob(
        x.double()
    )
    torch.testing.assert_close(ddim_log_prob(x, mean, std).double(), ref.mean(dim=(1, 2, 3)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        ddim_log_prob(x, mean, std, reduction="sum").double(), ref.sum(dim=(1, 2, 3)), rtol=1e-6, atol=1e-4
    )
    # float64 in, float64 out, exact
    exact = ddim_log_prob(x.double(), mean.double(), std.double().view(-1, 1, 1, 1), reduction="none")
    assert exact.dtype == torch.float64
    torch.testing.assert_close(exact, ref)
    # closed form at the mean: -log(sigma) - log(2 pi) / 2
    at_mean = ddim_log_prob(mean.double(), mean.double(), std.double())
    torch.testing.assert_close(at_mean, -std.double().log() - 0.5 * math.log(2 * math.pi))


def test_log_prob_gradient_is_analytic() -> None:
    mean = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    std = torch.tensor(0.7, dtype=torch.float64)
    ddim_log_prob(x, mean, std).sum().backward()
    torch.testing.assert_close(mean.grad, (x - mean.detach()) / std**2 / (3 * 4 * 4))


def test_log_prob_of_deterministic_step_is_an_error() -> None:
    with pytest.raises(ValueError, match="deterministic"):
        ddim_log_prob(torch.zeros(1, 2), torch.zeros(1, 2), 0.0)
    with pytest.raises(ValueError, match="reduction"):
        ddim_log_prob(torch.zeros(1, 2), torch.zeros(1, 2), 1.0, reduction="max")  # type: ignore[arg-type]


def test_log_prob_of_diffusers_draws_against_float64_betas() -> None:
    """Per-row log-densities of x_{t-1} drawn by diffusers' DDIMScheduler, against a float64
    computation from the raw betas (alpha-bar, DDPM posterior variance, Normal log-density)."""
    scheduler = _scheduler("epsilon", False)
    scheduler.set_timesteps(20)
    schedule = DDIMSchedule.from_config(scheduler.config, 20)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
    abar = torch.cumprod(1 - betas, dim=0)
    g = torch.Generator().manual_seed(4)
    ts = [901, 501, 1]
    x_t, out = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    prev = torch.cat([
        scheduler.step(out[i : i + 1], t, x_t[i : i + 1], eta=1.0, generator=g).prev_sample for i, t in enumerate(ts)
    ])
    mean, std = schedule.posterior(out, torch.tensor(ts), x_t, eta=1.0)
    ours = ddim_log_prob(prev, mean, std)
    for i, t in enumerate(ts):
        a_t, a_prev = abar[t], (abar[t - 50] if t >= 50 else abar[0])
        x0 = (x_t[i].double() - (1 - a_t).sqrt() * out[i].double()) / a_t.sqrt()
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        mu = a_prev.sqrt() * x0 + (1 - a_prev - var).sqrt() * out[i].double()
        ref = torch.distributions.Normal(mu, var.sqrt()).log_prob(prev[i].double()).mean()
        assert float(ours[i]) == pytest.approx(float(ref), abs=2e-4)


def test_step_requires_noise_when_stochastic() -> None:
    with pytest.raises(ValueError, match="noise"):
        ddim_step(torch.zeros(1, 1), torch.zeros(1, 1), 0.5, 0.6, eta=1.0)
