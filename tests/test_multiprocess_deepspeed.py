"""DeepSpeed ZeRO-2 and ZeRO-3 through accelerate on two gloo CPU processes
(configs/accelerate/zero2.yaml; tests/deepspeed/zero3-tiny.json, a ZeRO-3 config that partitions
even the tiny models' small tensors; configs/accelerate/zero3.yaml), against the same runs under
DDP; what is refused, and why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (it comes with the dev extra)")

from engine_launch import (LORA, OPTIONS, PROMPTS, UNET, check_failed_writes, check_spm_and_lrm_against_ddp,  # noqa: E402
                           free_port, max_diff, ranks)
from spo.training import read_metrics  # noqa: E402
from spo.training.engines import DEEPSPEED, configure_deepspeed, deepspeed_install_problem, engine_of  # noqa: E402



@pytest.fixture(scope="module")
def zero_runs(engine_runs) -> Path:  # noqa: ANN001
    """The scenarios of multiprocess_fsdp.py under ZeRO-2, ZeRO-3 and DDP (``/ ENGINE``)."""
    for engine in ("zero2", "zero3", "zero3-yaml", "zero2-bf16", "ddp"):
        engine_runs(engine)
    return engine_runs.root


def test_zero_stages_shard_what_they_should(zero_runs: Path) -> None:
    """ZeRO-2 keeps the weights whole on every process (its sharding of gradients and AdamW's
    state is not observed here); ZeRO-3 gives each process half of the UNet, and under full
    fine-tuning half of the frozen reference too (an inference engine of its own)."""
    for scenario in ("lora", "full"):
        for r in ranks(zero_runs / "zero2" / scenario):
            assert r["engine"] == DEEPSPEED and r["local_fraction"] == 1.0, r
        for r in ranks(zero_runs / "zero3" / scenario):
            assert r["engine"] == DEEPSPEED and r["sharded_params"] == r["params"], r
            assert 0.45 < r["local_fraction"] < 0.55, r
    assert all(r["reference_local_fraction"] == 1.0 for r in ranks(zero_runs / "zero2" / "full"))
    assert all(0.45 < r["reference_local_fraction"] < 0.55 for r in ranks(zero_runs / "zero3" / "full"))


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_zero_trains_what_ddp_trains(zero_runs: Path, stage: str) -> None:
    """The same runs (LoRA: 3 rounds, gradient accumulation carried across rounds, so the engine
    is told which backward ends a step; full fine-tuning: 2 rounds) end with the same weights as
    under DDP, to reduction-order rounding, with the same number of optimiser steps."""
    zero, ddp = zero_runs / stage, zero_runs / "ddp"
    for scenario in ("lora", "full"):
        assert [r["steps"] for r in ranks(zero / scenario)] == [r["steps"] for r in ranks(ddp / scenario)]
        assert ranks(zero / scenario)[0]["steps"] > 1
    assert max_diff(zero / "lora" / LORA, ddp / "lora" / LORA) < 1e-5
    assert max_diff(zero / "full" / UNET, ddp / "full" / UNET) < 2e-4  # AdamW amplifies tiny gradient differences
    moved = load_file(str(zero / "lora" / LORA))
    assert max(float(v.abs().max()) for k, v in moved.items() if "lora_B" in k) > 1e-3  # B starts at 0


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_zero_resumes_exactly(zero_runs: Path, stage: str) -> None:
    """Stopped inside an open gradient accumulation and resumed by a new trainer, a ZeRO run ends
    bit for bit where the uninterrupted run ends, LoRA and full. ZeRO's buffers hold the open
    accumulation's gradients, so the checkpoint holds its micro-batches (replay-R), which the
    resumed run backpropagates again; weights and AdamW's state are whole and keyed by name, as
    under DDP."""
    zero = zero_runs / stage
    for scenario, final in (("lora", LORA), ("full", UNET)):
        stopped = ranks(zero / f"{scenario}-resume")
        assert all(r["pending_at_stop"] > 0 for r in stopped)
        assert max_diff(zero / scenario / final, zero / f"{scenario}-resume" / final) == 0.0
        checkpoint = sorted((zero / f"{scenario}-resume" / "checkpoints").iterdir())[0]
        assert sorted(p.name for p in checkpoint.glob("replay-*")) == ["replay-0.safetensors", "replay-1.safetensors"]
        assert not list(checkpoint.glob("grads-*"))
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        assert state["optimizer_keys"] == "name"
        assert state["replay"]["micro_batches"] == state["pending"]["micro_batches"] == stopped[0]["pending_at_stop"]
        optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
        trainable = load_file(str(checkpoint / "trainable.safetensors"))
        assert set(optimizer["state"]) == set(trainable)
        for name, value in trainable.items():
            assert optimizer["state"][name]["exp_avg"].shape == value.shape
            assert float(optimizer["state"][name]["step"]) == state["step"]


def test_zero2_bf16_full_fine_tuning_starts_at_log_2(zero_runs: Path) -> None:
    """Under ``bf16`` DeepSpeed casts the trained UNet to bfloat16; under ZeRO-2 the frozen
    reference of full fine-tuning is held in the same dtype, so at the first step the policy
    and the reference agree exactly: every ratio is 1 and the loss is log 2."""
    import math

    run = zero_runs / "zero2-bf16" / "full-bf16"
    for r in ranks(run):
        assert r["dtype"] == r["reference_dtype"] == "torch.bfloat16", r
    first = next(e for e in read_metrics(run / "metrics.jsonl") if e["type"] == "step")
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert first["ratio_win"] == first["ratio_lose"] == 1.0


def test_zero_replay_draws_what_the_original_micro_batches_drew(zero_runs: Path) -> None:
    """With LoRA dropout the forward draws random numbers: each replayed micro-batch runs under
    the RNG state its original ran under, so the resumed run still ends bit for bit where the
    uninterrupted one ends (and dropout did change the weights)."""
    zero = zero_runs / "zero2"
    assert all(r["pending_at_stop"] > 0 for r in ranks(zero / "lora-dropout-resume"))
    assert max_diff(zero / "lora-dropout" / LORA, zero / "lora-dropout-resume" / LORA) == 0.0
    assert max_diff(zero / "lora-dropout" / LORA, zero / "lora" / LORA) > 1e-6
    checkpoint = sorted((zero / "lora-dropout-resume" / "checkpoints").iterdir())[0]
    assert any(k.endswith("rng.cpu") for k in load_file(str(checkpoint / "replay-0.safetensors")))


def test_zero_checkpoints_have_ddps_format(zero_runs: Path) -> None:
    """A ZeRO checkpoint holds what a DDP checkpoint of the same run holds: the same weight and
    optimiser-state names, shapes and hyperparameters, and values equal to rounding."""
    ddp = sorted((zero_runs / "ddp" / "lora" / "checkpoints").iterdir())[-1]
    for stage in ("zero2", "zero3"):
        zero = zero_runs / stage / "lora" / "checkpoints" / ddp.name
        mine, theirs = (torch.load(c / "optimizer.pt", weights_only=True) for c in (zero, ddp))
        assert mine["state"].keys() == theirs["state"].keys()
        for name, entry in theirs["state"].items():
            assert mine["state"][name].keys() == entry.keys()
            for key, value in entry.items():
                scale = float(value.abs().max())
                assert key == "step" or scale > 0, (name, key)  # a moment of zeros would compare trivially
                assert float((mine["state"][name][key] - value).abs().max()) <= 1e-3 * scale + 1e-12, (stage, name, key)
        strip = [{k: v for k, v in g.items() if k not in ("params", "initial_lr")} for g in theirs["param_groups"]]
        assert [{k: g[k] for k in strip[0]} for g in mine["param_groups"]] == strip
        assert max_diff(zero / "trainable.safetensors", ddp / "trainable.safetensors") < 1e-5


def test_zero_final_weights_load_in_plain_diffusers(zero_runs: Path, tiny_sd15_path: Path) -> None:
    """The LoRA and the full UNet written under ZeRO-3 (gathered from the fp32 partitions) are
    whole, in diffusers' own formats."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    zero = zero_runs / "zero3"
    unet = UNet2DConditionModel.from_pretrained(str(zero / "full" / "unet"))
    saved = load_file(str(zero / "full" / UNET))
    assert set(saved) == set(unet.state_dict())
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in saved.items())
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd15_path), safety_checker=None)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, pipe.unet.config.in_channels, 4, 4, generator=gen)
    hidden = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        before = pipe.unet(x, 500, encoder_hidden_states=hidden).sample
    pipe.load_lora_weights(str(zero / "lora" / "lora"))
    assert pipe.unet.active_adapters()
    with torch.no_grad():
        after = pipe.unet(x, 500, encoder_hidden_states=hidden).sample
    assert float((after - before).abs().max()) > 1e-4


def test_zero_previews_and_methods(zero_runs: Path) -> None:
    """Previews are drawn by every process under ZeRO-3 (every forward gathers weights) and
    written once; Diffusion-DPO, D3PO and DDPO train under the shipped zero3.yaml."""
    samples = sorted(p.name for p in (zero_runs / "zero3" / "lora" / "samples").glob("*.png"))
    assert len(samples) == 4, samples
    rounds = [e for e in read_metrics(zero_runs / "zero3" / "lora" / "metrics.jsonl") if e["type"] == "round"]
    assert [e["num_processes"] for e in rounds] == [2, 2, 2]
    for method in ("diffusion_dpo", "d3po", "ddpo"):
        found = ranks(zero_runs / "zero3-yaml" / "methods" / method)
        assert all(r["engine"] == DEEPSPEED for r in found) and found[0]["steps"] == found[1]["steps"] > 0, method
        assert (zero_runs / "zero3-yaml" / "methods" / method / LORA).exists()
        assert max_diff(zero_runs / "zero3-yaml" / "methods" / method / LORA,
                        zero_runs / "zero2" / "methods" / method / LORA) < 1e-5, method


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_spm_and_lrm_training_under_zero(zero_runs: Path, stage: str) -> None:
    """``spo train-spm`` under ZeRO: the SPM and LPO's latent reward model train as under DDP
    (weights to rounding, identical validation accuracies on an uneven split), CLIP's scalar
    ``logit_scale`` is saved as the scalar, and an SPM run resumes exactly."""
    zero, ddp = zero_runs / stage, zero_runs / "ddp"
    for model in ("spm", "lrm"):
        assert all(r["engine"] == DEEPSPEED for r in ranks(zero / model))
        assert ranks(zero / model)[0]["validation"] == ranks(ddp / model)[0]["validation"]
    check_spm_and_lrm_against_ddp(zero, ddp)


def test_a_failed_write_under_zero3_stops_both_ranks(tiny_sd15_path: Path, tmp_path: Path) -> None:
    """The write guarantees hold under ZeRO-3: a full disk at a checkpoint (main process or the
    other) or at the final LoRA ends both ranks with the same error; earlier checkpoints stay."""
    check_failed_writes("zero3", tiny_sd15_path, tmp_path, DEEPSPEED)


def test_a_zero_launch_spo_cannot_honour_is_refused_on_every_rank(tiny_sd15_path: Path, tmp_path: Path) -> None:
    """DeepSpeed's own gradient accumulation would step the engine on SPO's micro-batches: a launch
    asking for it is refused before anything is written, one error line per rank, exit 2."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    run = tmp_path / "run"
    cli = [sys.executable, "-m", "accelerate.commands.launch", *OPTIONS["zero2"], "--gradient_accumulation_steps", "4",
           "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "spo.cli", "train", "sd15",
           "--output", str(run), f"model.pretrained={tiny_sd15_path}", "model.device=cpu", "model.dtype=float32",
           "model.resolution=32", "train.mixed_precision=no", f"data.prompts={prompts}", "logging.tensorboard=false"]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    proc = subprocess.run(cli, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("error: the DeepSpeed config's gradient_accumulation_steps is 4") == 2, proc.stderr[-2000:]
    assert proc.stderr.count("error:") == 2, proc.stderr[-2000:]
    assert "exitcode: 2" in proc.stderr and "src/spo" not in proc.stderr
    assert not run.exists()


def _plugin(**config: object) -> SimpleNamespace:
    ds = {"gradient_accumulation_steps": 1, "gradient_clipping": "auto", "train_micro_batch_size_per_gpu": "auto",
          "train_batch_size": "auto", "zero_optimization": {"stage": 2}, **config}
    stage = ds["zero_optimization"]["stage"]  # type: ignore[index]
    plugin = SimpleNamespace(deepspeed_config=ds, zero_stage=stage, zero3_init_flag=bool(config.get("init")))
    return SimpleNamespace(distributed_type="DistributedType.DEEPSPEED", num_processes=2,
                           state=SimpleNamespace(deepspeed_plugin=plugin), gradient_accumulation_steps=1)


def test_deepspeed_configuration_from_the_run() -> None:
    """The trainer fills what accelerate cannot (the micro-batch size: SPO prepares no DataLoader)
    and what SPO decides (clipping = optimizer.max_grad_norm, DeepSpeed's accumulation = 1), and
    refuses what it would have to override."""
    names = ("train.batch_size", "optimizer.max_grad_norm")
    acc = _plugin()
    assert engine_of(acc) == DEEPSPEED
    assert configure_deepspeed(acc, batch_size=3, max_grad_norm=0.5, names=names) is None
    ds = acc.state.deepspeed_plugin.deepspeed_config
    assert (ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"], ds["gradient_clipping"]) == (3, 6, 0.5)
    acc = _plugin()
    assert configure_deepspeed(acc, batch_size=3, max_grad_norm=None, names=names) is None
    assert acc.state.deepspeed_plugin.deepspeed_config["gradient_clipping"] == 0.0  # no clipping
    assert "optimizer.max_grad_norm is 0.5" in configure_deepspeed(_plugin(gradient_clipping=1.0), batch_size=3,
                                                                   max_grad_norm=0.5, names=names)
    assert configure_deepspeed(_plugin(gradient_clipping=1.0), batch_size=3, max_grad_norm=1.0, names=names) is None
    assert "accumulates itself" in configure_deepspeed(_plugin(gradient_accumulation_steps=4), batch_size=3,
                                                       max_grad_norm=1.0, names=names)
    assert "zero_stage 1" in configure_deepspeed(_plugin(zero_optimization={"stage": 1}), batch_size=3,
                                                 max_grad_norm=1.0, names=names)
    assert "zero3_init_flag" in configure_deepspeed(_plugin(zero_optimization={"stage": 3}, init=True), batch_size=3,
                                                    max_grad_norm=1.0, names=names)


def test_a_deepspeed_launch_without_deepspeed_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    assert "pip install -c constraints/cpu.txt deepspeed" in deepspeed_install_problem()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    assert deepspeed_install_problem() is None


def test_deepspeed_fp16_loss_scale_survives_a_checkpoint(tmp_path: Path) -> None:
    """Under DeepSpeed the fp16 loss scale lives in the ZeRO optimiser's dynamic scaler, not in
    accelerate's: its state is saved (scaler.pt, plain numbers) and restored, so a resumed run
    skips exactly the steps the uninterrupted one skips."""
    from spo.training.engines import load_loss_scale_state, loss_scale_state

    def zero(**scale: float) -> SimpleNamespace:
        scaler = SimpleNamespace(dynamic=True, **scale)
        return SimpleNamespace(optimizer=SimpleNamespace(loss_scaler=scaler, _link_all_hp_params=None))

    acc = _plugin()
    trained = zero(cur_scale=1024.0, cur_iter=17, last_overflow_iter=9, cur_hysteresis=1)
    state = loss_scale_state(acc, trained)
    torch.save(state, tmp_path / "scaler.pt")
    fresh = zero(cur_scale=65536.0, cur_iter=0, last_overflow_iter=-1, cur_hysteresis=2)
    load_loss_scale_state(acc, fresh, torch.load(tmp_path / "scaler.pt", weights_only=True))
    assert vars(fresh.optimizer.loss_scaler) == vars(trained.optimizer.loss_scaler)
    static = SimpleNamespace(optimizer=SimpleNamespace(loss_scaler=SimpleNamespace(dynamic=False, cur_scale=1.0),
                                                       _link_all_hp_params=None))
    assert loss_scale_state(acc, static) is None  # fp32 / bf16: nothing to keep
