"""Parity with the authors' release, run against its own code (tests/release_oracle.py).

On identical inputs, what the release computes and what we compute agree:

a. the DDIM step with log-prob (``spo/custom_diffusers/ddim_with_logprob.py``) over all timesteps,
   eta 1 and 0, fp32 and fp16, the three prediction types;
b. whole candidate-pool rollouts of the release's SD-1.5 pipeline (``multi_sample_pipeline``) and
   SDXL MSPO pipeline (``multi_sample_pipeline_sdxl``) against our ``PoolSampler`` on the tiny
   pipelines, both drawing from one pre-drawn noise bank and the same continuation choices, with
   a stub preference model and the release's pair rule (``compare_funcs.py``): the same scores,
   pairs, ties and win/lose records (latents, timesteps, prompt embeddings);
c. the SPO loss and its gradients: the release's own lines of ``train_spo.py`` /
   ``train_spo_sdxl.py`` (found by parsing the script, run as written) against ``spo_loss``,
   ratios inside and outside the clamp.

Each test records its largest difference: ``SPO_PARITY_REPORT=parity.json pytest
tests/test_release_parity.py`` writes them (docs/release-parity.md quotes them).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from release_oracle import release_module, release_statements
from spo.backbones import SD15Backbone, SDXLBackbone
from spo.diffusion import DDIMSchedule, ddim_log_prob
from spo.objectives.spo import spo_loss
from spo.sampling import PoolSampler

PROMPTS = ["a red circle", "a blue square", "two green stars"]
RANDINT = torch.randint  # the real one: the release's draw is replaced while it runs


def record_difference(point: str, value: float) -> None:
    """Keep the largest difference seen for ``point`` in the JSON file ``SPO_PARITY_REPORT`` names."""
    target = os.environ.get("SPO_PARITY_REPORT")
    if not target:
        return
    path = Path(target)
    report = json.loads(path.read_text()) if path.exists() else {}
    report[point] = max(float(value), report.get(point, 0.0))
    path.write_text(json.dumps(report, indent=2, sort_keys=True))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


# ------------------------------------------------------------------------------------- a. the DDIM step
def _release_scheduler(prediction_type: str, set_alpha_to_one: bool = False) -> Any:
    """The scheduler the release builds: ``DDIMScheduler.from_config`` of SD-1.5's (PNDM) config."""
    from diffusers import DDIMScheduler, PNDMScheduler

    sd15 = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                         skip_prk_steps=True, set_alpha_to_one=set_alpha_to_one, prediction_type=prediction_type)
    sd15.register_to_config(clip_sample=False)
    scheduler = DDIMScheduler.from_config(sd15.config)
    scheduler.set_timesteps(20)
    return scheduler


def _step_inputs(dtype: torch.dtype, n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x_t, out, prev = (torch.randn(n, 4, 8, 8, generator=gen).to(dtype) for _ in range(3))
    return x_t, out, prev


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_log_prob_matches_the_release_at_every_timestep(prediction_type: str, eta: float, dtype: torch.dtype) -> None:
    """All 20 timesteps in one batch (one per row, as training sees them), the x_{t-1} drawn
    near the mean and far from it: the release's log-prob and ours agree to float rounding."""
    release = release_module("custom_diffusers.ddim_with_logprob")
    scheduler = _release_scheduler(prediction_type)
    schedule = DDIMSchedule.from_config(scheduler.config, 20)
    assert schedule.timesteps.tolist() == scheduler.timesteps.tolist()
    ts = scheduler.timesteps.repeat(2)
    x_t, out, prev = _step_inputs(dtype, ts.numel())
    mean, std = schedule.posterior(out, ts, x_t, eta=eta)
    # half the rows drawn from the transition itself, half from elsewhere
    prev = torch.cat([(mean + std * prev.float())[:20], prev[20:].float()]).to(dtype)
    theirs = release.ddim_step_with_logprob(scheduler, out, ts, x_t, eta=eta, prev_sample=prev)
    ours = ddim_log_prob(prev, mean, std, reduction="mean")
    assert theirs.dtype == ours.dtype == torch.float32
    diff = max_diff(ours, theirs) / float(theirs.abs().max())
    record_difference(f"a. DDIM log-prob ({dtype}), relative", diff)
    assert diff < (1e-6 if dtype == torch.float32 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_ddim_transition_matches_the_release(eta: float, dtype: torch.dtype) -> None:
    """The release's sampling step (``ddim_seperate``: x0, then x_{t-1} from one noise) and ours
    give the same x_{t-1} at every timestep; at eta = 0 the step is deterministic, and there the
    release's log-prob is NaN while ours refuses (the trainer refuses eta <= 0 before it starts)."""
    seperate = release_module("custom_diffusers.ddim_seperate")
    logprob = release_module("custom_diffusers.ddim_with_logprob")
    scheduler = _release_scheduler("epsilon")
    schedule = DDIMSchedule.from_config(scheduler.config, 20)
    worst = 0.0
    for t in scheduler.timesteps:
        x_t, out, noise = _step_inputs(dtype, 3, seed=int(t))
        pred = seperate.ddim_step_fetch_x0(scheduler, out, t, x_t)
        original = seperate.randn_tensor
        seperate.randn_tensor = lambda *a, **k: noise  # the release's own draw, replaced by the shared noise
        try:
            theirs = seperate.ddim_step_fetch_x_t_1(scheduler, dtype=dtype, num_sample_per_step=1, timestep=t,
                                                    eta=eta, **pred)
        finally:
            seperate.randn_tensor = original
        ours = schedule.step(out, int(t), x_t, eta=eta, noise=noise).prev_sample
        assert ours.dtype == theirs.dtype == dtype
        worst = max(worst, max_diff(ours, theirs))
    record_difference(f"a. DDIM x_(t-1) ({dtype})", worst)
    assert worst <= (2e-6 if dtype == torch.float32 else 2e-3)  # fp16: one rounding of values ~3
    if eta == 0.0:
        t = scheduler.timesteps[:1].repeat(3)
        x_t, out, prev = _step_inputs(torch.float32, 3)
        assert not torch.isfinite(logprob.ddim_step_with_logprob(scheduler, out, t, x_t, eta=0.0, prev_sample=prev)).any()
        mean, std = schedule.posterior(out, t, x_t, eta=0.0)
        with pytest.raises(ValueError, match="deterministic"):
            ddim_log_prob(prev, mean, std)


def test_final_step_convention_differs_only_with_set_alpha_to_one() -> None:
    """The release clamps the previous timestep to 0 (alpha-bar(0) at the last step); we use the
    scheduler's ``final_alpha_cumprod``. SD-1.5 and SDXL set ``set_alpha_to_one: false``, where the
    two are the same value; with ``true`` only the last step differs (deliberate: the model's own
    scheduler config)."""
    release = release_module("custom_diffusers.ddim_with_logprob")
    for flag in (False, True):
        scheduler = _release_scheduler("epsilon", set_alpha_to_one=flag)
        schedule = DDIMSchedule.from_config(scheduler.config, 20)
        ts = scheduler.timesteps
        x_t, out, prev = _step_inputs(torch.float32, ts.numel(), seed=3)
        mean, std = schedule.posterior(out, ts, x_t, eta=1.0)
        if flag:  # sigma = 0 at the last step for us: compare the others
            theirs = release.ddim_step_with_logprob(scheduler, out[:-1], ts[:-1], x_t[:-1], eta=1.0, prev_sample=prev[:-1])
            ours = ddim_log_prob(prev[:-1], mean[:-1], std[:-1])
            assert float(std[-1].max()) == 0.0
            assert torch.isfinite(release.ddim_step_with_logprob(scheduler, out[-1:], ts[-1:], x_t[-1:], eta=1.0,
                                                                  prev_sample=prev[-1:])).all()
        else:
            theirs = release.ddim_step_with_logprob(scheduler, out, ts, x_t, eta=1.0, prev_sample=prev)
            ours = ddim_log_prob(prev, mean, std)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------- c. the loss
@pytest.mark.parametrize("script", ["train_scripts/train_spo.py", "train_scripts/train_spo_sdxl.py"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loss_and_gradients_match_the_release_lines(script: str, dtype: torch.dtype) -> None:
    """The release's three lines (clamped ratios, then -log sigmoid(beta log r_w - beta log r_l),
    batch mean) run as written in its training script, against ``spo_loss``: the same loss and the
    same gradients with respect to the policy's log-probs, for ratios inside the clamp, outside it
    on both sides, and a batch of each alone."""
    code, first, last = release_statements(script, "ratio_0", "loss")
    assert "torch.clamp" in code and "torch.sigmoid" in code and last - first == 2
    gen = torch.Generator().manual_seed(0)
    ref_w, ref_l = torch.randn(64, generator=gen, dtype=torch.float64) - 1.0, torch.randn(64, generator=gen, dtype=torch.float64) - 1.0
    # log-ratios from -0.3 to 0.3: about half of them outside [log 0.9, log 1.1]
    d_w = torch.linspace(-0.3, 0.3, 64, dtype=torch.float64)
    d_l = d_w[torch.randperm(64, generator=gen)]
    worst = 0.0
    for eps, beta in [(0.1, 10.0), (0.05, 2.0)]:
        inside, outside = 0.9 * eps, 1.2 * eps  # |log ratio| well inside / outside the clamp band
        cases = {"mixed": slice(None), "inside": (d_w.abs() < inside) & (d_l.abs() < inside),
                 "outside": (d_w.abs() > outside) & (d_l.abs() > outside)}
        for rows in cases.values():
            lw, ll = (ref_w + d_w)[rows].to(dtype), (ref_l + d_l)[rows].to(dtype)
            rw, rl = ref_w[rows].to(dtype), ref_l[rows].to(dtype)
            theirs_w, theirs_l = lw.clone().requires_grad_(True), ll.clone().requires_grad_(True)
            namespace = {"torch": torch, "total_prob_0": theirs_w, "total_ref_prob_0": rw, "total_prob_1": theirs_l,
                         "total_ref_prob_1": rl, "config": SimpleNamespace(train=SimpleNamespace(eps=eps, beta=beta))}
            exec(compile(code, f"{script}:{first}", "exec"), namespace)  # noqa: S102 - the release's own lines
            namespace["loss"].backward()
            ours_w, ours_l = lw.clone().requires_grad_(True), ll.clone().requires_grad_(True)
            out = spo_loss(ours_w, rw, ours_l, rl, beta=beta, eps=eps)
            out.loss.backward()
            tol = 1e-12 if dtype == torch.float64 else 2e-6
            torch.testing.assert_close(out.loss, namespace["loss"], rtol=tol, atol=tol)
            torch.testing.assert_close(ours_w.grad, theirs_w.grad, rtol=tol, atol=tol)
            torch.testing.assert_close(ours_l.grad, theirs_l.grad, rtol=tol, atol=tol)
            worst = max(worst, max_diff(out.loss, namespace["loss"]), max_diff(ours_w.grad, theirs_w.grad),
                        max_diff(ours_l.grad, theirs_l.grad))
            if rows is cases["outside"]:  # saturated ratios: no gradient on either side
                assert float(theirs_w.grad.abs().max()) == 0.0 and float(ours_w.grad.abs().max()) == 0.0
            if rows is cases["inside"]:
                assert float(ours_w.grad.abs().min()) > 0
    record_difference(f"c. loss and gradients ({dtype})", worst)


def test_loss_is_log_two_when_policy_equals_reference() -> None:
    code, first, _ = release_statements("train_scripts/train_spo.py", "ratio_0", "loss")
    lp = torch.randn(8, dtype=torch.float64)
    namespace = {"torch": torch, "total_prob_0": lp, "total_ref_prob_0": lp, "total_prob_1": lp + 1,
                 "total_ref_prob_1": lp + 1, "config": SimpleNamespace(train=SimpleNamespace(eps=0.1, beta=10.0))}
    exec(compile(code, f"train_spo.py:{first}", "exec"), namespace)  # noqa: S102
    assert float(namespace["loss"]) == pytest.approx(math.log(2), abs=1e-12)
    assert float(spo_loss(lp, lp, lp + 1, lp + 1).loss) == pytest.approx(math.log(2), abs=1e-12)


# ------------------------------------------------------------------------------------- b. the rollouts
class StubPreference:
    """A deterministic preference 'model' on decoded images: a fixed random projection of the
    4x4-pooled image, plus terms in the prompt and the timestep (so both must arrive right).
    It sees the images exactly as the pipeline hands them over (unclamped, as the release's SPM)."""

    takes_unclamped_images = True

    def __init__(self, scale: float) -> None:
        self.weights = torch.randn(48, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        self.scale = scale
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def score(self, images: torch.Tensor, prompt_ids: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        feats = F.adaptive_avg_pool2d(images.double(), 4).flatten(1)
        scores = self.scale * (feats @ self.weights) + 0.05 * prompt_ids.double() + timesteps.double() / 1000
        self.calls.append((images.detach().clone(), prompt_ids.clone(), timesteps.clone()))
        return scores.float()

    def release_fn(self, images: torch.Tensor, extra_info: dict[str, torch.Tensor]) -> torch.Tensor:
        """The release's ``preference_model_fn(img, extra_info)``: prompts arrive as the batch's
        tokens repeated k times (here: prompt indices)."""
        return self.score(images, extra_info["input_ids"], extra_info["timesteps"])

    def __call__(self, images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor) -> torch.Tensor:
        return self.score(images, torch.tensor([PROMPTS.index(p) for p in prompts]), timesteps)


class Banks:
    """The noise and the continuation choices of one rollout: drawn while the release runs
    (from a seeded generator, each noise in its logical (k, B, ...) layout), replayed for ours
    in our (B * k, ...) layout."""

    def __init__(self, k: int, batch: int) -> None:
        self.k, self.batch = k, batch
        self.gen = torch.Generator().manual_seed(11)
        self.noise: list[torch.Tensor] = []
        self.choices: list[torch.Tensor] = []

    def release_noise(self, shape: tuple[int, ...], generator: Any = None, device: Any = None, dtype: Any = None) -> torch.Tensor:
        shape = tuple(shape)
        logical = shape if shape[0] == self.batch or len(shape) == 5 else (self.k, self.batch, *shape[1:])
        noise = torch.randn(logical, generator=self.gen)
        self.noise.append(noise)
        return noise.reshape(shape).to(dtype)

    def release_randint(self, low: int, high: int, size: tuple[int, ...], device: Any = None, **kwargs: Any) -> torch.Tensor:
        assert (low, high, tuple(size)) == (0, self.k, (self.batch,)), "only the continuation choice draws integers"
        choice = RANDINT(0, self.k, (self.batch,), generator=self.gen)
        self.choices.append(choice)
        return choice.to(device)

    def replay(self) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
        noise, choices = iter(self.noise), iter(self.choices)

        def our_noise(shape: tuple[int, ...], generator: Any = None, device: Any = None, dtype: Any = None) -> torch.Tensor:
            entry = next(noise)
            if entry.ndim == len(shape) + 1:  # (k, B, ...) -> our candidate order (B, k, ...)
                entry = entry.transpose(0, 1)
            return entry.reshape(tuple(shape)).to(dtype)

        def our_choice(choice: Any, k: int, resampler: str = "random", generator: Any = None) -> torch.Tensor:
            # the release stops after its last pool; ours still picks which final latent to keep
            return next(choices, torch.zeros(self.batch, dtype=torch.long))

        return our_noise, our_choice


def _release_compare(threshold: float, seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Callable[..., Any]:
    rule = release_module("preference_models.compare_funcs").preference_score_compare

    def compare(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        indices, valid = rule(scores, threshold=threshold)
        seen.append((scores.clone(), indices.clone(), valid.clone()))
        return indices, valid

    return compare


def _our_rollout(monkeypatch: pytest.MonkeyPatch, backbone: Any, banks: Banks, x_T: torch.Tensor, stub: StubPreference,
                 **options: Any) -> tuple[Any, list[Any]]:
    import spo.sampling.pools as pools

    noise, choose = banks.replay()
    monkeypatch.setattr(pools, "randn_tensor", noise)
    monkeypatch.setattr(pools, "choose_continuation", choose)
    monkeypatch.setattr(backbone, "initial_latents", lambda batch, generator=None: x_T.clone())
    choices: list[Any] = []
    original = pools.choose_pairs

    def spy(scores: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = original(scores, *args, **kwargs)
        choices.append((scores.clone(), out))
        return out

    monkeypatch.setattr(pools, "choose_pairs", spy)
    sampler = PoolSampler(backbone, stub, num_inference_steps=20, eta=1.0, guidance_scale=5.0, decode_batch_size=None, **options)
    return sampler.rollout(PROMPTS), choices


def _compare_pools(release_pools: list[Any], ours: list[Any], k: int) -> tuple[float, int, int]:
    """Scores, pairs and ties of every pool; returns (largest score difference, valid, ties)."""
    assert len(release_pools) == len(ours)
    worst, valid, ties = 0.0, 0, 0
    for (their_scores, indices, their_valid), (our_scores, choice) in zip(release_pools, ours):
        # the release: (k, B) candidate-major; ours: (B, k)
        worst = max(worst, max_diff(our_scores, their_scores.T))
        assert torch.equal(choice.valid, their_valid)
        assert torch.equal(choice.win, indices[0]) and torch.equal(choice.lose, indices[-1])
        valid += int(their_valid.sum())
        ties += int((~their_valid).sum())
    return worst, valid, ties


def _their_records(times: torch.Tensor, current: torch.Tensor, nxt: torch.Tensor) -> dict[str, torch.Tensor]:
    if current.shape[1] == 1:  # SD-1.5: one shared x_t per record
        current = current.expand(-1, 2, *current.shape[2:])
    return {"timesteps": times[:, 0], "x_t_win": current[:, 0], "x_t_lose": current[:, 1],
            "x_prev_win": nxt[:, 0], "x_prev_lose": nxt[:, 1]}


def _compare_records(theirs: dict[str, torch.Tensor], ours: Any, embeds: torch.Tensor, our_embeds: torch.Tensor) -> float:
    assert len(ours) == theirs["timesteps"].shape[0] > 0
    assert ours.timesteps.tolist() == theirs["timesteps"].tolist()
    worst = max(max_diff(getattr(ours, name), theirs[name]) for name in ("x_t_win", "x_t_lose", "x_prev_win", "x_prev_lose"))
    worst = max(worst, max_diff(our_embeds, embeds))
    return worst


@pytest.fixture()
def release_sd15(tiny_sd15_path: Path) -> Iterator[Any]:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd15_path), safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # as train_spo.py does
    pipe.set_progress_bar_config(disable=True)
    yield pipe


def _run_release(monkeypatch: pytest.MonkeyPatch, banks: Banks, call: Callable[[], Any]) -> Any:
    seperate = release_module("custom_diffusers.ddim_seperate")
    with monkeypatch.context() as m:
        m.setattr(seperate, "randn_tensor", banks.release_noise)
        m.setattr(torch, "randint", banks.release_randint)
        return call()


SD15_SCALE = 400.0  # puts the tiny model's best-worst gaps around the 0.3 threshold: pairs and ties both occur


@pytest.mark.parametrize("divert", [4, 17])
def test_sd15_pool_rollout_matches_the_release(monkeypatch: pytest.MonkeyPatch, release_sd15: Any,
                                               tiny_sd15_path: Path, divert: int) -> None:
    """One full rollout of the release's SD-1.5 pipeline and of our PoolSampler (k = 4, 20 steps,
    CFG 5, eta 1, threshold 0.3) from the same x_T, noise and continuation choices: every pool's
    scores (the stub sees the same unclamped images at the same t), pairs and ties, and every
    win/lose record, agree."""
    pipeline = release_module("custom_diffusers.multi_sample_pipeline")
    k, batch = 4, len(PROMPTS)
    banks = Banks(k, batch)
    x_T = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    theirs_stub, their_pools = StubPreference(SD15_SCALE), []
    out = _run_release(monkeypatch, banks, lambda: pipeline.multi_sample_pipeline(
        release_sd15, prompt=PROMPTS, num_inference_steps=20, guidance_scale=5.0, eta=1.0, latents=x_T.clone(),
        divert_start_step=divert, num_samples_each_step=k, preference_model_fn=theirs_stub.release_fn,
        compare_fn=_release_compare(0.3, their_pools),
        extra_info={"input_ids": torch.arange(batch).repeat(k)},  # the release repeats the batch k times
    ))
    times, current, nxt, embeds, _ = out
    backbone = SD15Backbone.from_pretrained(str(tiny_sd15_path), device="cpu")
    our_stub = StubPreference(SD15_SCALE)
    rollout, our_pools = _our_rollout(monkeypatch, backbone, banks, x_T, our_stub, k=k, threshold=0.3,
                                      divert_start_step=divert)
    assert len(their_pools) == 20 - divert
    # the stub saw the same images (unclamped: some pixels beyond [-1, 1]) at the same timesteps
    assert len(theirs_stub.calls) == len(our_stub.calls) == 20 - divert
    image_diff = 0.0
    for (img_t, ids_t, ts_t), (img_o, ids_o, ts_o) in zip(theirs_stub.calls, our_stub.calls):
        order = torch.arange(batch * k).view(k, batch).T.reshape(-1)  # theirs (k, B) -> ours (B, k)
        image_diff = max(image_diff, max_diff(img_o, img_t[order]))
        assert torch.equal(ids_o, ids_t[order]) and ts_o.tolist() == ts_t[order].tolist()
    assert max(float(c[0].abs().max()) for c in theirs_stub.calls) > 1.0
    score_diff, valid, ties = _compare_pools(their_pools, our_pools, k)
    assert valid > 0 and (ties > 0 or divert > 4)
    record_diff = _compare_records(_their_records(times, current, nxt), rollout.records, embeds[:, 0],
                                   rollout.records.cond.prompt_embeds)
    record_difference("b. SD-1.5 rollout: decoded images", image_diff)
    record_difference("b. SD-1.5 rollout: scores", score_diff)
    record_difference("b. SD-1.5 rollout: records", record_diff)
    assert image_diff < 1e-4 and score_diff < 1e-3 and record_diff < 1e-4


@pytest.fixture()
def release_sdxl(tiny_sdxl_path: Path) -> Iterator[Any]:
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_path))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # as train_spo_sdxl.py does
    pipe.set_progress_bar_config(disable=True)
    yield pipe


SDXL_SCALE = 60.0  # gaps after j steps are wider: pairs and ties both occur at 0.4


@pytest.mark.parametrize("inner_steps,k", [(4, 2), (3, 3), (1, 2)])
def test_sdxl_mspo_rollout_matches_the_release(monkeypatch: pytest.MonkeyPatch, release_sdxl: Any,
                                               tiny_sdxl_path: Path, inner_steps: int, k: int) -> None:
    """The release's SDXL pipeline (MSPO: num_inner_step = j - 1) against ours with
    ``fold_last_step``: j = 4 (the release's recipe: segments 4-7, 8-11, 12-15, 16-19), j = 3
    (the last step folds: 16-19 has four steps) and j = 1 (SPO on this pipeline: the last two
    steps form one segment). Same pools, pairs, and every transition of the win and lose branches."""
    pipeline = release_module("custom_diffusers.multi_sample_pipeline_sdxl")
    batch = len(PROMPTS)
    banks = Banks(k, batch)
    x_T = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    theirs_stub, their_pools = StubPreference(SDXL_SCALE), []
    out = _run_release(monkeypatch, banks, lambda: pipeline.multi_sample_pipeline_sdxl(
        release_sdxl, prompt=PROMPTS, num_inference_steps=20, guidance_scale=5.0, eta=1.0, latents=x_T.clone(),
        divert_start_step=4, num_samples_each_step=k, num_inner_step=inner_steps - 1,
        preference_model_fn=theirs_stub.release_fn, compare_fn=_release_compare(0.4, their_pools),
        extra_info={"input_ids": torch.arange(batch).repeat(k)},
    ))
    times, current, nxt, embeds, pooled = out[:5]
    backbone = SDXLBackbone.from_pretrained(str(tiny_sdxl_path), device="cpu")
    our_stub = StubPreference(SDXL_SCALE)
    rollout, our_pools = _our_rollout(monkeypatch, backbone, banks, x_T, our_stub, k=k, threshold=0.4,
                                      divert_start_step=4, inner_steps=inner_steps, fold_last_step=True)
    score_diff, valid, ties = _compare_pools(their_pools, our_pools, k)
    assert valid > 0 and ties > 0
    rec = rollout.records
    record_diff = _compare_records(_their_records(times, current, nxt), rec, embeds[:, 0], rec.cond.prompt_embeds)
    record_diff = max(record_diff, max_diff(rec.cond.pooled, pooled[:, 0]))
    # every segment's transitions are records: j - 1 of each j start from the branches' own x_t
    assert int((~rec.shared_x_t).sum()) == len(rec) - int(rec.shared_x_t.sum())
    record_difference("b. SDXL MSPO rollout: scores", score_diff)
    record_difference("b. SDXL MSPO rollout: records", record_diff)
    assert score_diff < 1e-3 and record_diff < 1e-4


def test_without_folding_the_last_step_is_a_pool_of_its_own() -> None:
    """What ``fold_last_step`` changes (the SD-1.5 pipeline pools every step)."""
    from spo.sampling import pool_segments

    assert pool_segments(20, 4, 3) == [(4, 3), (7, 3), (10, 3), (13, 3), (16, 3), (19, 1)]
    assert pool_segments(20, 4, 3, fold_last_step=True) == [(4, 3), (7, 3), (10, 3), (13, 3), (16, 4)]
    assert pool_segments(20, 4, 4, fold_last_step=True) == [(4, 4), (8, 4), (12, 4), (16, 4)]
    assert pool_segments(20, 4, 1, fold_last_step=True)[-2:] == [(17, 1), (18, 2)]
    assert pool_segments(20, 19, 1, fold_last_step=True) == [(19, 1)]  # nothing before it to fold into
