"""Table 2 in miniature: base vs SPO, Diffusion-DPO, D3PO and DDPO on the toy world, at an equal
CPU budget, over training seeds; plus each method's gain at fractions of the budget (a curve of
gain per CPU-minute, the paper's convergence claim).

Each method runs its toy preset (``toy`` = SPO, ``toy-diffusion-dpo``, ``toy-d3po``,
``toy-ddpo``: the published recipes scaled to the toy world by one rule set, fixed before any
run; see the presets' comments) from the shipped base model, round after round, until its
training has used ``--budget`` CPU-seconds (``time.process_time`` of the run, model loading and
evaluation excluded; with ``--threads 1`` a CPU-second is a second of one core, so two runs side
by side on the 2-core machine do not inflate each other's budget). At each mark (``--marks``,
fractions of the budget) the LoRA is kept and evaluated as `spo demo` evaluates: the 24
validation prompts x 3 sampling seeds, base and fine-tuned with the same noise, the v1 toy
PickScore and the two oracles, paired differences with 95% intervals.

Every (method, seed) is one job writing its ``result.json``; finished jobs are reused, an
unfinished one restarts. Runs can be split across workers (``--methods``/``--seeds``) and the
table collected at the end (results merge into ``--output``):

    cd benchmarks
    python toy_table2.py --methods spo ddpo --seeds 0 1 2 --output-dir ../runs/table2 \\
        --output results/toy-table2.json
    python toy_table2.py --table --output results/toy-table2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spo.config import load_config
from spo.data import load_prompts
from spo.toy.eval_run import evaluate_run
from spo.training import SPOTrainer

PRESETS = {"spo": "toy", "diffusion_dpo": "toy-diffusion-dpo", "d3po": "toy-d3po", "ddpo": "toy-ddpo", "lpo": "toy-lpo"}
METRICS = ("aesthetic", "alignment", "pickscore")


def run_one(method: str, seed: int, budget: float, marks: list[float], out: Path, eval_prompts: int,
            eval_seeds: int, overrides: list[str]) -> dict[str, Any]:
    job = out / method / f"seed{seed}"
    done = job / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(job, ignore_errors=True)
    config = load_config(PRESETS[method], [f"seed={seed}", "train.rounds=1000000", "logging.tensorboard=false",
                                           "logging.checkpoint_every=1000000", *overrides])
    trainer = SPOTrainer(config, job / "run", progress=False)
    cpu = wall = 0.0
    points = []
    for fraction in marks:
        while cpu < fraction * budget:
            c0, w0 = time.process_time(), time.perf_counter()
            trainer.run_round(trainer.rounds_done)
            trainer.rounds_done += 1
            cpu += time.process_time() - c0
            wall += time.perf_counter() - w0
        kept = trainer.backbone.save_lora(job / f"lora-{fraction:g}")
        points.append({"fraction": fraction, "cpu_seconds": round(cpu, 1), "wall_seconds": round(wall, 1),
                       "rounds": trainer.rounds_done, "optimizer_steps": trainer.step, "lora": str(kept.parent)})
    prompts = load_prompts("toy:validation-prompts")
    prompts = prompts[:eval_prompts] if eval_prompts else prompts
    for point in points:
        result = evaluate_run("toy:base", prompts, job / f"eval-{point['fraction']:g}", seeds=eval_seeds,
                              guidance_scale=3.0, num_inference_steps=20, lora=point["lora"],
                              base_cache=out / f"base-eval-{len(prompts)}x{eval_seeds}")
        point.update(base=result["base"], fine_tuned=result["fine_tuned"], difference=result["difference"])
    rounds = [json.loads(line) for line in (job / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rounds = [r for r in rounds if r.get("type") == "round"]
    record = {"method": method, "preset": PRESETS[method], "seed": seed, "budget_cpu_seconds": budget,
              "threads": torch.get_num_threads(), "valid_rate": float(np.mean([r["valid_pair_rate"] for r in rounds])),
              "points": points}
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(done)
    return record


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method and mark: means over seeds of CPU time, rounds, steps and each metric's paired
    difference, with every seed's difference [95% interval]."""
    summary: dict[str, Any] = {}
    for method in PRESETS:
        runs = sorted((r for r in records if r["method"] == method), key=lambda r: r["seed"])
        if not runs:
            continue
        marks = []
        for i, point in enumerate(runs[0]["points"]):
            at = [r["points"][i] for r in runs]
            entry: dict[str, Any] = {
                "fraction": point["fraction"], "seeds": [r["seed"] for r in runs],
                "cpu_seconds": float(np.mean([p["cpu_seconds"] for p in at])),
                "wall_seconds": float(np.mean([p["wall_seconds"] for p in at])),
                "rounds": float(np.mean([p["rounds"] for p in at])),
                "optimizer_steps": float(np.mean([p["optimizer_steps"] for p in at])),
            }
            for m in METRICS:
                diffs = [p["difference"][m]["mean"] for p in at]
                entry[m] = {
                    "base": at[0]["base"][m]["mean"],
                    "difference_mean": float(np.mean(diffs)),
                    "difference_sd": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else float("nan"),
                    "per_seed": [[round(p["difference"][m][k], 4) for k in ("mean", "low", "high")] for p in at],
                }
            marks.append(entry)
        summary[method] = {"valid_rate": float(np.mean([r["valid_rate"] for r in runs])), "marks": marks}
    return summary


def markdown_table(summary: dict[str, Any]) -> str:
    """The budget's end: one row per method (base first): rounds, optimiser steps, CPU and wall
    seconds, and per metric the mean over seeds of the paired difference (each seed's value)."""
    lines = ["| method | seeds | rounds | optimiser steps | CPU s | wall s | "
             + " | ".join(f"{m} difference: mean (per seed)" for m in METRICS) + " |", "| --- " * (6 + len(METRICS)) + "|"]
    first = next(iter(summary.values()))["marks"][-1]
    lines.append("| base | - | - | - | - | - | " + " | ".join(f"{first[m]['base']:.3f} (absolute)" for m in METRICS) + " |")
    for method, s in summary.items():
        e = s["marks"][-1]
        cells = [method, len(e["seeds"]), round(e["rounds"]), round(e["optimizer_steps"]), round(e["cpu_seconds"]),
                 round(e["wall_seconds"])]
        for m in METRICS:
            per_seed = " / ".join(f"{v[0]:+.3f}" for v in e[m]["per_seed"])
            cells.append(f"**{e[m]['difference_mean']:+.3f}** ({per_seed})")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def curve_table(summary: dict[str, Any], metric: str = "aesthetic") -> str:
    """Gain per CPU-minute: the mean paired difference (sd over seeds) at each mark."""
    fractions = [e["fraction"] for e in next(iter(summary.values()))["marks"]]
    lines = ["| method | " + " | ".join(f"{f:g} of the budget" for f in fractions) + " |", "| --- " * (1 + len(fractions)) + "|"]
    for method, s in summary.items():
        cells = [f"{e[metric]['difference_mean']:+.3f} ± {e[metric]['difference_sd']:.3f} at {e['cpu_seconds'] / 60:.1f} CPU-min"
                 for e in s["marks"]]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_svg(summary: dict[str, Any], metric: str = "aesthetic", width: int = 520, height: int = 320) -> str:
    """A line chart of the mean paired difference against CPU-minutes, one line per method."""
    colours = {"spo": "#d62728", "diffusion_dpo": "#1f77b4", "d3po": "#2ca02c", "ddpo": "#9467bd"}
    pts = {m: [(0.0, 0.0)] + [(e["cpu_seconds"] / 60, e[metric]["difference_mean"]) for e in s["marks"]]
           for m, s in summary.items()}
    xs = [x for p in pts.values() for x, _ in p]
    ys = [y for p in pts.values() for _, y in p]
    x_max, y_lo, y_hi = max(xs) or 1.0, min(ys + [0.0]), max(ys + [0.0])
    pad = (y_hi - y_lo) * 0.1 or 0.05
    y_lo, y_hi = y_lo - pad, y_hi + pad
    left, right, top, bottom = 60, 130, 20, 40

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + x / x_max * (width - left - right), top + (y_hi - y) / (y_hi - y_lo) * (height - top - bottom))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
             '<rect width="100%" height="100%" fill="white"/>']
    x0, y0 = px(0, 0)
    x1, _ = px(x_max, 0)
    parts.append(f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#999" stroke-dasharray="4"/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>')
    parts.append(f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>')
    for frac in (0, 0.5, 1):
        x, _ = px(frac * x_max, y_lo)
        parts.append(f'<text x="{x}" y="{height - bottom + 15}" text-anchor="middle">{frac * x_max:.1f}</text>')
    for y in (y_lo + pad, 0.0, y_hi - pad):
        _, yy = px(0, y)
        parts.append(f'<text x="{left - 5}" y="{yy + 4}" text-anchor="end">{y:+.2f}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 5}" text-anchor="middle">CPU-minutes of training</text>')
    parts.append(f'<text x="12" y="{(top + height - bottom) / 2}" transform="rotate(-90 12 {(top + height - bottom) / 2})" '
                 f'text-anchor="middle">{metric} gain (paired, mean over seeds)</text>')
    for i, (method, p) in enumerate(pts.items()):
        colour = colours.get(method, "black")
        path = " ".join(f"{a:.1f},{b:.1f}" for a, b in (px(x, y) for x, y in p))
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts.append(f'<text x="{width - right + 10}" y="{top + 15 * (i + 1)}" fill="{colour}">{method}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=[], choices=list(PRESETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=float, default=600.0, help="training CPU-seconds per run")
    parser.add_argument("--marks", type=float, nargs="+", default=[1 / 3, 2 / 3, 1.0], help="fractions of the budget")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--eval-prompts", type=int, default=0, help="first N validation prompts (0 = all 24)")
    parser.add_argument("--eval-seeds", type=int, default=3)
    parser.add_argument("--output-dir", type=Path, default=Path("../runs/table2"))
    parser.add_argument("--output", type=Path, default=None, help="results JSON (merged with what it holds)")
    parser.add_argument("--table", action="store_true", help="print the tables of --output and stop")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run (tests: smaller runs)")
    args = parser.parse_args()
    if args.table:
        report = json.loads(args.output.read_text())
        print(markdown_table(report["summary"]) + "\n\n" + curve_table(report["summary"]))
        return
    if not args.methods:
        raise SystemExit("error: --methods: name at least one of " + ", ".join(PRESETS))
    if args.budget <= 0 or any(not 0 < f <= 1 for f in args.marks) or sorted(args.marks) != args.marks:
        raise SystemExit("error: --budget must be > 0 and --marks increasing fractions in (0, 1]")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    report = json.loads(args.output.read_text()) if args.output and args.output.exists() else {"runs": []}
    records = [r for r in report["runs"] if not (r["method"] in args.methods and r["seed"] in args.seeds)]
    summary = {}
    for method in args.methods:
        for seed in args.seeds:
            start = time.perf_counter()
            record = run_one(method, seed, args.budget, args.marks, args.output_dir, args.eval_prompts,
                             args.eval_seeds, args.overrides)
            records.append(record)
            last = record["points"][-1]
            print(f"{method} seed {seed}: {last['rounds']} rounds, {last['cpu_seconds']} CPU-s; aesthetic "
                  f"{last['difference']['aesthetic']['mean']:+.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
            if args.output:  # re-read: another worker may have merged its runs meanwhile
                current = json.loads(args.output.read_text()) if args.output.exists() else {"runs": []}
                merged = [r for r in current["runs"] if (r["method"], r["seed"]) not in
                          {(x["method"], x["seed"]) for x in records}] + records
                summary = summarise(merged)
                report = {"device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                                    f"{args.threads} thread(s) per run", "budget_cpu_seconds": args.budget,
                          "marks": args.marks, "presets": PRESETS, "runs": merged, "summary": summary}
                args.output.parent.mkdir(parents=True, exist_ok=True)
                tmp = args.output.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps(report, indent=2) + "\n")
                tmp.replace(args.output)
                args.output.with_suffix(".svg").write_text(curve_svg(summary))
    if summary:
        print(markdown_table(summary) + "\n\n" + curve_table(summary))


if __name__ == "__main__":
    main()
