"""Time SPO rounds on the toy world with the UNet in the default and the channels-last memory format.

Runs the ``toy`` preset (plus key=value overrides) for ``--rounds`` rounds twice per repetition,
once with ``model.channels_last=false`` and once with ``true``, alternating (the machine's noise
then hits both alike), and reports the median sampling and training seconds per round and their
ratio. Same seed, so both formats sample the same prompts and differ only by float rounding.

    python benchmarks/toy_round.py --rounds 6 --repeats 2 --output benchmarks/results/toy-round.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from spo.config import load_config
from spo.training import SPOTrainer

from _report import write_report  # benchmarks/_report.py (scripts run from this folder)


def time_rounds(channels_last: bool, rounds: int, overrides: list[str]) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config("toy", [*overrides, f"model.channels_last={str(channels_last).lower()}",
                                     f"train.rounds={rounds}", "logging.tensorboard=false"])
        SPOTrainer(config, Path(tmp) / "run", progress=False).train()
        lines = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    return [{"sampling": r["sampling_seconds"], "training": r["training_seconds"]} for r in lines if r.get("type") == "round"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    found: dict[str, list[dict[str, float]]] = {"default": [], "channels_last": []}
    for _ in range(args.repeats):
        for name in found:
            found[name] += time_rounds(name == "channels_last", args.rounds, args.overrides)
    medians = {name: {part: statistics.median(r[part] for r in rounds) for part in ("sampling", "training")}
               for name, rounds in found.items()}
    result = {
        "device": f"CPU ({platform.machine()}), {torch.get_num_threads()} threads",
        "rounds_each": args.rounds * args.repeats, "overrides": args.overrides,
        "median_seconds_per_round": medians,
        "channels_last_over_default": {part: round(medians["channels_last"][part] / medians["default"][part], 3)
                                       for part in ("sampling", "training")},
        "round_ratio": round(sum(medians["channels_last"].values()) / sum(medians["default"].values()), 3),
    }
    write_report(result, args.output)


if __name__ == "__main__":
    main()
