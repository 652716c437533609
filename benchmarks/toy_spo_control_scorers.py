"""Control for SPO on the toy world: the same recipe with a scorer that knows nothing.

Trains with the toy preset (plus any key=value overrides) but scores every candidate with
seeded uniform noise instead of the toy SPM, so win/lose pairs are random; then evaluates
exactly as ``spo demo`` does. Whatever this run changes in the evaluation metrics is the effect
of moving the LoRA with uninformative pairs; SPO's effect beyond it is the SPM's.

    python benchmarks/toy_spo_control_scorers.py --scorer random --seed 0 --output-dir runs/toy-spo-random \\
        --output benchmarks/results/toy-spo-random-scorer.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from spo.toy.demo import run_demo
from spo.toy.eval_run import format_table

from _report import write_report  # benchmarks/_report.py (scripts run from this folder)


class RandomScorer:
    """Uniform scores from a seeded generator: every pool's best and worst are random."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: torch.Tensor, prompts, timesteps) -> torch.Tensor:  # noqa: ANN001
        return torch.rand(images.shape[0], generator=self.generator) * 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scorer", choices=["random"], default="random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/toy-spo-random"))
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = run_demo(args.output_dir, [f"seed={args.seed}", *args.overrides], scorer=RandomScorer(args.seed))
    result = out["eval"]
    print(format_table(result))
    lines = [json.loads(line) for line in (out["run_dir"] / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rounds = [r for r in lines if r.get("type") == "round"]
    report = {
        "scorer": args.scorer, "seed": args.seed, "overrides": args.overrides,
        "valid_pair_rate": round(sum(r["valid_pair_rate"] for r in rounds) / len(rounds), 3),
        "optimizer_steps": sum(1 for r in lines if r.get("type") == "step"),
        "seconds_this_invocation": round(out["train_seconds"] + out["eval_seconds"], 1),  # a finished run is only resumed
        **{k: result[k] for k in ("base", "fine_tuned", "difference")},
    }
    write_report(report, args.output, shown=report["difference"])


if __name__ == "__main__":
    main()
