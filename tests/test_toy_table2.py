"""benchmarks/toy_table2.py: the methods at an equal CPU budget, its summary, tables and curve."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "benchmarks"
METRICS = ("aesthetic", "alignment", "pickscore")


@pytest.fixture()
def table2(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    monkeypatch.syspath_prepend(str(BENCH))
    import toy_table2

    return toy_table2


def _record(method: str, seed: int, diffs: list[float]) -> dict:
    points = []
    for i, d in enumerate(diffs):
        est = {m: {"mean": d, "low": d - 0.1, "high": d + 0.1, "n": 72} for m in METRICS}
        base = {m: {"mean": 0.5, "low": 0.4, "high": 0.6, "n": 72} for m in METRICS}
        points.append({"fraction": (i + 1) / len(diffs), "cpu_seconds": 60.0 * (i + 1), "wall_seconds": 70.0 * (i + 1),
                       "rounds": 10 * (i + 1) + seed, "optimizer_steps": 20 * (i + 1), "base": base, "fine_tuned": base,
                       "difference": est})
    return {"method": method, "seed": seed, "valid_rate": 0.5, "points": points}


def test_summary_tables_and_curve_by_hand(table2) -> None:  # noqa: ANN001
    records = [_record("spo", 0, [0.1, 0.2]), _record("spo", 1, [0.3, 0.4]), _record("ddpo", 0, [-0.1, -0.2])]
    summary = table2.summarise(records)
    assert list(summary) == ["spo", "ddpo"]  # in PRESETS' order
    end = summary["spo"]["marks"][-1]
    assert end["seeds"] == [0, 1] and end["rounds"] == 20.5 and end["cpu_seconds"] == 120.0
    assert end["aesthetic"]["difference_mean"] == pytest.approx(0.3)
    assert end["aesthetic"]["difference_sd"] == pytest.approx(math.sqrt(0.02))
    assert math.isnan(summary["ddpo"]["marks"][0]["aesthetic"]["difference_sd"])
    table = table2.markdown_table(summary).splitlines()
    assert len(table) == 5 and table[2].startswith("| base |") and "0.500 (absolute)" in table[2]
    assert "| spo | 2 | 20 | 40 | 120 | 140 | **+0.300** (+0.200 / +0.400) |" in table[3]
    curve = table2.curve_table(summary).splitlines()
    assert "+0.200 ± 0.141 at 1.0 CPU-min" in curve[2] and "+0.300 ± 0.141 at 2.0 CPU-min" in curve[2]
    svg = table2.curve_svg(summary)
    assert svg.startswith("<svg") and svg.count("<polyline") == 2 and ">ddpo<" in svg


def test_table2_benchmark_reduced(tmp_path: Path) -> None:
    """The script end to end: two methods, a budget of a hundredth of a CPU-second (the first
    round spends it; both marks keep that LoRA), a small evaluation; a second call reuses the finished jobs; bad input is
    a clear error."""
    out, runs = tmp_path / "table2.json", tmp_path / "runs"
    cmd = [sys.executable, "toy_table2.py", "--methods", "diffusion_dpo", "d3po", "--seeds", "0", "--budget", "0.01",
           "--marks", "0.5", "1", "--eval-prompts", "2", "--eval-seeds", "1", "--output-dir", str(runs),
           "--output", str(out), "train.prompts_per_round=2"]
    done = subprocess.run(cmd, cwd=BENCH, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {(r["method"], r["seed"]) for r in report["runs"]} == {("diffusion_dpo", 0), ("d3po", 0)}
    for r in report["runs"]:
        assert [p["rounds"] for p in r["points"]] == [1, 1] and r["threads"] == 1  # the first round spends the budget
        assert r["points"][-1]["cpu_seconds"] > 0 and set(r["points"][-1]["difference"]) == set(METRICS)
    assert set(report["summary"]) == {"diffusion_dpo", "d3po"} and out.with_suffix(".svg").exists()
    first = (runs / "d3po" / "seed0" / "result.json").stat().st_mtime
    again = subprocess.run(cmd, cwd=BENCH, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and (runs / "d3po" / "seed0" / "result.json").stat().st_mtime == first
    shown = subprocess.run([sys.executable, "toy_table2.py", "--table", "--output", str(out)], cwd=BENCH,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "| d3po | 1 | 1 |" in shown.stdout
    bad = subprocess.run([sys.executable, "toy_table2.py", "--methods", "spo", "--marks", "1", "0.5"], cwd=BENCH,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--marks" in bad.stderr
