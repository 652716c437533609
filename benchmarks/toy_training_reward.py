"""The training signal of SPO runs: the preference model's score of the training rollouts' final
images (``final_score`` of each round in metrics.jsonl), averaged over the first and the last
``--window`` rounds. Runs with the same seed sample the same prompts with the same noise in each
round, so their first rounds agree and their last rounds compare like for like. This is what the
toy preset's learning rate was chosen on (training prompts only, no evaluation number).

    python benchmarks/toy_training_reward.py runs/sweep/lr1e-4 runs/sweep/lr3e-4 runs/demo/spo
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def training_reward(run_dir: str | Path, window: int = 10) -> dict[str, float]:
    rounds = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
              if '"type": "round"' in line]
    scores = [float(np.mean(r["final_score"])) for r in rounds]
    return {"rounds": len(scores), "first": round(float(np.mean(scores[:window])), 3),
            "last": round(float(np.mean(scores[-window:])), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--window", type=int, default=10)
    args = parser.parse_args()
    for run in args.runs:
        print(run, json.dumps(training_reward(run, args.window)))


if __name__ == "__main__":
    main()
