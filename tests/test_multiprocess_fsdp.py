"""FSDP2 through accelerate on two gloo CPU processes (configs/accelerate/fsdp.yaml), against the
same runs under DDP; the multi-node launch path on one host; what is refused."""

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

from spo.training import read_metrics
from spo.training.engines import DDP, FSDP, SINGLE, engine_of, engine_problem
from engine_launch import LORA, PROMPTS, ROOT, UNET, check_failed_writes, check_spm_and_lrm_against_ddp, max_diff, ranks
from engine_launch import free_port as _free_port

TRAIN_SCRIPT = Path(__file__).with_name("multiprocess_train.py")


@pytest.fixture(scope="module")
def fsdp_and_ddp_runs(engine_runs) -> Path:  # noqa: ANN001
    """The scenarios of multiprocess_fsdp.py under FSDP (``/ "fsdp"``) and DDP (``/ "ddp"``)."""
    engine_runs("fsdp")
    return engine_runs("ddp").parent


def test_fsdp_shards_the_policy_and_the_full_fine_tuning_reference(fsdp_and_ddp_runs: Path) -> None:
    """Under the FSDP launch the trainer runs FSDP2 (not the DDP accelerate falls back to on
    CPU): each process holds half of the UNet, and under full fine-tuning half of the frozen
    reference too; under DDP each holds all of both."""
    for scenario in ("lora", "full"):
        for r in ranks(fsdp_and_ddp_runs / "fsdp" / scenario):
            assert r["engine"] == FSDP and r["sharded_params"] == r["params"]
            assert 0.45 < r["local_fraction"] < 0.55, r
        for r in ranks(fsdp_and_ddp_runs / "ddp" / scenario):
            assert r["engine"] == DDP and r["sharded_params"] == 0 and r["local_fraction"] == 1.0
    for r in ranks(fsdp_and_ddp_runs / "fsdp" / "full"):
        assert 0.45 < r["reference_local_fraction"] < 0.55, r
    for r in ranks(fsdp_and_ddp_runs / "ddp" / "full"):
        assert r["reference_local_fraction"] == 1.0


def test_fsdp_trains_what_ddp_trains(fsdp_and_ddp_runs: Path) -> None:
    """The same runs (LoRA: 3 rounds, gradient accumulation carried across rounds; full
    fine-tuning: 2 rounds) end with the same weights under FSDP and DDP, to reduction-order
    rounding; the weights moved far more than that."""
    fsdp, ddp = fsdp_and_ddp_runs / "fsdp", fsdp_and_ddp_runs / "ddp"
    for scenario in ("lora", "full"):
        assert [r["steps"] for r in ranks(fsdp / scenario)] == [r["steps"] for r in ranks(ddp / scenario)]
        assert ranks(fsdp / scenario)[0]["steps"] > 0
    assert max_diff(fsdp / "lora" / LORA, ddp / "lora" / LORA) < 1e-5
    assert max_diff(fsdp / "full" / UNET, ddp / "full" / UNET) < 2e-4  # AdamW amplifies tiny gradient differences
    moved = load_file(str(fsdp / "lora" / LORA))
    assert max(float(v.abs().max()) for k, v in moved.items() if "lora_B" in k) > 1e-3  # B starts at 0


def test_fsdp_resumes_exactly(fsdp_and_ddp_runs: Path) -> None:
    """Stopped (inside an open gradient accumulation) and resumed from the checkpoint by a new
    trainer, an FSDP run ends bit for bit where the uninterrupted run ends, LoRA and full."""
    fsdp = fsdp_and_ddp_runs / "fsdp"
    for scenario, final in (("lora", LORA), ("full", UNET)):
        stopped = ranks(fsdp / f"{scenario}-resume")
        assert all(r["pending_at_stop"] > 0 for r in stopped)  # the checkpoint held accumulated gradients
        assert max_diff(fsdp / scenario / final, fsdp / f"{scenario}-resume" / final) == 0.0
        checkpoint = sorted((fsdp / f"{scenario}-resume" / "checkpoints").iterdir())[0]
        assert sorted(p.name for p in checkpoint.glob("grads-*.safetensors")) == ["grads-0.safetensors",
                                                                                  "grads-1.safetensors"]
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        assert state["optimizer_keys"] == "name"
        optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
        trainable = load_file(str(checkpoint / "trainable.safetensors"))
        assert set(optimizer["state"]) == set(trainable)  # whole, keyed by parameter name
        name = next(iter(trainable))
        assert optimizer["state"][name]["exp_avg"].shape == trainable[name].shape


def test_fsdp_final_weights_load_in_plain_diffusers(fsdp_and_ddp_runs: Path, tiny_sd15_path: Path) -> None:
    """The LoRA and the full UNet written under FSDP are whole, in diffusers' own formats."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    fsdp = fsdp_and_ddp_runs / "fsdp"
    unet = UNet2DConditionModel.from_pretrained(str(fsdp / "full" / "unet"))
    saved = load_file(str(fsdp / "full" / UNET))
    assert set(saved) == set(unet.state_dict())
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in saved.items())
    assert (fsdp / "full" / "unet" / "README.md").exists()
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd15_path), safety_checker=None)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, pipe.unet.config.in_channels, 4, 4, generator=gen)
    hidden = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        before = pipe.unet(x, 500, encoder_hidden_states=hidden).sample
    pipe.load_lora_weights(str(fsdp / "lora" / "lora"))
    assert pipe.unet.active_adapters()  # every key was taken as a LoRA of the UNet
    with torch.no_grad():
        after = pipe.unet(x, 500, encoder_hidden_states=hidden).sample
    assert float((after - before).abs().max()) > 1e-4


def test_fsdp_previews_methods_and_metrics(fsdp_and_ddp_runs: Path) -> None:
    """Previews are drawn by every process under FSDP (every forward is a collective) and written
    once; Diffusion-DPO, D3PO and DDPO train under FSDP too."""
    fsdp = fsdp_and_ddp_runs / "fsdp"
    samples = sorted(p.name for p in (fsdp / "lora" / "samples").glob("*.png"))
    assert len(samples) == 4, samples  # the reference's and one per round
    rounds = [e for e in read_metrics(fsdp / "lora" / "metrics.jsonl") if e["type"] == "round"]
    assert [e["num_processes"] for e in rounds] == [2, 2, 2] and all("preview_seconds" in e for e in rounds)
    for method in ("diffusion_dpo", "d3po", "ddpo"):
        found = ranks(fsdp / "methods" / method)
        assert all(r["engine"] == FSDP for r in found) and found[0]["steps"] == found[1]["steps"] > 0, method
        assert (fsdp / "methods" / method / LORA).exists()


def test_spm_and_lrm_training_under_fsdp(fsdp_and_ddp_runs: Path) -> None:
    """``spo train-spm`` under FSDP: the SPM (from CLIP) and LPO's latent reward model are
    sharded, validated on an uneven split of the validation pairs (every process runs as many
    forwards as the busiest), saved whole in the same files as under DDP with the same
    weights to rounding, and an SPM run resumes exactly."""
    fsdp, ddp = fsdp_and_ddp_runs / "fsdp", fsdp_and_ddp_runs / "ddp"
    for model in ("spm", "lrm"):
        sharded_ranks, plain = ranks(fsdp / model), ranks(ddp / model)
        assert all(r["engine"] == FSDP and 0.45 < r["local_fraction"] < 0.55 for r in sharded_ranks), sharded_ranks
        assert all(r["engine"] == DDP and r["local_fraction"] == 1.0 for r in plain)
        assert sharded_ranks[0]["validation"] == plain[0]["validation"]
    check_spm_and_lrm_against_ddp(fsdp, ddp)


def test_a_failed_write_under_fsdp_stops_both_ranks(tiny_sd15_path: Path, tmp_path: Path) -> None:
    """The write guarantees hold under FSDP: a full disk at a checkpoint (main process or the
    other) or at the final LoRA ends both ranks with the same error; earlier checkpoints stay."""
    check_failed_writes("fsdp", tiny_sd15_path, tmp_path, FSDP)


def test_fsdp_version_1_is_refused_on_every_rank(tiny_sd15_path: Path, tmp_path: Path) -> None:
    """accelerate cannot start FSDP1 on CPU, and its LoRA-only clipping would norm local shards:
    the launch is refused with one error line (exit 2), nothing written."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    run = tmp_path / "run"
    cli = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--fsdp_version", "1", "--num_processes", "2",
           "--main_process_port", str(_free_port()), "-m", "spo.cli", "train", "sd15", "--output", str(run),
           f"model.pretrained={tiny_sd15_path}", "model.device=cpu", "model.dtype=float32", "model.resolution=32",
           "train.mixed_precision=no", f"data.prompts={prompts}", "logging.tensorboard=false"]
    proc = subprocess.run(cli, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    # one error line per rank (two ranks writing at once may share a line of stderr)
    assert proc.stderr.count("error: FSDP version 1 is not supported") == 2, proc.stderr[-2000:]
    assert proc.stderr.count("error:") == 2, proc.stderr[-2000:]
    assert "exitcode: 2" in proc.stderr and "src/spo" not in proc.stderr  # our processes: no traceback
    assert not run.exists()


def test_multi_node_launch_path_on_one_host(tiny_sd15_path: Path, tmp_path: Path) -> None:
    """Two `accelerate launch` calls, one per "machine" (``--num_machines 2 --machine_rank 0|1
    --main_process_ip``), as configs/accelerate/multi-node.yaml runs SPO on two nodes: they
    meet as ranks 0 and 1 of one run and end with the same LoRA."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    run = tmp_path / "run"
    port = str(_free_port())
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(ROOT / "configs" / "accelerate" / "multi-node.yaml"), "--num_processes", "2", "--num_machines", "2",
         "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
         str(TRAIN_SCRIPT), str(tiny_sd15_path), str(prompts), str(run)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=TRAIN_SCRIPT.parent)
        for rank in (0, 1)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    found = [json.loads((run / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in found] == [0, 1] and all(r["num_processes"] == 2 for r in found)
    assert found[0]["weights_hash"] == pytest.approx(found[1]["weights_hash"], rel=1e-12, abs=1e-12)
    assert (run / LORA).exists()


def _fake(kind: str, processes: int = 2, fsdp2: bool = True) -> SimpleNamespace:
    return SimpleNamespace(distributed_type=kind, num_processes=processes, is_fsdp2=fsdp2,
                           device=torch.device("cpu"))


def test_engine_names_and_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate.utils import DistributedType

    assert engine_of(_fake(DistributedType.NO, 1)) == SINGLE
    assert engine_of(_fake(DistributedType.MULTI_CPU)) == DDP
    assert engine_of(_fake(DistributedType.FSDP)) == FSDP
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert engine_problem(_fake(DistributedType.MULTI_CPU), compile=True) is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert engine_problem(_fake(DistributedType.FSDP), compile=False) is None
    assert "model.compile" in engine_problem(_fake(DistributedType.FSDP), compile=True)
    assert "version 1" in engine_problem(_fake(DistributedType.FSDP, fsdp2=False), compile=False)
    assert "version 1" in engine_problem(_fake(DistributedType.MULTI_CPU), compile=False)  # not adopted: FSDP1
    assert "at least 2 processes" in engine_problem(_fake(DistributedType.NO, 1), compile=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert "DeepSpeed" in engine_problem(_fake(DistributedType.MULTI_CPU), compile=False)
