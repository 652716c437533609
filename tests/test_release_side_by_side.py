"""benchmarks/release_side_by_side.py --tiny: the release's own training scripts (train_spo.py,
train_spo_sdxl.py, its config files) run here as written through their ``main``, next to
``spo train`` with the same recipe, and both sides do the same work per round (the GPU numbers
come from the same script on a GPU)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from release_oracle import require_release

BENCH = Path(__file__).parent.parent / "benchmarks"
STEPS, DIVERT = 8, 4  # the script's --tiny steps; the release's divert_start_step


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory: pytest.TempPathFactory) -> dict:
    require_release()
    out = tmp_path_factory.mktemp("side-by-side") / "side-by-side.json"
    done = subprocess.run([sys.executable, "release_side_by_side.py", "--tiny", "--rounds", "2", "--sides",
                           "release,ours,ours_speed", "--output", str(out)], cwd=BENCH, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_release_script_runs_as_written_with_our_recipe(side_by_side: dict, model: str) -> None:
    sides = side_by_side["models"][model]["sides"]
    for name in ("release", "ours", "ours_speed"):
        assert sides[name]["status"] == "ok", (name, sides[name].get("error"), sides[name].get("traceback"),
                                               sides[name].get("stderr"))
    release, ours = sides["release"], sides["ours"]
    # the release's main() ran to its end: it wrote its final LoRA
    assert release["final_lora_tensors"] > 0 and release["script"].endswith(".py")
    same = ("prompts", "k", "inner_steps", "steps", "train_batch_size", "gradient_accumulation_steps", "lora_rank",
            "mixed_precision", "allow_tf32")
    assert {k: release["recipe"][k] for k in same} == {k: ours["recipe"][k] for k in same}
    recipe = release["recipe"]
    assert recipe["mixed_precision"] == "no" and recipe["steps"] == STEPS
    # the same work a round: threshold 0, every pool makes a pair, and each pooled step is one
    # record per prompt (SD-1.5: one pool a step; SDXL MSPO: the j transitions of each segment)
    records = recipe["prompts"] * (STEPS - DIVERT)
    micro = math.ceil(records / recipe["train_batch_size"])
    for side in (release, ours):
        assert len(side["rounds"]) == 2
        for r in side["rounds"]:
            assert r["records"] == records and r["micro_batches"] == micro
            assert r["sampling_seconds"] > 0 and r["training_seconds"] > 0
    # optimiser steps: SD-1.5 one per micro-batch; SDXL accumulates 2 (accelerate's step is a
    # no-op between): the release's counted steps are the ones that stepped, as ours
    steps = [r["optimizer_steps"] for r in release["rounds"]]
    assert steps == [r["optimizer_steps"] for r in ours["rounds"]]
    assert sum(steps) == 2 * micro // recipe["gradient_accumulation_steps"]
    # ours against theirs: the median after the first round, as the ratios say
    ratio = ours["ratio_to_release"]["round"]
    assert ratio == pytest.approx(ours["steady"]["round_seconds"] / release["steady"]["round_seconds"], abs=1e-3)


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_speed_side_measures_pair_agreement_on_the_same_pools(side_by_side: dict, model: str) -> None:
    speed = side_by_side["models"][model]["sides"]["ours_speed"]
    assert any(o.startswith("preference.decoder=") for o in speed["overrides"])
    agreement = speed["pair_agreement"]
    prompts = speed["recipe"]["prompts"]
    pools = (STEPS - DIVERT) // speed["recipe"]["inner_steps"]
    assert agreement["pools"] == agreement["rollouts"] * prompts * pools
    for key in ("share_changed_threshold_0", "share_changed_preset_threshold"):
        assert 0.0 <= agreement[key] <= 1.0
    assert agreement["preset_threshold"] == {"sd15": 0.3, "sdxl": 0.4}[model]


def test_tables_render_the_comparison(side_by_side: dict, tmp_path: Path) -> None:
    result = tmp_path / "side-by-side.json"
    result.write_text(json.dumps(side_by_side))
    done = subprocess.run([sys.executable, "tables.py", str(result)], cwd=BENCH, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    for model in ("sd15", "sdxl"):
        ratio = side_by_side["models"][model]["sides"]["ours"]["ratio_to_release"]["round"]
        assert f"| {model} | release |" in done.stdout and f"| {model} | ours |" in done.stdout
        assert f"| {ratio:.2f} |" in done.stdout
