"""Diffusion-DPO, D3PO and DDPO on the one trainer, on the tiny SD-1.5 and SDXL pipelines: the
first loss at initialisation, learning on a fixed scorer or fixed pairs, exact resume, the
trajectory sampler, the LoRA round trip through diffusers, and errors before any model loads."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from spo.cli import main
from spo.config import load_config
from spo.objectives import method_class
from spo.objectives.spo import step_log_probs
from spo.sampling import ddim_sample
from fixed_scorers import PROMPTS, brightness
from lora_round_trip import assert_lora_reproduces_policy
from spo.training import SPOTrainer, read_metrics

OWN = {
    "diffusion_dpo": ["objective.beta=5000"],
    "d3po": ["objective.beta=0.1", "objective.samples_per_prompt=2"],
    "ddpo": ["objective.samples_per_prompt=2", "objective.stat_min_count=2"],
}




def _config(backbone: str, model: Path, prompts: Path, method: str, data: Path | None, *overrides: str):  # noqa: ANN202
    return load_config(backbone, [
        f"model.pretrained={model}", "model.resolution=32", "model.device=cpu", "model.dtype=float32", "model.vae=null",
        "train.mixed_precision=no", f"data.prompts={prompts}", "train.rounds=3", "train.prompts_per_round=2",
        "train.batch_size=8", "train.gradient_accumulation_steps=1", "sampling.num_inference_steps=6",
        "optimizer.lr=1e-3", "logging.tensorboard=false", "logging.checkpoint_every=1", f"objective.name={method}",
        *OWN[method],  # each method's own settings (objective.* is the method's section)
        "optimizer.max_grad_norm=1.0", "seed=0",  # the baselines clip (their presets); the seed these tests were set at
        *([f"data.preference_data={data}"] if data else []), *overrides,
    ])


def _scorer(method: str):  # noqa: ANN202
    return None if method == "diffusion_dpo" else brightness


def _lora(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("method", ["diffusion_dpo", "d3po", "ddpo"])
def test_first_loss_at_initialisation(method: str, tiny_any_path: tuple[str, Path], prompts_file: Path,
                                      pickapic_path: Path, tmp_path: Path) -> None:
    """DPO family: log 2 (policy = reference); DDPO: PPO ratio 1 (policy = sampling policy)."""
    backbone, model = tiny_any_path
    config = _config(backbone, model, prompts_file, method, pickapic_path, "train.rounds=1",
                     "train.prompts_per_round=4")
    trainer = SPOTrainer(config, tmp_path / "run", scorer=_scorer(method), progress=False)
    trainer.train()
    steps = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if m["type"] == "step"]
    assert steps, "no optimiser step"
    first = steps[0]
    if method == "ddpo":
        assert first["ratio"] == pytest.approx(1.0, abs=1e-5) and first["approx_kl"] < 1e-9
        assert first["clip_fraction"] == 0.0
    else:
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    if method == "d3po":
        assert first["ratio_win"] == pytest.approx(1.0, abs=1e-6) and first["ratio_lose"] == pytest.approx(1.0, abs=1e-6)
    if method == "diffusion_dpo":
        assert first["implicit_accuracy"] == 0.0 and first["model_diff"] == pytest.approx(first["ref_diff"], abs=1e-7)


def test_trajectory_sampling_is_plain_ddim_with_its_log_probs(tiny_sd15_path: Path) -> None:
    from spo.backbones import load_backbone

    config = load_config("sd15", [f"model.pretrained={tiny_sd15_path}", "model.resolution=32", "model.device=cpu",
                                  "model.dtype=float32"])
    bb = load_backbone(config.model)
    kw = dict(num_inference_steps=5, eta=1.0, guidance_scale=5.0)
    plain = ddim_sample(bb, PROMPTS[:3], generator=torch.Generator().manual_seed(3), **kw)
    traj = ddim_sample(bb, PROMPTS[:3], generator=torch.Generator().manual_seed(3), return_trajectory=True, **kw)
    assert traj.states.shape[:2] == (3, 6) and traj.log_probs.shape == (3, 5)
    torch.testing.assert_close(traj.latents, plain, rtol=0, atol=0)
    schedule = bb.schedule(5)
    cond = bb.encode_prompts(PROMPTS[:3])
    for j, t in enumerate(schedule.timesteps.tolist()):
        again = step_log_probs(bb, schedule, cond, torch.full((3,), t), traj.states[:, j], traj.states[:, j + 1],
                               guidance_scale=5.0)
        torch.testing.assert_close(again, traj.log_probs[:, j], rtol=1e-5, atol=1e-5)


def test_d3po_pairs_start_from_one_x_T_and_keep_every_step(tiny_sd15_path: Path, prompts_file: Path,
                                                              tmp_path: Path) -> None:
    config = _config("sd15", tiny_sd15_path, prompts_file, "d3po", None)
    trainer = SPOTrainer(config, tmp_path / "run", scorer=brightness, progress=False)
    collected = trainer.method.collect(PROMPTS[:3], torch.Generator().manual_seed(0))
    rec = collected.records
    n = config.sampling.num_inference_steps
    assert collected.units == 3 and collected.valid == 3 and len(rec) == 3 * n
    assert sorted(rec.step_index.tolist()) == sorted(list(range(n)) * 3)
    first = rec.step_index == 0
    assert bool(rec.shared_x_t[first].all()) and not bool(rec.shared_x_t[~first].any())
    assert bool((rec.score_win > rec.score_lose).all())
    # consecutive steps of one trajectory chain: x_{t-1} of step j is x_t of step j + 1
    for j in range(n - 1):
        a, b = rec.step_index == j, rec.step_index == j + 1
        torch.testing.assert_close(rec.x_prev_win[a], rec.x_t_win[b], rtol=0, atol=0)
    trainer.method.sampler.scorer = lambda images, prompts, t: torch.zeros(images.shape[0])  # every pair ties
    tied = trainer.method.collect(PROMPTS[:3], torch.Generator().manual_seed(0))
    assert tied.valid == 0 and len(tied.records) == 0


def test_ddpo_records_are_whole_trajectories_with_advantages(tiny_sd15_path: Path, prompts_file: Path,
                                                            tmp_path: Path) -> None:
    config = _config("sd15", tiny_sd15_path, prompts_file, "ddpo", None, "objective.per_prompt_stat_tracking=false")
    trainer = SPOTrainer(config, tmp_path / "run", scorer=brightness, progress=False)
    collected = trainer.method.collect(PROMPTS[:2], torch.Generator().manual_seed(0))
    rec = trainer.method.prepare(collected.records)
    n = config.sampling.num_inference_steps
    assert collected.units == 4 and len(rec) == 4 * n  # 2 prompts x 2 samples x n steps
    rewards = rec.reward.view(4, n)
    assert bool((rewards == rewards[:, :1]).all())  # a trajectory's steps share its final reward
    r = rewards[:, 0].double()
    torch.testing.assert_close(rec.advantage.view(4, n)[:, 0].double(), (r - r.mean()) / (r.std(unbiased=False) + 1e-8),
                               rtol=1e-5, atol=1e-5)
    assert rec.prompt_index.view(4, n)[:, 0].tolist() == [PROMPTS.index(PROMPTS[0])] * 2 + [1] * 2


@pytest.mark.parametrize("method", ["diffusion_dpo", "d3po", "ddpo"])
def test_resume_continues_exactly(method: str, tiny_sd15_path: Path, prompts_file: Path, pickapic_path: Path,
                                  tmp_path: Path) -> None:
    config = _config("sd15", tiny_sd15_path, prompts_file, method, pickapic_path)
    straight = tmp_path / "straight"
    SPOTrainer(config, straight, scorer=_scorer(method), progress=False).train()
    cut = tmp_path / "cut"
    SPOTrainer(config, cut, scorer=_scorer(method), progress=False).train(stop_after=2)
    SPOTrainer(config, cut, scorer=_scorer(method), resume=True, progress=False).train()
    a, b = _lora(straight), _lora(cut)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    rounds = lambda run: [m for m in read_metrics(run / "metrics.jsonl") if m["type"] == "round"]  # noqa: E731
    assert [r["loss"] for r in rounds(straight)] == [r["loss"] for r in rounds(cut)]


def test_diffusion_dpo_learns_fixed_pairs_on_held_out_pairs(tiny_sd15_fitted_vae_path: Path, prompts_file: Path,
                                                             pickapic_path: Path, tmp_path: Path) -> None:
    """The preference of the data (a bright square on the left wins) on held-out pairs; the VAE
    is fitted so that layout survives encoding (with the random tiny VAE nothing is learnable)."""
    config = _config("sd15", tiny_sd15_fitted_vae_path, prompts_file, "diffusion_dpo", pickapic_path,
                     "train.rounds=30", "train.prompts_per_round=16", "train.batch_size=16", "optimizer.lr=1e-3",
                     "data.empty_caption_probability=0.0", "logging.checkpoint_every=100")
    trainer = SPOTrainer(config, tmp_path / "run", progress=False)
    held_out_config = load_config(tmp_path / "run" / "config.yaml", ["data.preference_split=validation_unique"])
    held = method_class("diffusion_dpo")(held_out_config, trainer.backbone)
    # every held-out pair at 4 draws of (t, noise): the implicit accuracy of one draw is noisy
    batch = type(trainer.method.collect([0], torch.Generator()).records).cat(
        [held.collect(range(48), torch.Generator().manual_seed(7 + i)).records for i in range(4)])
    with torch.no_grad():
        before = trainer.method.loss(trainer.backbone, trainer.schedule, batch).metrics
    trainer.train()
    with torch.no_grad():
        after = trainer.method.loss(trainer.backbone, trainer.schedule, batch).metrics
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6) and len(batch) == 4 * 48
    assert after["implicit_accuracy"] > 0.7, after  # chance is 0.5 (measured: 0.83)
    assert after["loss"] < before["loss"] - 0.1


def test_wrong_inputs_are_clear_errors_before_any_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    # Diffusion-DPO without preference data; the model path does not even exist: nothing loads
    assert main(["train", "sd15-diffusion-dpo", "--output", str(out), f"model.pretrained={tmp_path / 'no-model'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "data.preference_data" in err[0]
    assert main(["train", "toy-diffusion-dpo", "--output", str(out), f"data.preference_data={tmp_path / 'nothing'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.preference_data" in err[0] and "nothing" in err[0]
    assert main(["train", "toy-ddpo", "--output", str(out), "objective.samples_per_prompt=0"]) == 2
    assert "objective.samples_per_prompt" in capsys.readouterr().err
    assert main(["train", "toy-d3po", "--output", str(out), "sampling.eta=0"]) == 2  # no log-probability
    assert "sampling.eta" in capsys.readouterr().err
    assert not out.exists()


def _mean_reward(trainer: SPOTrainer) -> float:
    """Mean brightness of fresh samples (fixed noise) of the current policy."""
    trainer.backbone.policy_forward = None
    latents = ddim_sample(trainer.backbone, PROMPTS * 2, num_inference_steps=6, eta=1.0, guidance_scale=5.0,
                          generator=torch.Generator().manual_seed(99))
    trainer.backbone.policy_forward = trainer.policy
    return float(brightness(trainer.backbone.decode(latents), [], torch.zeros(1)).mean())


@pytest.mark.parametrize("method", ["d3po", "ddpo"])
def test_online_baselines_raise_a_fixed_reward(method: str, tiny_sd15_path: Path, prompts_file: Path,
                                                tmp_path: Path) -> None:
    settings = {
        "d3po": ["objective.beta=1", "objective.eps=null", "train.prompts_per_round=6", "train.batch_size=18",
                 "optimizer.lr=1e-2"],
        "ddpo": ["train.prompts_per_round=3", "objective.samples_per_prompt=4", "train.batch_size=24",
                 "objective.clip_range=0.2", "objective.per_prompt_stat_tracking=false"],
    }[method]
    config = _config("sd15", tiny_sd15_path, prompts_file, method, None, "train.rounds=6", "optimizer.lr=3e-3",
                     "logging.checkpoint_every=100", *settings)  # later settings win
    trainer = SPOTrainer(config, tmp_path / "run", scorer=brightness, progress=False)
    start = _mean_reward(trainer)
    trainer.train()
    end = _mean_reward(trainer)
    assert end > start + 1.0, (start, end)


@pytest.mark.parametrize("method", ["diffusion_dpo", "ddpo"])
def test_trained_lora_round_trips_through_diffusers(method: str, tiny_any_path: tuple[str, Path], prompts_file: Path,
                                                    pickapic_path: Path, tmp_path: Path) -> None:
    """A baseline's final LoRA (diffusers format) loads into the diffusers pipeline and gives the
    same function as the trained policy."""
    backbone, model = tiny_any_path
    config = _config(backbone, model, prompts_file, method, pickapic_path, "train.rounds=2", "optimizer.lr=3e-2",
                     *(["objective.clip_range=0.2"] if method == "ddpo" else []))
    run = tmp_path / "run"
    trainer = SPOTrainer(config, run, scorer=_scorer(method), progress=False)
    trainer.train()
    # sd3: its own scheduler, the flow SDE at noise level 0 being its Euler sampler
    assert_lora_reproduces_policy(trainer, model, run / "lora", flow=backbone == "sd3")
