"""benchmarks/toy_spo_controls.py: SPO per judge at two budgets, its summary and table, in miniature."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "benchmarks"


@pytest.fixture()
def controls(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    monkeypatch.syspath_prepend(str(BENCH))
    import toy_spo_controls

    return toy_spo_controls


def _run(steps: int, diffs: dict[str, tuple[float, float, float]]) -> dict:
    est = {m: {"mean": v[0], "low": v[1], "high": v[2], "n": 72} for m, v in diffs.items()}
    base = {m: {"mean": 0.5, "low": 0.4, "high": 0.6, "n": 72} for m in diffs}
    return {"rounds": 60, "optimizer_steps": steps, "valid_pair_rate": 0.5, "training_seconds": 300.0,
            "eval_seconds": 20.0, "threshold": "0.07", "base": base, "fine_tuned": base, "difference": est}


def test_summary_and_table_by_hand(controls) -> None:  # noqa: ANN001
    metrics = ("aesthetic", "alignment", "pickscore")
    runs = {"0": {"60": _run(300, dict.fromkeys(metrics, (0.1, 0.0, 0.2))),
                  "300": _run(1500, dict.fromkeys(metrics, (-0.2, -0.3, -0.1)))},
            "1": {"60": _run(200, dict.fromkeys(metrics, (0.3, 0.2, 0.4)))}}
    summary = controls.summarise(runs)
    assert summary["60"]["seeds"] == ["0", "1"] and summary["300"]["seeds"] == ["0"]
    assert summary["60"]["optimizer_steps_mean"] == 250
    assert summary["60"]["aesthetic"]["difference_mean"] == pytest.approx(0.2)
    assert summary["60"]["aesthetic"]["difference_sd"] == pytest.approx(math.sqrt(0.02))  # ddof 1
    assert math.isnan(summary["300"]["aesthetic"]["difference_sd"])
    table = controls.markdown_table({"judges": {"spm-v1": {"summary": summary}}}).splitlines()
    assert len(table) == 4 and table[1].count("---") == 9
    assert "| spm-v1 | 60 | 2 | 250 | 0.50 | 300 | **+0.200** (+0.100 / +0.300) |" in table[2]
    assert "| spm-v1 | 300 | 1 | 1500 |" in table[3] and "**-0.200** [-0.300, -0.100]" in table[3]


def test_controls_benchmark_reduced(tmp_path: Path) -> None:
    """The script end to end: a random judge, budgets of 1 and 2 rounds, a small evaluation; a
    second call reuses every finished training and evaluation; bad input is a clear error."""
    out, runs = tmp_path / "controls.json", tmp_path / "runs"
    cmd = [sys.executable, "toy_spo_controls.py", "--judges", "random", "--seeds", "0", "--budgets", "1", "2",
           "--output-dir", str(runs), "--output", str(out), "--no-progress", "--eval-prompts", "2",
           "--eval-seeds", "1", "train.prompts_per_round=1"]
    done = subprocess.run(cmd, cwd=BENCH, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())["judges"]["random"]
    assert [result["runs"]["0"][b]["rounds"] for b in ("1", "2")] == [1, 2]
    assert result["runs"]["0"]["1"]["threshold"] == "0.07"
    assert set(result["summary"]) == {"1", "2"} and result["summary"]["2"]["aesthetic"]["base"] > 0
    assert (runs / "random" / "seed0" / "lora-r1" / "pytorch_lora_weights.safetensors").exists()
    assert json.loads((runs / "random" / "seed0" / "eval-r1" / "eval.json").read_text())["protocol"]["num_prompts"] == 2
    metrics = (runs / "random" / "seed0" / "spo" / "metrics.jsonl").read_text()
    again = subprocess.run(cmd, cwd=BENCH, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (runs / "random" / "seed0" / "spo" / "metrics.jsonl").read_text() == metrics  # nothing retrained
    assert json.loads(out.read_text())["judges"]["random"]["runs"] == result["runs"]
    table = subprocess.run([sys.executable, "toy_spo_controls.py", "--table", "--output", str(out)], cwd=BENCH,
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and "| random | 2 | 1 |" in table.stdout
    for bad, message in ((["--judges", "nobody"], "unknown judge 'nobody'"), (["--budgets", "2", "1"], "must increase")):
        failed = subprocess.run([sys.executable, "toy_spo_controls.py", *bad, "--output-dir", str(tmp_path / "x")],
                                cwd=BENCH, capture_output=True, text=True, timeout=60)
        assert failed.returncode == 2 and message in failed.stderr
        assert not (tmp_path / "x").exists()


def test_lpo_thresholds_and_judge_setup(controls) -> None:  # noqa: ANN001
    """LPO's tie schedule carried to the controls' scale (the ratio that maps SPO's release 0.3 to
    0.07); what each judge runs with under --preset toy-lpo; image judges are refused there."""
    from spo.toy.judges import BlendContinuationJudge, control_threshold

    assert control_threshold(0.3) == 0.07
    assert (control_threshold(0.35), control_threshold(0.5)) == (0.083, 0.124)
    scorer, overrides, threshold = controls.judge_setup("ideal-blend-continuation", 0, "toy-lpo")
    assert isinstance(scorer, BlendContinuationJudge) and threshold == "sigma 0.083-0.124"
    assert {"pools.threshold_min=0.083", "pools.threshold_max=0.124"} <= set(overrides)
    assert controls.judge_setup("ideal-blend", 0, "toy")[1:] == (["pools.threshold=0.07"], "0.07")
    with pytest.raises(ValueError, match="scores images"):
        controls.judge_setup("spm-v1", 0, "toy-lpo")


def test_lpo_binds_the_continuation_judge_to_the_policy(controls, tmp_path: Path) -> None:
    """One tiny LPO round (3 steps) with the continuation control: the SPO method binds it to the
    trainer's backbone with the run's sampling settings before it samples."""
    from spo.config import load_config
    from spo.training import SPOTrainer

    scorer, overrides, _ = controls.judge_setup("ideal-blend-continuation", 0, "toy-lpo")
    config = load_config("toy-lpo", [*overrides, "train.rounds=1", "train.prompts_per_round=1",
                                     "sampling.num_inference_steps=3", "sampling.guidance_scale=2.0"])
    trainer = SPOTrainer(config, tmp_path / "run", scorer=scorer, progress=False)
    assert scorer.backbone is trainer.backbone
    assert (scorer.num_inference_steps, scorer.guidance_scale, scorer.eta) == (3, 2.0, 1.0)
    trainer.train()
    round0 = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert round0["pools"] == 3 and all(math.isfinite(v) for v in round0["score_mean_per_t"].values())
