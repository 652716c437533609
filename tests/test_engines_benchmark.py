"""benchmarks/engines.py --tiny: each engine's launch (DDP, FSDP2, ZeRO-2, ZeRO-3) runs SPO rounds
through the trainer on 2 CPU processes, and the JSON holds each process's engine and per-round
seconds, and the ratios to DDP (the GPU's peak memory comes from the same script on a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (it comes with the dev extra)")

BENCH = Path(__file__).parent.parent / "benchmarks"


def test_engines_tiny(tmp_path: Path) -> None:
    out = tmp_path / "engines.json"
    done = subprocess.run([sys.executable, "engines.py", "--tiny", "--models", "sd15", "--finetune", "lora",
                           "--output", str(out)], cwd=BENCH, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["processes_per_launch"] == 2
    expected = {"ddp": ("ddp", None), "fsdp": ("fsdp", None), "zero2": ("deepspeed", 2), "zero3": ("deepspeed", 3)}
    assert set(result["runs"]) == {f"sd15/lora/{e}" for e in expected}
    for engine, (name, stage) in expected.items():
        entry = result["runs"][f"sd15/lora/{engine}"]
        assert entry["status"] == "ok", (engine, entry.get("error"), entry.get("stderr_tail"))
        assert [r["rank"] for r in entry["ranks"]] == [0, 1]
        assert all(r["engine"] == name and r["zero_stage"] == stage and r["num_processes"] == 2 for r in entry["ranks"])
        assert all(len(r["rounds"]) == 2 and r["rounds"][1]["optimizer_steps"] > 0 for r in entry["ranks"])
        assert entry["round_seconds"] > 0 and entry["time_vs_ddp"] > 0
        assert entry["peak_gib"] is None  # no CUDA: nothing to measure
    assert result["runs"]["sd15/lora/ddp"]["time_vs_ddp"] == 1.0
