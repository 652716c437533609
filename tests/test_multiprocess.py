"""Two-process CPU training (gloo) through `accelerate launch`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from spo.training import read_metrics

SCRIPT = Path(__file__).with_name("multiprocess_train.py")
METHODS_SCRIPT = Path(__file__).with_name("multiprocess_methods.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(script: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    # `--cpu --num_processes 2` silently runs ONE process; this form gives two gloo ranks
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(script), *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_process_baselines(tiny_sd15_path: Path, pickapic_path: Path, tmp_path: Path) -> None:
    """Diffusion-DPO, D3PO and DDPO each on two gloo ranks: both ranks exist, see the same
    gathered records (DDPO's advantages are computed on them) and end with the same LoRA."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\ntwo green stars\na yellow cat\n")
    proc = _launch(METHODS_SCRIPT, str(tiny_sd15_path), str(prompts), str(pickapic_path), str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for method in ("diffusion_dpo", "d3po", "ddpo"):
        ranks = [json.loads((tmp_path / method / f"rank-{r}.json").read_text()) for r in range(2)]
        assert [r["rank"] for r in ranks] == [0, 1] and all(r["num_processes"] == 2 for r in ranks)
        assert ranks[0]["steps"] == ranks[1]["steps"] > 0, method
        assert ranks[0]["weights_hash"] == pytest.approx(ranks[1]["weights_hash"], rel=1e-12, abs=1e-12), method
        assert ranks[0]["prepared"] == ranks[1]["prepared"], method
        rounds = [e for e in read_metrics(tmp_path / method / "metrics.jsonl") if e["type"] == "round"]
        assert [e["num_processes"] for e in rounds] == [2, 2] and all(len(e["records_per_process"]) == 2 for e in rounds)
        assert (tmp_path / method / "lora" / "pytorch_lora_weights.safetensors").exists()


def test_two_process_lpo(tiny_sd15_path: Path, pickapic_path: Path, tmp_path: Path) -> None:
    """LPO (the sd15-lpo preset's pools, a fixed latent judge) on two gloo ranks: both ranks
    exist, each scored its own pools' latents, and they end with the same LoRA."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\ntwo green stars\na yellow cat\n")
    proc = _launch(METHODS_SCRIPT, str(tiny_sd15_path), str(prompts), str(pickapic_path), str(tmp_path), "lpo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "lpo" / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["num_processes"] == 2 for r in ranks)
    assert ranks[0]["steps"] == ranks[1]["steps"] > 0
    assert ranks[0]["weights_hash"] == pytest.approx(ranks[1]["weights_hash"], rel=1e-12, abs=1e-12)
    assert ranks[0]["prepared"] == ranks[1]["prepared"]
    rounds = [e for e in read_metrics(tmp_path / "lpo" / "metrics.jsonl") if e["type"] == "round"]
    assert [e["num_processes"] for e in rounds] == [2, 2] and all(len(e["records_per_process"]) == 2 for e in rounds)
    assert all(n > 0 for e in rounds for n in e["records_per_process"])  # every rank found pairs of its own
    assert all(e["pools"] == 2 * 3 * 4 for e in rounds)  # 3 prompts per rank, pools at all 4 steps
    steps = [e for e in read_metrics(tmp_path / "lpo" / "metrics.jsonl") if e["type"] == "step"]
    assert steps[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)
    assert (tmp_path / "lpo" / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert not (tmp_path / "ddpo").exists()  # the methods of the 5th argument only


def test_two_process_training(tiny_sd15_path: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\ntwo green stars\na yellow cat\n")
    run = tmp_path / "run"
    # `--cpu --num_processes 2` silently runs ONE process; this form gives two gloo ranks
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(SCRIPT), str(tiny_sd15_path), str(prompts), str(run)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((run / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["num_processes"] == 2 for r in ranks)
    # the same LoRA weights on both ranks (DDP averaged the gradients)
    assert ranks[0]["weights_hash"] == pytest.approx(ranks[1]["weights_hash"], rel=1e-12, abs=1e-12)
    assert ranks[0]["steps"] == ranks[1]["steps"] > 0 and ranks[0]["skipped"] == ranks[1]["skipped"] == 1
    # even split: both ranks trained on the same number of records each round
    assert ranks[0]["local_records"] == ranks[1]["local_records"]
    rounds = [e for e in read_metrics(run / "metrics.jsonl") if e["type"] == "round"]
    assert [e["num_processes"] for e in rounds] == [2, 2, 2, 2]
    assert rounds[0]["records_per_process"][1] == 0 and rounds[0]["records_per_process"][0] > 0
    assert not rounds[0]["skipped"] and rounds[1]["skipped"] and rounds[1]["valid_records"] == 0
    # the round's statistics are both ranks' (rank 1 scored every candidate 0 in round 0), weighted by pools
    local = [r["local_logs"][0] for r in ranks]
    assert local[0]["score_mean"] != local[1]["score_mean"] == 0.0
    weights = [entry["units"] for entry in local]
    expected = sum(w * entry["score_mean"] for w, entry in zip(weights, local)) / sum(weights)
    assert rounds[0]["score_mean"] == pytest.approx(expected, rel=1e-9)
    t = next(iter(local[0]["score_mean_per_t"]))
    expected_t = sum(w * entry["score_mean_per_t"][t] for w, entry in zip(weights, local)) / sum(weights)
    assert rounds[0]["score_mean_per_t"][t] == pytest.approx(expected_t, rel=1e-9)
    assert "num_processes: 2" in (run / "config.yaml").read_text()
    assert (run / "lora" / "pytorch_lora_weights.safetensors").exists()


FAULTS_SCRIPT = Path(__file__).with_name("multiprocess_faults.py")


def test_a_write_failing_on_one_process_stops_both_with_the_same_error(tiny_sd15_path: Path, tmp_path: Path) -> None:
    """A full disk at a checkpoint (main process or the other one) or at the final LoRA: both
    ranks end (the launch has a timeout) with the same error naming the write and the cause,
    and the checkpoints written before are intact."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\ntwo green stars\na yellow cat\n")
    proc = _launch(FAULTS_SCRIPT, str(tiny_sd15_path), str(prompts), str(tmp_path), timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = {
        "checkpoint": ("writing checkpoint", "round-000002", "failed on the main process", ["round-000001"]),
        "rng": ("writing checkpoint", "round-000001", "failed on process 1", []),
        "final_lora": ("writing the final LoRA", "final_lora", "failed on the main process", ["round-000001"]),
    }
    for name, (what, where, who, checkpoints) in expected.items():
        ranks = [json.loads((tmp_path / name / f"rank-{r}.json").read_text()) for r in range(2)]
        assert [r["rank"] for r in ranks] == [0, 1] and all(r["num_processes"] == 2 for r in ranks), name
        assert ranks[0]["error"] == ranks[1]["error"] is not None, (name, ranks)
        message = ranks[0]["error"]
        assert message.startswith(what) and where in message and who in message, message
        assert "OSError: [Errno 28] No space left on device" in message, message
        assert ranks[0]["checkpoints"] == checkpoints and ranks[0]["hidden"] == [], (name, ranks[0])
    assert not (tmp_path / "final_lora" / "lora").exists()


def test_two_process_training_on_a_flow_model(tiny_sd3_path: Path, tmp_path: Path) -> None:
    """SPO on the tiny SD3 pipeline (flow SDE) on two gloo ranks: both ranks, the same LoRA."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\ntwo green stars\na yellow cat\n")
    run = tmp_path / "run"
    proc = _launch(SCRIPT, str(tiny_sd3_path), str(prompts), str(run), "sd3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((run / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["num_processes"] == 2 for r in ranks)
    assert ranks[0]["steps"] == ranks[1]["steps"] > 0
    assert ranks[0]["weights_hash"] == pytest.approx(ranks[1]["weights_hash"], rel=1e-12, abs=1e-12)
    rounds = [e for e in read_metrics(run / "metrics.jsonl") if e["type"] == "round"]
    assert [e["num_processes"] for e in rounds] == [2, 2, 2, 2]
    assert (run / "lora" / "pytorch_lora_weights.safetensors").exists()
