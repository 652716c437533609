"""LPO (objective.name=lpo) on the one trainer, on the tiny SD-1.5 and SDXL pipelines, as the
other methods are tested (tests/test_baselines.py, tests/test_training.py): the first loss at
initialisation, learning a fixed preference of latents, exact resume, the LoRA round trip through
diffusers; the latent rollout (nothing decoded, the next pass on the continuing candidate only,
the pool's own tie threshold); `spo train` with a real latent reward model built from the tiny
pipeline itself, and the error when the judge is not a latent one. Two gloo ranks:
tests/test_multiprocess.py::test_two_process_lpo."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fixed_scorers import PROMPTS, LatentBrightness, brightness
from lora_round_trip import assert_lora_reproduces_policy
from spo.cli import main
from spo.config import load_config
from spo.sampling import PoolSampler, ddim_sample
from spo.training import SPOTrainer, latest_checkpoint, read_metrics


def _config(backbone: str, model: Path, prompts: Path, *overrides: str):  # noqa: ANN202
    """The LPO preset of ``backbone`` on the tiny pipeline: the release's pools (k 4, from the
    first step, the sigma tie threshold) and beta 500; the judge is the test's fixed scorer unless
    a test builds the LRM (``preference.pretrained`` is the tiny pipeline itself)."""
    return load_config(f"{backbone}-lpo", [
        f"model.pretrained={model}", "model.resolution=32", "model.device=cpu", "model.dtype=float32", "model.vae=null",
        "model.gradient_checkpointing=false", "train.mixed_precision=no", f"data.prompts={prompts}", "train.rounds=3",
        "train.prompts_per_round=2", "train.batch_size=8", "train.gradient_accumulation_steps=1",
        "sampling.num_inference_steps=6", "optimizer.lr=1e-3", "lora.rank=4", "lora.alpha=4",
        "logging.tensorboard=false", "logging.checkpoint_every=1", f"preference.pretrained={model}",
        "preference.checkpoint=null", "preference.text_projection=null", "preference.dtype=float32", "seed=0",
        *overrides,
    ])


def _lora(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))


def _steps(run: Path) -> list[dict]:
    return [m for m in read_metrics(run / "metrics.jsonl") if m["type"] == "step"]


# ------------------------------------------------------------------------------ the latent rollout
def test_lpo_rollout_decodes_nothing_and_passes_the_continuing_candidate_only(tiny_sd15_path: Path,
                                                                               prompts_file: Path,
                                                                               tmp_path: Path) -> None:
    """With a latent scorer: every pool scored on its candidates' x_{t-1} at t, no decode, and one
    UNet pass per step on the continuing candidate (steps x batch x 2 rows with CFG), where SPO's
    pools pass all k candidates to decode their x0-hat (1 + (steps - 1) x k passes of batch x 2)."""
    config = _config("sd15", tiny_sd15_path, prompts_file)
    scorer = LatentBrightness()
    trainer = SPOTrainer(config, tmp_path / "run", scorer=scorer, progress=False)
    sampler = trainer.method.sampler
    assert isinstance(sampler, PoolSampler) and sampler.scores_latents
    n, k, batch = config.sampling.num_inference_steps, config.pools.k, 3
    assert (config.pools.divert_start_step, k, config.sampling.guidance_scale) == (0, 4, 5.0)
    lpo = sampler.rollout(PROMPTS[:batch], torch.Generator().manual_seed(0))
    stats = lpo.stats
    assert stats.decoded == 0
    assert stats.unet_rows == n * batch * 2 and stats.unet_calls == n
    assert stats.scored == n * batch * k and stats.pools == n * batch
    timesteps = sampler.schedule().timesteps.tolist()
    assert scorer.calls == [(batch * k, [t] * batch * k) for t in timesteps]  # x_{t-1} scored at t
    records = lpo.records
    assert len(records) == stats.valid_pairs > 0
    # each record's scores are the judge's on its own x_{t-1} at its t
    again = LatentBrightness()
    torch.testing.assert_close(again(records.x_prev_win, [""] * len(records), records.timesteps), records.score_win)
    torch.testing.assert_close(again(records.x_prev_lose, [""] * len(records), records.timesteps), records.score_lose)
    assert bool((records.score_win > records.score_lose).all())

    # SPO's rollout of the same pools with an image scorer: every branch passes the UNet and is decoded
    spo = PoolSampler(trainer.backbone, brightness, num_inference_steps=n, k=k, threshold=0.0, divert_start_step=0,
                      guidance_scale=5.0).rollout(PROMPTS[:batch], torch.Generator().manual_seed(0)).stats
    assert spo.unet_rows == batch * 2 * (1 + (n - 1) * k)
    assert spo.decoded == spo.scored == n * batch * k
    assert lpo.stats.unet_rows < spo.unet_rows


def test_lpo_ties_follow_the_pools_own_threshold(tiny_sd15_path: Path, prompts_file: Path, tmp_path: Path) -> None:
    """pools.threshold_schedule=sigma: a pool is a tie under the threshold of its own t (0.35 at
    the last step, rising to 0.5 at the first); one fixed gap between them is a pair late only."""
    config = _config("sd15", tiny_sd15_path, prompts_file)
    trainer = SPOTrainer(config, tmp_path / "run", scorer=LatentBrightness(), progress=False)
    sampler = trainer.method.sampler
    thresholds = sampler.thresholds()
    timesteps = sampler.schedule().timesteps.tolist()
    assert thresholds[timesteps[0]] == pytest.approx(0.5) and thresholds[timesteps[-1]] == pytest.approx(0.35)
    gap = 2 * math.atanh(0.42)  # softmax gap tanh(gap / 2) = 0.42 between the two thresholds

    class Fixed:
        takes_latents = True

        def __call__(self, latents, prompts, t):  # noqa: ANN001, ANN204
            return torch.arange(latents.shape[0]).remainder(config.pools.k).clamp(max=1).float() * gap

    sampler.scorer = Fixed()
    stats = sampler.rollout(PROMPTS[:2], torch.Generator().manual_seed(0)).stats
    assert {t: stats.valid_per_step[t] > 0 for t in timesteps} == {t: thresholds[t] < 0.42 for t in timesteps}
    assert 0 < sum(stats.valid_per_step.values()) < stats.pools


# ------------------------------------------------------------------------------ training
def test_lpo_first_loss_is_log2_at_initialisation(tiny_path: tuple[str, Path], prompts_file: Path,
                                                  tmp_path: Path) -> None:
    backbone, model = tiny_path
    config = _config(backbone, model, prompts_file, "train.rounds=1", "train.prompts_per_round=3")
    assert config.objective.name == "lpo" and config.objective.beta == 500.0
    trainer = SPOTrainer(config, tmp_path / "run", scorer=LatentBrightness(), progress=False)
    assert trainer.method.name == "lpo"
    trainer.train()
    steps = _steps(tmp_path / "run")
    assert steps, "no optimiser step"
    first = steps[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["ratio_win"] == pytest.approx(1.0, abs=1e-6) and first["ratio_lose"] == pytest.approx(1.0, abs=1e-6)
    assert first["reward_accuracy"] == 0.0
    rounds = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if m["type"] == "round"]
    assert rounds[0]["pools"] == 3 * config.sampling.num_inference_steps  # pools from the first step


def _mean_latent_brightness(trainer: SPOTrainer) -> float:
    """The fixed judge on fresh final latents (fixed noise) of the current policy."""
    trainer.backbone.policy_forward = None
    latents = ddim_sample(trainer.backbone, PROMPTS * 2, num_inference_steps=6, eta=1.0, guidance_scale=5.0,
                          generator=torch.Generator().manual_seed(99))
    trainer.backbone.policy_forward = trainer.policy
    return float(LatentBrightness()(latents, [""] * latents.shape[0], torch.zeros(latents.shape[0])).mean())


def test_lpo_learns_a_fixed_latent_preference(tiny_sd15_path: Path, prompts_file: Path, tmp_path: Path) -> None:
    """On held-out pools the implicit reward ranks the judge's winner first more often than
    chance, and the policy's own samples move the judge's way (brighter latents)."""
    config = _config("sd15", tiny_sd15_path, prompts_file, "train.rounds=6", "train.prompts_per_round=4",
                     "train.batch_size=16", "optimizer.lr=3e-3", "logging.checkpoint_every=100")
    trainer = SPOTrainer(config, tmp_path / "run", scorer=LatentBrightness(), progress=False)
    held_out = trainer.method.sampler.rollout(
        ["a red square", "a big purple circle", "three green cats", "a blue dog", "an orange tree", "two stars"],
        torch.Generator().manual_seed(12345),
    ).records
    with torch.no_grad():
        before = trainer.method.loss(trainer.backbone, trainer.schedule, held_out).metrics
    start = _mean_latent_brightness(trainer)
    trainer.train()
    with torch.no_grad():
        after = trainer.method.loss(trainer.backbone, trainer.schedule, held_out).metrics
    end = _mean_latent_brightness(trainer)
    assert before["reward_accuracy"] == 0.0 and before["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert len(held_out) >= 20
    assert after["reward_accuracy"] > 0.65, after  # chance is 0.5
    assert after["reward_margin"] > 0 and after["loss"] < before["loss"]
    assert end > start + 20, (start, end)  # measured: 8.5 -> 97


@pytest.mark.parametrize(("backbone", "judge"), [
    ("sd15", "fixed"),
    ("sd15", "lrm"),  # the real LRM of the pipeline, its fresh projections drawn again on resume
    ("sdxl", "fixed"),  # exact since the prompt cache encodes each prompt on its own
])
def test_lpo_resume_continues_exactly(backbone: str, judge: str, request: pytest.FixtureRequest,
                                      prompts_file: Path, tmp_path: Path) -> None:
    model = request.getfixturevalue(f"tiny_{backbone}_path")
    config = _config(backbone, model, prompts_file, "logging.checkpoint_every=2", "train.rounds=4",
                     *(["pools.threshold_min=0.0", "pools.threshold_max=0.01"] if judge == "lrm" else []))
    scorer = LatentBrightness if judge == "fixed" else lambda: None  # None: the trainer builds the LRM
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    SPOTrainer(config, straight, scorer=scorer(), progress=False).train()
    SPOTrainer(config, cut, scorer=scorer(), progress=False).train(stop_after=3)
    assert latest_checkpoint(cut).name == "round-000002"  # round 3 is lost and redone
    resumed = SPOTrainer(config, cut, scorer=scorer(), resume=True, progress=False)
    if judge == "lrm":
        from spo.preference.latent import LatentRewardModel

        assert isinstance(resumed.scorer, LatentRewardModel)
    assert resumed.rounds_done == 2
    resumed.train()
    a, b = _lora(straight), _lora(cut)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert [s["loss"] for s in _steps(straight)] == [s["loss"] for s in _steps(cut)]
    assert len(_steps(straight)) > 0


def test_lpo_lora_round_trips_through_diffusers(tiny_path: tuple[str, Path], prompts_file: Path,
                                                tmp_path: Path) -> None:
    """LPO's final LoRA (diffusers format) loads into the plain diffusers pipeline and gives the
    function of the trained policy."""
    backbone, model = tiny_path
    config = _config(backbone, model, prompts_file, "train.rounds=2", "optimizer.lr=3e-2", "objective.eps=null")
    run = tmp_path / "run"
    trainer = SPOTrainer(config, run, scorer=LatentBrightness(), progress=False)
    assert trainer.train().steps > 0
    assert_lora_reproduces_policy(trainer, model, run / "lora")


# ------------------------------------------------------------------------------ spo train
@pytest.mark.parametrize("backbone", ["sd15", "sdxl"])
def test_spo_train_lpo_with_a_latent_reward_model_of_the_pipeline_itself(
        backbone: str, request: pytest.FixtureRequest, prompts_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`spo train <backbone>-lpo` with preference.pretrained = the tiny pipeline: the trainer builds
    a real LatentRewardModel from that diffusion model's UNet and text encoder(s) and runs a round."""
    from spo.preference.latent import LatentRewardModel
    from spo.training.trainer import build_scorer

    model = request.getfixturevalue(f"tiny_{backbone}_path")
    run = tmp_path / "run"
    overrides = [f"model.pretrained={model}", "model.resolution=32", "model.device=cpu", "model.dtype=float32",
                 "model.vae=null", "model.gradient_checkpointing=false", "train.mixed_precision=no",
                 f"data.prompts={prompts_file}", "train.rounds=1", "train.prompts_per_round=2", "train.batch_size=8",
                 "sampling.num_inference_steps=4", "lora.rank=4", "lora.alpha=4", "logging.tensorboard=false",
                 f"preference.pretrained={model}", "preference.checkpoint=null", "preference.text_projection=null",
                 "preference.dtype=float32", "seed=1",
                 # the fresh LRM's projections are random: its gaps within a pool are far below the
                 # release's 0.35 .. 0.5 (every pool a tie); a low sigma schedule keeps a step
                 "pools.threshold_min=0.0", "pools.threshold_max=0.01"]
    lrm = build_scorer(load_config(f"{backbone}-lpo", overrides), torch.device("cpu"))
    assert isinstance(lrm, LatentRewardModel) and lrm.takes_latents
    assert lrm.family == ("sdxl" if backbone == "sdxl" else "sd")
    capsys.readouterr()
    assert main(["train", f"{backbone}-lpo", "--output", str(run), *overrides]) == 0
    out = capsys.readouterr().out
    assert f"latent reward model of {model}" in out
    rounds = [m for m in read_metrics(run / "metrics.jsonl") if m["type"] == "round"]
    assert len(rounds) == 1 and rounds[0]["pools"] == 2 * 4  # pools at every step
    assert not rounds[0]["skipped"] and rounds[0]["valid_records"] > 0
    steps = [m for m in read_metrics(run / "metrics.jsonl") if m["type"] == "step"]
    assert steps and steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    saved = load_config(run / "config.yaml")
    assert saved.objective.name == "lpo" and saved.preference.kind == "latent"


def test_lpo_without_a_latent_judge_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """objective.name=lpo with preference.kind=clip: exit 2, one `error:` line naming
    preference.kind, before any model loads (the model path does not even exist)."""
    out = tmp_path / "run"
    for args in (["sd15-lpo", "preference.kind=clip"], ["sd15", "objective.name=lpo"]):
        capsys.readouterr()
        assert main(["train", args[0], "--output", str(out), f"model.pretrained={tmp_path / 'no-model'}",
                     *args[1:]]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and "preference.kind" in err[0], err
        assert "preference.kind=latent" in err[0] and "preference.kind=clip" in err[0]
    assert not out.exists()
