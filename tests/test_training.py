"""The SPO trainer on the tiny SD-1.5 pipeline: learning, exact resume, export, run-dir safety."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spo.cli import main
from spo.config import load_config
from fixed_scorers import PROMPTS, brightness
from spo.training import CheckpointError, SPOTrainer, TrainingError, latest_checkpoint, read_metrics





def _config(model: Path, prompts: Path, *overrides: str):  # noqa: ANN202
    return load_config(
        "sd15",
        [
            f"model.pretrained={model}", "model.resolution=32", "model.device=cpu", "model.dtype=float32",
            "train.mixed_precision=no", f"data.prompts={prompts}", "train.rounds=4", "train.prompts_per_round=2",
            "train.batch_size=8", "sampling.num_inference_steps=10", "pools.threshold=0.0",
            "optimizer.lr=1e-3", "logging.tensorboard=false", "logging.checkpoint_every=1", *overrides,
        ],
    )


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "lora" / "pytorch_lora_weights.safetensors"))


def test_training_learns_a_fixed_preference_on_held_out_pairs(tiny_sd15_path: Path, prompts_file: Path, tmp_path: Path) -> None:
    config = _config(tiny_sd15_path, prompts_file, "train.rounds=6", "train.prompts_per_round=4",
                     "train.batch_size=16", "optimizer.lr=3e-3", "logging.checkpoint_every=100")
    trainer = SPOTrainer(config, tmp_path / "run", scorer=brightness, progress=False)
    held_out = trainer.method.sampler.rollout(
        ["a red square", "a big purple circle", "three green cats", "a blue dog", "an orange tree", "two stars"],
        torch.Generator().manual_seed(12345),
    ).records
    with torch.no_grad():
        before = trainer.method.loss(trainer.backbone, trainer.schedule, held_out).metrics
    result = trainer.train()
    with torch.no_grad():
        after = trainer.method.loss(trainer.backbone, trainer.schedule, held_out).metrics
    assert before["reward_accuracy"] == 0.0 and before["loss"] == pytest.approx(0.6931, abs=1e-4)
    assert len(held_out) >= 30
    assert after["reward_accuracy"] > 0.65, after  # chance is 0.5
    assert after["reward_margin"] > 0 and after["loss"] < before["loss"]
    assert result.steps == 12 and result.skipped_rounds == 0
    steps = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if m["type"] == "step"]
    assert steps[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)
    assert steps[0]["ratio_win"] == 1.0 and steps[0]["ratio_lose"] == 1.0


def test_metrics_config_and_logs(tiny_sd15_path: Path, prompts_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = _config(tiny_sd15_path, prompts_file, "train.rounds=2", "logging.tensorboard=true")
    SPOTrainer(config, run, scorer=brightness, progress=False).train()
    saved = load_config(run / "config.yaml")
    assert saved.train.num_processes == 1 and saved.pools.threshold == 0.0
    entries = read_metrics(run / "metrics.jsonl")
    steps = [e for e in entries if e["type"] == "step"]
    rounds = [e for e in entries if e["type"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1]
    for key in ("step", "round", "loss", "ratio_win", "ratio_lose", "clamp_fraction", "reward_accuracy",
                "reward_margin", "lr", "num_processes"):
        assert all(key in s for s in steps), key
    for key in ("valid_pair_rate", "score_mean", "score_std", "sampling_seconds", "training_seconds", "num_processes"):
        assert all(key in r for r in rounds), key
    assert rounds[0]["pools"] == 2 * 6 and rounds[0]["valid_records"] == 12  # 6 pools of 2 prompts
    assert list((run / "logs").rglob("events.out.tfevents*")), "TensorBoard logs by default"


def test_resume_is_exact(tiny_sd15_path: Path, prompts_file: Path, tmp_path: Path) -> None:
    config = _config(tiny_sd15_path, prompts_file, "logging.checkpoint_every=2")
    SPOTrainer(config, tmp_path / "full", scorer=brightness, progress=False).train()
    interrupted = SPOTrainer(config, tmp_path / "cut", scorer=brightness, progress=False)
    interrupted.train(stop_after=3)  # killed after round 3; the last checkpoint is after round 2
    assert latest_checkpoint(tmp_path / "cut").name == "round-000002"
    resumed = SPOTrainer(config, tmp_path / "cut", scorer=brightness, resume=True, progress=False)
    assert resumed.rounds_done == 2
    resumed.train()
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full_log = read_metrics(tmp_path / "full" / "metrics.jsonl")
    cut_log = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [e["loss"] for e in full_log if e["type"] == "step"] == [e["loss"] for e in cut_log if e["type"] == "step"]


def test_run_directory_safety(tiny_sd15_path: Path, prompts_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = _config(tiny_sd15_path, prompts_file, "train.rounds=1")
    SPOTrainer(config, run, scorer=brightness, progress=False).train()
    with pytest.raises(TrainingError, match="--resume"):
        SPOTrainer(config, run, scorer=brightness, progress=False)
    with pytest.raises(CheckpointError, match="pools.k"):
        SPOTrainer(_config(tiny_sd15_path, prompts_file, "train.rounds=2", "pools.k=3"), run, scorer=brightness,
                   resume=True, progress=False)
    # a half-written checkpoint (no trainer state) is never taken for the latest
    (run / "checkpoints" / ".tmp-round-000009").mkdir()
    (run / "checkpoints" / "round-000010").mkdir()
    assert latest_checkpoint(run).name == "round-000001"
    # longer run, same directory: --resume continues it
    more = SPOTrainer(_config(tiny_sd15_path, prompts_file, "train.rounds=2"), run, scorer=brightness,
                      resume=True, progress=False)
    assert more.train().rounds == 2


def test_non_finite_loss_stops_cleanly(tiny_sd15_path: Path, prompts_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer = SPOTrainer(_config(tiny_sd15_path, prompts_file), run, scorer=brightness, progress=False)
    trainer.train(stop_after=1)
    real = trainer.method.loss

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        out = real(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    trainer.method.loss = broken  # type: ignore[method-assign]
    with pytest.raises(TrainingError, match="non-finite"):
        trainer.train()
    assert latest_checkpoint(run).name == "round-000001"


def test_saved_lora_round_trips_through_diffusers(tiny_sd15_path: Path, prompts_file: Path, tmp_path: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from spo.sampling import ddim_sample

    run = tmp_path / "run"
    trainer = SPOTrainer(_config(tiny_sd15_path, prompts_file, "optimizer.lr=1e-2", "objective.eps=null"), run,
                         scorer=brightness, progress=False)
    trainer.train()
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd15_path))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=10, guidance_scale=5.0, eta=0.0, height=32, width=32, output_type="latent")
    before = pipe(["a red circle"], generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(str(run / "lora"))
    after = pipe(["a red circle"], generator=torch.Generator().manual_seed(0), **kw).images
    assert float((after - before).abs().max()) > 1e-2
    trainer.backbone.policy_forward = None
    ours = ddim_sample(trainer.backbone, ["a red circle"], num_inference_steps=10, eta=0.0, guidance_scale=5.0,
                       generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, after, rtol=1e-4, atol=1e-4)


def test_cli_train_errors(tiny_sd15_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["train", "sd15", "--output", str(tmp_path / "run"), f"model.pretrained={tiny_sd15_path}",
            "model.dtype=float32", "model.device=cpu", "train.mixed_precision=no"]
    assert main([*base, f"data.prompts={tmp_path / 'missing.txt'}"]) == 2
    assert "missing.txt" in capsys.readouterr().err
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert main([*base, f"data.prompts={empty}"]) == 2
    assert "no prompt" in capsys.readouterr().err
    assert main([*base]) == 2
    assert "data.prompts" in capsys.readouterr().err


def test_cli_train_end_to_end(tiny_sd15_path: Path, prompts_file: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    from spo.backbones.tiny import save_tiny_clip

    clip = save_tiny_clip(tmp_path / "clip")
    run = tmp_path / "run"
    args = ["train", "sd15", "--output", str(run), f"model.pretrained={tiny_sd15_path}", "model.dtype=float32",
            "model.device=cpu", "model.resolution=32", "train.mixed_precision=no", f"data.prompts={prompts_file}",
            "train.rounds=2", "train.prompts_per_round=2", "seed=3", "pools.k=3", "pools.threshold=0.0",
            "logging.checkpoint_every=1", f"preference.pretrained={clip}", "sampling.num_inference_steps=8",
            "preference.checkpoint=null", "preference.variant=clean"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "optimiser steps" in out and "pytorch_lora_weights.safetensors" in out
    assert (run / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert json.loads((run / "checkpoints" / "round-000002" / "trainer_state.json").read_text())["rounds_done"] == 2
    for name in ("optimizer.pt", "lr_scheduler.pt", "rng-0.pt"):  # plain tensors: loadable without pickled code
        torch.load(run / "checkpoints" / "round-000002" / name, weights_only=True)


def test_bf16_mixed_precision_keeps_lora_in_fp32(tiny_sd15_path: Path, prompts_file: Path, tmp_path: Path) -> None:
    config = _config(tiny_sd15_path, prompts_file, "train.rounds=1", "train.mixed_precision=bf16", "model.dtype=bfloat16")
    trainer = SPOTrainer(config, tmp_path / "run", scorer=brightness, progress=False)
    assert trainer.backbone.unet.conv_in.weight.dtype == torch.bfloat16
    trainer.train()
    assert all(p.dtype == torch.float32 for p in trainer.params)
    first = next(e for e in read_metrics(tmp_path / "run" / "metrics.jsonl") if e["type"] == "step")
    assert first["loss"] == pytest.approx(0.6931472, abs=1e-5) and first["ratio_win"] == 1.0


def test_sdxl_training_and_lora_round_trip(tiny_sdxl_path: Path, prompts_file: Path, tmp_path: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    config = load_config("sdxl", [
        f"model.pretrained={tiny_sdxl_path}", "model.resolution=32", "model.device=cpu", "model.dtype=float32",
        "model.vae=null", "train.mixed_precision=no", f"data.prompts={prompts_file}", "train.rounds=2",
        "train.prompts_per_round=2", "sampling.num_inference_steps=8", "pools.threshold=0.0", "optimizer.lr=1e-2",
        "objective.eps=null", "lora.rank=4", "logging.tensorboard=false", "logging.checkpoint_every=1",
    ])
    assert config.pools.inner_steps == 4 and config.pools.k == 2  # MSPO, as the release trains SDXL
    trainer = SPOTrainer(config, tmp_path / "run", scorer=brightness, progress=False)
    result = trainer.train()
    assert result.steps > 0
    first = next(e for e in read_metrics(tmp_path / "run" / "metrics.jsonl") if e["type"] == "step")
    assert first["loss"] == pytest.approx(0.6931472, abs=1e-5)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_path))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=8, guidance_scale=5.0, eta=0.0, height=32, width=32, output_type="latent")
    before = pipe(["a red circle"], generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(str(tmp_path / "run" / "lora"))
    after = pipe(["a red circle"], generator=torch.Generator().manual_seed(0), **kw).images
    assert float((after - before).abs().max()) > 1e-3


def test_channels_last_and_compile_switches_reach_the_unet_and_the_vae_decoder(
        tiny_sd15_path: Path, prompts_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """model.channels_last / model.compile apply to the UNet and the VAE decoder (compile in place:
    the LoRA's saved keys are the same as without it)."""
    compiled: list[str] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    config = _config(tiny_sd15_path, prompts_file, "train.rounds=1", "model.channels_last=true", "model.compile=true")
    trainer = SPOTrainer(config, tmp_path / "run", scorer=brightness, progress=False)
    assert compiled == ["UNet2DConditionModel", "Decoder"]
    conv = trainer.backbone.vae.decoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    trainer.train()
    plain = SPOTrainer(_config(tiny_sd15_path, prompts_file, "train.rounds=1"), tmp_path / "plain", scorer=brightness,
                       progress=False)
    plain.train()
    assert _weights(tmp_path / "run").keys() == _weights(tmp_path / "plain").keys()


@pytest.mark.slow
def test_compiled_backbone_predicts_as_the_eager_one(tiny_sd15_path: Path) -> None:
    """torch.compile (inductor, on the CPU here) gives the eager UNet's prediction and decode."""
    from spo.backbones import SD15Backbone

    eager = SD15Backbone.from_pretrained(str(tiny_sd15_path), device="cpu")
    compiled = SD15Backbone.from_pretrained(str(tiny_sd15_path), device="cpu")
    compiled.compile()
    cond = eager.encode_prompts(["a red circle"])
    x = torch.randn(1, *eager.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(compiled.predict(x, 501, cond, 5.0), eager.predict(x, 501, cond, 5.0), atol=1e-4)
        assert torch.allclose(compiled.decode(x), eager.decode(x), atol=1e-4)


def test_carried_accumulation_equals_the_releases_accelerate_counter(tiny_sd15_path: Path, prompts_file: Path,
                                                                     tmp_path: Path) -> None:
    """``train.carry_accumulation`` against the release's own mechanism: accelerate's
    ``accumulate`` with ``gradient_accumulation_steps=3`` over the same micro-batches, round after
    round, its counter never reset (train_spo_sdxl.py). Rounds of 6 records in micro-batches of 4
    and 2: steps complete inside the next round, and the final LoRA weights agree."""
    from accelerate import Accelerator

    overrides = ("train.batch_size=4", "train.gradient_accumulation_steps=3", "train.carry_accumulation=true",
                 "train.prompts_per_round=1", "optimizer.lr=3e-3")
    ours = SPOTrainer(_config(tiny_sd15_path, prompts_file, *overrides), tmp_path / "ours", scorer=brightness,
                      progress=False)
    rounds = [ours.sample_round(r).records for r in range(3)]
    assert [len(r) for r in rounds] == [6, 6, 6]
    steps = [entry for r, records in enumerate(rounds) for entry in ours.train_on(records, r)]
    assert [s["round"] for s in steps] == [1, 2]  # micro-batches 3 and 6 of 6 complete a step
    assert [s["pairs"] for s in steps] == [4 + 2 + 4, 2 + 4 + 2]
    assert ours.pending["micro_batches"] == 0

    reference = SPOTrainer(_config(tiny_sd15_path, prompts_file, *overrides), tmp_path / "reference",
                           scorer=brightness, progress=False)
    accelerator = Accelerator(gradient_accumulation_steps=3, cpu=True)
    o = reference.config.optimizer
    optimizer = accelerator.prepare(torch.optim.AdamW(reference.params, lr=o.lr, betas=o.betas,
                                                      weight_decay=o.weight_decay, eps=o.eps))
    reference.policy.train()
    for records in rounds:
        for start in range(0, len(records), 4):
            with accelerator.accumulate(reference.policy):
                loss = reference.method.loss(reference.backbone, reference.schedule,
                                             records.index(torch.arange(start, min(start + 4, len(records))))).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
    for name, param in ours.trainable.items():
        torch.testing.assert_close(param, reference.trainable[name], rtol=1e-5, atol=1e-7)
    assert any(float((p - p0).detach().abs().max()) > 0 for p, p0 in zip(
        ours.trainable.values(), SPOTrainer(_config(tiny_sd15_path, prompts_file, *overrides), tmp_path / "init",
                                            scorer=brightness, progress=False).trainable.values()))


def test_resume_is_exact_with_an_open_accumulation(tiny_sd15_path: Path, prompts_file: Path, tmp_path: Path) -> None:
    """A checkpoint taken while a carried accumulation is open holds each process's gradients;
    resuming from it ends with the weights of the uninterrupted run."""
    config = _config(tiny_sd15_path, prompts_file, "train.rounds=3", "train.batch_size=4",
                     "train.gradient_accumulation_steps=3", "train.carry_accumulation=true", "train.prompts_per_round=1")
    SPOTrainer(config, tmp_path / "full", scorer=brightness, progress=False).train()
    SPOTrainer(config, tmp_path / "cut", scorer=brightness, progress=False).train(stop_after=2)
    checkpoint = latest_checkpoint(tmp_path / "cut")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["pending"]["micro_batches"] == 1 and (checkpoint / "grads-0.safetensors").is_file()
    resumed = SPOTrainer(config, tmp_path / "cut", scorer=brightness, resume=True, progress=False)
    assert resumed.pending["micro_batches"] == 1
    assert all(p.grad is not None for p in resumed.trainable.values())
    resumed.train()
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
