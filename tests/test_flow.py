"""The flow-matching SDE step (issue: SPO on flow-matching models): diffusers' Euler step at
noise level 0, a float64 reference of Flow-GRPO's formulas, per-row timesteps, and the SDE's
marginals on a Gaussian world whose exact velocity is known in closed form."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from spo.diffusion import DDIMSchedule, FlowSDESchedule, ddim_log_prob, flow_sde_std, schedule_from_config


def _schedule(steps: int = 10, shift: float = 1.0) -> FlowSDESchedule:
    return FlowSDESchedule.from_config(FlowMatchEulerDiscreteScheduler(shift=shift).config, steps)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_noise_level_zero_is_diffusers_euler_step_exactly(shift: float) -> None:
    reference = FlowMatchEulerDiscreteScheduler(shift=shift)
    reference.set_timesteps(8)
    schedule = _schedule(8, shift)
    assert torch.equal(schedule.timesteps, reference.timesteps.float())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ours = x.clone()
    for t in reference.timesteps:
        v = torch.randn(x.shape, generator=g)
        x = reference.step(v, t, x, return_dict=False)[0]
        ours = schedule.step(v, t, ours, eta=0.0).prev_sample
        assert torch.equal(ours, x), float(t)


def _reference(v: torch.Tensor, x: torch.Tensor, s: float, s_next: float, a: float, sigma_max: float):  # noqa: ANN202
    """Flow-GRPO's sde_step_with_logprob written out in float64."""
    v, x = v.double(), x.double()
    std = a * math.sqrt(s / (1 - (sigma_max if s == 1 else s)))
    dt = s_next - s
    mean = x * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
    return mean, std * math.sqrt(-dt)


@pytest.mark.parametrize("index", [0, 3, 9])
def test_mean_std_and_log_prob_against_a_float64_reference(index: int) -> None:
    schedule = _schedule(10, shift=3.0)
    g = torch.Generator().manual_seed(index)
    x, v, eps = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    t = schedule.timesteps[index]
    s, s_next = float(schedule.sigmas[index]), float(schedule.sigmas[index + 1])
    mean, std = schedule.posterior(v, t, x, eta=0.7)
    ref_mean, ref_std = _reference(v, x, s, s_next, 0.7, float(schedule.sigmas[1]))
    assert torch.allclose(mean.double(), ref_mean, atol=1e-5, rtol=1e-5)
    assert float(std) == pytest.approx(ref_std, rel=1e-6)
    x_next = schedule.step(v, t, x, eta=0.7, noise=eps).prev_sample
    assert torch.allclose(x_next.double(), ref_mean + ref_std * eps.double(), atol=1e-5)
    ref_log_prob = (-((x_next.double() - ref_mean) ** 2) / (2 * ref_std**2) - math.log(ref_std)
                    - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))
    log_prob = ddim_log_prob(x_next, mean, std)
    assert log_prob.dtype == torch.float32 and torch.allclose(log_prob.double(), ref_log_prob, atol=1e-4, rtol=1e-5)
    x0 = schedule.step(v, t, x, eta=0.7, noise=eps).pred_original_sample
    assert torch.allclose(x0.double(), x.double() - s * v.double(), atol=1e-6)


def test_first_step_at_sigma_one_uses_sigma_max() -> None:
    schedule = _schedule(10)
    assert float(schedule.sigmas[0]) == 1.0
    std = flow_sde_std(schedule.sigmas[0], 0.7, float(schedule.sigmas[1]))
    assert math.isfinite(float(std)) and float(std) == pytest.approx(0.7 * math.sqrt(1 / (1 - float(schedule.sigmas[1]))))


def test_per_row_timesteps_equal_row_by_row_steps() -> None:
    schedule = _schedule(10, shift=3.0)
    g = torch.Generator().manual_seed(1)
    x, v, eps = (torch.randn(4, 4, 8, 8, generator=g) for _ in range(3))
    t = schedule.timesteps[torch.tensor([0, 2, 5, 9])]
    both = schedule.step(v, t, x, eta=0.7, noise=eps)
    for row in range(4):
        one = schedule.step(v[row : row + 1], t[row], x[row : row + 1], eta=0.7, noise=eps[row : row + 1])
        assert torch.allclose(both.prev_sample[row], one.prev_sample[0], atol=1e-6)
        assert torch.allclose(both.mean[row], one.mean[0], atol=1e-6)
        assert float(both.std.flatten()[row]) == pytest.approx(float(one.std))
    assert both.std.shape == (4, 1, 1, 1)
    with pytest.raises(ValueError, match="not on this schedule"):
        schedule.step(v, torch.tensor([3.5, 1.0, 2.0, 4.0]), x, eta=0.7, noise=eps)


@pytest.mark.parametrize("noise_level", [0.0, 0.7])
def test_the_sde_keeps_the_flow_marginals(noise_level: float) -> None:
    """1-D data x0 ~ N(m, c^2): the exact velocity E[eps - x0 | x_s] is linear in x_s. Sampling
    from s = 1 with it (ODE or SDE) must end near N(m, c^2); a wrong drift correction does not."""
    m, c = 1.5, 0.5
    schedule = _schedule(200)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, 1, generator=g, dtype=torch.float64)
    for t in schedule.timesteps:
        s = float(t) / 1000
        var = (1 - s) ** 2 * c**2 + s**2
        v = -m + (s - (1 - s) * c**2) / var * (x - (1 - s) * m)
        x = schedule.step(v, t, x, eta=noise_level, noise=torch.randn(x.shape, generator=g, dtype=torch.float64)).prev_sample
    assert float(x.mean()) == pytest.approx(m, abs=0.01)
    assert float(x.std()) == pytest.approx(c, abs=0.01)


def test_noising_and_target_are_rectified_flow() -> None:
    schedule = _schedule(10)
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = schedule.training_timesteps(3, torch.Generator().manual_seed(0))
    assert bool(((t > 0) & (t <= 1000)).all())
    x_t = schedule.add_noise(x0, eps, t)
    s = (t / 1000).view(-1, 1, 1, 1)
    assert torch.allclose(x_t, (1 - s) * x0 + s * eps, atol=1e-6)
    target = schedule.training_target(x0, eps, t)
    assert torch.allclose(schedule.predict_x0(target, t, x_t), x0, atol=1e-5)  # the exact velocity recovers x0


def test_schedule_from_config_picks_by_the_scheduler_class() -> None:
    assert isinstance(schedule_from_config(FlowMatchEulerDiscreteScheduler(shift=3.0), 5), FlowSDESchedule)
    assert isinstance(schedule_from_config(DDIMScheduler(), 5), DDIMSchedule)
    saved = {**FlowMatchEulerDiscreteScheduler().config, "_class_name": "FlowMatchEulerDiscreteScheduler"}
    assert isinstance(schedule_from_config(saved, 5), FlowSDESchedule)  # a scheduler_config.json
    with pytest.raises(ValueError, match="dynamic shifting"):
        FlowSDESchedule.from_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config, 5)
