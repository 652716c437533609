"""SPO on the toy world with different judges, at two budgets, over training seeds.

For each judge and training seed: SPO with the ``toy`` preset (plus any key=value overrides) for
the first budget's rounds, evaluation of that LoRA, then the same run resumed to the next budget
(the learning rate is constant, so a resumed run is exactly the longer run) and evaluated again.
Evaluation is `spo demo`'s: the 24 validation prompts x 3 sampling seeds, base and fine-tuned with
the same noise, toy PickScore (v1) and the two oracles, paired differences with 95% intervals.

Judges (``--judges``, spo.toy.judges.JUDGES):
  ideal-aesthetic  the aesthetic oracle on each candidate's x0-hat (a control, never a default)
  random           seeded random scores (a control)
  spm-vN           the toy SPM of build vN (step-aware)
  pickscore-vN     build vN's toy PickScore as a clean reward (Table 5's third row)
  clip-vN          build vN's toy CLIP as a clean reward
  ideal-blend      the noise-free generic blend oracle (a perfect toy PickScore; a control)
  ideal-blend-continuation(-4)  each candidate finished 1 (4) times by the current policy, scored by
                   the log mean blend of its finished images (a latent control: it scores x_{t-1})
  LABEL=DIR        a reward model's directory (e.g. a build not shipped), reported as LABEL; a latent
                   reward model's directory (lrm_config.json) runs with preference.kind=latent

The tie threshold of a reward model is the release's 0.3 at PickScore's logit scale 100 carried
to the model's own scale at an equal cosine gap (spo.toy.judges.judge_threshold); the controls
and the v1 SPM use the toy preset's 0.07 (for the ideal judge, whose score is log aesthetic, a
15% higher aesthetic).

With ``--preset toy-lpo`` (LPO: pools at every step, beta 500, a tie threshold rising with
sigma_t): a latent reward model keeps the preset's schedule (0.35 -> 0.5); the controls get that
schedule carried to their scale (spo.toy.judges.control_threshold: 0.083 -> 0.124, as SPO's
release 0.3 maps to the controls' 0.07), the latent ones (the continuation controls) scoring the
candidates x_{t-1} at t as LPO does, the others x0-hat as SPO does; the other reward models score
images and are refused. A latent reward model under the SPO presets keeps LPO's schedule (its own).

Every part resumes: finished trainings and evaluations are reused, so the script can be run judge
by judge and the table collected at the end (results merge into ``--output``).

    python benchmarks/toy_spo_controls.py --judges ideal-aesthetic random --seeds 0 1 2 \\
        --budgets 60 300 --output-dir runs/controls --output benchmarks/results/toy-spo-controls.json
    python benchmarks/toy_spo_controls.py --table --output benchmarks/results/toy-spo-controls.json

LPO on the toy world (a latent reward model of ``spo train-spm toy-lpo``, and a control):

    python benchmarks/toy_spo_controls.py --preset toy-lpo --judges lrm=runs/toy-lrm/lrm ideal-blend \\
        --seeds 0 1 2 --budgets 60 --output-dir runs/lpo-controls --output benchmarks/results/toy-lpo-controls.json

The flow-matching twin (``--preset toy-flow``; evaluated with the SDE at the training noise level):

    python benchmarks/toy_spo_controls.py --preset toy-flow --eval-eta 0.7 --judges ideal-aesthetic \\
        --seeds 0 --budgets 60 --output-dir runs/flow-controls --output benchmarks/results/toy-flow-spo.json
    python benchmarks/toy_spo_controls.py --preset toy-flow --eval-eta 0.7 --judges spm-v1 \\
        --seeds 0 1 2 --budgets 60 --output-dir runs/flow-controls --output benchmarks/results/toy-flow-spo.json
    python benchmarks/toy_spo_controls.py sampling.eta=1.0 --preset toy-flow --eval-eta 1.0 \\
        --judges ideal-aesthetic-a1=ideal-aesthetic spm-v1-a1=spm-v1 --seeds 0 --budgets 60 \\
        --output-dir runs/flow-controls-a1 --output benchmarks/results/toy-flow-spo.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from spo.config import load_config
from spo.data import load_prompts
from spo.toy.eval_run import base_vs_fine_tuned, evaluate_run
from spo.toy.judges import (
    JUDGES,
    control_threshold,
    judge_reference,
    judge_spec,
    judge_threshold,
    load_judge,
)
from spo.training import SPOTrainer
from spo.training.checkpoint import list_checkpoints

from _report import write_report  # benchmarks/_report.py (scripts run from this folder)


def lpo_preset(preset: str) -> bool:
    """Does ``preset`` run LPO (``objective.name: lpo``: judged on latents, LPO's tie schedule)?"""
    return load_config(preset).objective.name == "lpo"


def judge_setup(name: str, seed: int, preset: str = "toy") -> tuple[Any, list[str], str]:
    """(scorer for the trainer, or None to let it load the reward model; config overrides; the
    tie threshold as reported). A control is the scorer itself (a continuation control is bound
    to the trainer's policy by the SPO method: ``needs_backbone``); a reward model is loaded by
    the trainer (a latent one with ``preference.kind=latent``).

    Tie thresholds: under the SPO presets, the controls' 0.07 or the reward model's own
    (:func:`~spo.toy.judges.judge_threshold`); a latent reward model always LPO's sigma schedule
    of the ``toy-lpo`` preset; under an LPO preset the controls get that schedule carried to their
    scale (:func:`~spo.toy.judges.control_threshold`: 0.35 -> 0.083, 0.5 -> 0.124)."""
    reference, variant = judge_reference(name)
    lpo = lpo_preset(preset)
    if variant == "latent":  # the trainer loads it; its tie rule is LPO's (the toy-lpo preset's)
        pools = load_config("toy-lpo").pools
        schedule = [f"pools.threshold_schedule={pools.threshold_schedule}", f"pools.threshold_min={pools.threshold_min}",
                    f"pools.threshold_max={pools.threshold_max}"]
        label = f"{pools.threshold_schedule} {pools.threshold_min}-{pools.threshold_max}"
        return None, ["preference.kind=latent", f"preference.pretrained={reference}", *([] if lpo else schedule)], label
    if lpo and variant != "control":
        raise ValueError(f"judge {name!r} scores images: with an LPO preset use a latent reward model's directory "
                         "(lrm_config.json) or a control")
    judge = load_judge(name, seed=seed)
    if variant == "control" and lpo:  # LPO's schedule at the controls' scale; the LRM is never loaded
        pools = load_config(preset).pools
        low, high = control_threshold(pools.threshold_min), control_threshold(pools.threshold_max)
        return judge, ["preference.pretrained=toy:base", f"pools.threshold_min={low}", f"pools.threshold_max={high}"], \
            f"{pools.threshold_schedule} {low}-{high}"
    threshold = judge_threshold(name, judge)
    assert not isinstance(threshold, dict)
    overrides = [f"pools.threshold={threshold}"]
    if variant == "control":
        return judge, overrides, str(threshold)
    return None, [f"preference.pretrained={reference}", f"preference.variant={variant}", *overrides], str(threshold)


def rounds_of(run_dir: Path, budget: int) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in lines if r.get("type") == "round" and r["round"] < budget]


def run_one(label: str, name: str, seed: int, budgets: list[int], out: Path, overrides: list[str],
            progress: bool, eval_prompts: int = 0, eval_seeds: int = 3, eval_eta: float = 1.0,
            preset: str = "toy") -> dict[str, Any]:
    run_dir = out / label / f"seed{seed}" / "spo"
    scorer, judge_overrides, threshold = judge_setup(name, seed, preset)
    results = {}
    for budget in budgets:
        kept = run_dir.parent / f"lora-r{budget}"
        eval_dir = run_dir.parent / f"eval-r{budget}"
        if not (eval_dir / "eval.json").exists():
            if not kept.exists():
                config = load_config(preset, [f"seed={seed}", *judge_overrides, *overrides, f"train.rounds={budget}",
                                             "logging.keep_checkpoints=1"])
                trainer = SPOTrainer(config, run_dir, scorer=scorer, resume=bool(list_checkpoints(run_dir)),
                                     progress=progress)
                if trainer.rounds_done > budget:
                    raise SystemExit(f"error: {run_dir} has trained past {budget} rounds without keeping {kept.name}; "
                                     "evaluate budgets in increasing order, or remove the run to redo it")
                trainer.train()
                shutil.copytree(run_dir / "lora", kept.with_name(kept.name + ".partial"), dirs_exist_ok=True)
                kept.with_name(kept.name + ".partial").rename(kept)
            start = time.perf_counter()
            prompts = load_prompts("toy:validation-prompts")
            evaluate_run(run_dir, prompts[:eval_prompts] if eval_prompts else prompts, eval_dir, seeds=eval_seeds,
                         guidance_scale=3.0, num_inference_steps=20, eta=eval_eta, lora=kept,
                         base_cache=out / f"base-eval-{eval_prompts or len(prompts)}x{eval_seeds}")
            (eval_dir / "seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
        result = base_vs_fine_tuned(json.loads((eval_dir / "eval.json").read_text()))
        rounds = rounds_of(run_dir, budget)
        results[str(budget)] = {
            "rounds": len(rounds),
            "optimizer_steps": sum(r.get("optimizer_steps", 0) for r in rounds),
            "valid_pair_rate": round(float(np.mean([r["valid_pair_rate"] for r in rounds])), 3),
            "training_seconds": round(sum(r["sampling_seconds"] + r["training_seconds"] for r in rounds), 1),
            "eval_seconds": float((eval_dir / "seconds.txt").read_text()) if (eval_dir / "seconds.txt").exists() else None,
            "threshold": threshold,
            "base": result["base"], "fine_tuned": result["fine_tuned"], "difference": result["difference"],
        }
    return results


def summarise(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per budget and metric: the mean and sd over seeds of the per-seed paired differences."""
    summary: dict[str, Any] = {}
    budgets = sorted({b for r in runs.values() for b in r}, key=int)
    for budget in budgets:
        per_seed = {s: r[budget] for s, r in runs.items() if budget in r}
        first = next(iter(per_seed.values()))
        entry: dict[str, Any] = {
            "seeds": sorted(per_seed, key=int),
            "optimizer_steps_mean": float(np.mean([r["optimizer_steps"] for r in per_seed.values()])),
            "valid_pair_rate_mean": float(np.mean([r["valid_pair_rate"] for r in per_seed.values()])),
            "training_seconds_mean": float(np.mean([r["training_seconds"] for r in per_seed.values()])),
        }
        for metric in first["difference"]:
            diffs = [r["difference"][metric]["mean"] for r in per_seed.values()]
            entry[metric] = {
                "base": first["base"][metric]["mean"],
                "difference_mean": float(np.mean(diffs)),
                "difference_sd": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else float("nan"),
                "per_seed": {s: [round(r["difference"][metric][k], 4) for k in ("mean", "low", "high")]
                             for s, r in per_seed.items()},
            }
        summary[budget] = entry
    return summary


def markdown_table(report: dict[str, Any]) -> str:
    """One row per judge and budget: optimiser steps, valid-pair rate, wall time, and for each
    metric the mean over seeds of the paired difference with every seed's value (one seed: its
    95% interval instead)."""
    metrics = ("aesthetic", "alignment", "pickscore")
    lines = ["| judge | rounds | seeds | optimiser steps | valid pairs | training s / run | "
             + " | ".join(f"{m} difference: mean (per seed) or [95% interval]" for m in metrics) + " |",
             "| --- " * (6 + len(metrics)) + "|"]
    for name, entry in report["judges"].items():
        for budget, s in entry["summary"].items():
            cells = [name, budget, len(s["seeds"]), round(s["optimizer_steps_mean"]), f"{s['valid_pair_rate_mean']:.2f}",
                     round(s["training_seconds_mean"])]
            for m in metrics:
                values = list(s[m]["per_seed"].values())
                if len(values) == 1:  # one seed: its 95% interval over the 72 evaluation images
                    cells.append(f"**{values[0][0]:+.3f}** [{values[0][1]:+.3f}, {values[0][2]:+.3f}]")
                else:
                    per_seed = " / ".join(f"{v[0]:+.3f}" for v in values)
                    cells.append(f"**{s[m]['difference_mean']:+.3f}** ({per_seed})")
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--judges", nargs="+", default=[],
                        help=f"of {list(JUDGES)}, reward-model directories, or LABEL=either")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budgets", type=int, nargs="+", default=[60, 300], help="rounds, increasing")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/controls"))
    parser.add_argument("--output", type=Path, default=None, help="JSON; results of other judges in it are kept")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--eval-prompts", type=int, default=0, help="the first N validation prompts (0: all 24)")
    parser.add_argument("--eval-seeds", type=int, default=3, help="sampling seeds per evaluation prompt")
    parser.add_argument("--eval-eta", type=float, default=1.0,
                        help="DDIM eta of the evaluation sampler (1.0, as the toy preset trains); for the flow toy "
                        "model (preset toy-flow) its SDE noise level")
    parser.add_argument("--preset", default="toy", help="the base preset of every run (toy, toy-flow, or toy-lpo)")
    parser.add_argument("--table", action="store_true", help="only print --output's results as a markdown table")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(args.output.read_text())))
        return
    if sorted(args.budgets) != args.budgets:
        parser.error("--budgets must increase")
    try:
        specs = [judge_spec(j) for j in args.judges]
        lpo = lpo_preset(args.preset)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    refused = [name for _, name in specs if lpo and judge_reference(name)[1] not in ("control", "latent")]
    if refused:
        parser.error(f"--preset {args.preset} scores latents: {refused} score images; use a latent reward model's "
                     "directory (lrm_config.json) or a control")
    report: dict[str, Any] = {}
    if args.output and args.output.exists():
        report = json.loads(args.output.read_text())
    report.setdefault("judges", {})
    for label, name in specs:
        entry = report["judges"].get(label, {"runs": {}})
        entry["judge"] = name
        for seed in args.seeds:
            print(f"== judge {label}, seed {seed}", flush=True)
            entry["runs"][str(seed)] = run_one(label, name, seed, args.budgets, args.output_dir, args.overrides,
                                               not args.no_progress, args.eval_prompts, args.eval_seeds, args.eval_eta,
                                               args.preset)
        entry["overrides"] = args.overrides
        entry["preset"], entry["eval_eta"] = args.preset, args.eval_eta
        entry["summary"] = summarise(entry["runs"])
        report["judges"][label] = entry
        if args.output:
            write_report(report, args.output, shown={"judge": label, "summary": entry["summary"]})
    if not args.output:
        write_report(report, None, shown={label: report["judges"][label]["summary"] for label, _ in specs})


if __name__ == "__main__":
    main()
