"""SPO on the toy world over several training seeds: base vs fine-tuned, as `spo demo` measures it.

For each training seed s, runs ``spo demo --seed s --output OUT/seed{s}`` (a finished run is
resumed, i.e. only re-evaluated) and collects its eval.json: 24 validation prompts x 3 sampling
seeds, toy PickScore / aesthetic / alignment, base and fine-tuned with the same noise. Reports per
training seed the paired difference (mean and 95% interval over the 72 images), and across seeds
the mean and standard deviation of those per-seed differences, and the wall time of each run.

    python benchmarks/toy_spo_seeds.py --seeds 0 1 2 --output-dir runs/toy-spo-seeds \\
        --output benchmarks/results/toy-spo-seeds.json [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from spo.toy.eval_run import base_vs_fine_tuned

from _report import write_report  # benchmarks/_report.py (scripts run from this folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/toy-spo-seeds"))
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides passed to spo demo")
    args = parser.parse_args()
    runs = {}
    for seed in args.seeds:
        out = args.output_dir / f"seed{seed}"
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "spo.cli", "demo", "--seed", str(seed), "--output", str(out), *args.overrides]
        subprocess.run(cmd, check=True)
        result = base_vs_fine_tuned(json.loads((out / "eval" / "eval.json").read_text()))
        rounds = [json.loads(line) for line in (out / "spo" / "metrics.jsonl").read_text().splitlines()
                  if '"type": "round"' in line]
        runs[seed] = {
            "seconds_this_invocation": round(time.perf_counter() - start, 1),  # a finished run is only resumed
            "training_seconds_in_metrics": round(sum(r["sampling_seconds"] + r["training_seconds"] for r in rounds), 1),
            "valid_pair_rate": round(float(np.mean([r["valid_pair_rate"] for r in rounds])), 3),
            "rounds": len(rounds),
            "base": result["base"], "fine_tuned": result["fine_tuned"], "difference": result["difference"],
        }
    metrics = list(next(iter(runs.values()))["difference"])
    summary = {}
    for m in metrics:
        diffs = [r["difference"][m]["mean"] for r in runs.values()]
        summary[m] = {
            "base_mean": runs[args.seeds[0]]["base"][m]["mean"],
            "fine_tuned_mean_over_seeds": float(np.mean([r["fine_tuned"][m]["mean"] for r in runs.values()])),
            "difference_mean_over_seeds": float(np.mean(diffs)),
            "difference_std_over_seeds": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else float("nan"),
            "per_seed_difference": {str(s): runs[s]["difference"][m] for s in args.seeds},
        }
    report = {"seeds": args.seeds, "overrides": args.overrides, "runs": runs, "summary": summary}
    write_report(report, args.output, shown=summary)


if __name__ == "__main__":
    main()
