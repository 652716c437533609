"""Pool accuracy on the toy world: does a judge's best/worst pair inside an SPO pool point towards
the better outcome? (spo.toy.pool_accuracy; docs/toy-world.md, "What a judge knows inside a pool")

From the shipped base model, ``--prompts`` training prompts, pools of k candidates x_{t-1} at each
``--timesteps`` t, each candidate finished ``--continuations`` times and labelled by the mean
oracle scores of its finished images; then each judge scores the candidates' x0-hat as SPO does,
or, a latent judge (a latent reward model's directory, ``lrm_config.json``; the continuation
controls), the candidates' latents x_{t-1} at the pool's t as LPO does. The pools are cached
(``--cache``), so judges added later are measured on the same pools; a cache drawn before the pools
kept their candidates is refused (delete it to redraw: the same seeds give the same pools).

Tie thresholds (``thresholds`` in the JSON; spo.toy.judges.judge_threshold): the toy preset's 0.07
for the controls (the continuation controls included) and the v1 SPM, the release's 0.3 carried to
each other reward model's logit scale, and for a latent reward model the toy-lpo preset's sigma
schedule (0.35 at t = 1 to 0.5 at t = 951, by the pool's t). The continuation controls sample
with the base model the pools were drawn from (with the pools' CFG, eta and steps).

    python benchmarks/toy_pool_accuracy.py --output benchmarks/results/toy-pool-accuracy.json
    python benchmarks/toy_pool_accuracy.py --prompts 4 --continuations 2 --timesteps 451 51   # minutes -> seconds
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from spo.builtin import resolve_weights
from spo.toy.judges import JUDGES, judge_spec, judge_threshold, load_judge
from spo.toy.model import ToyBackbone
from spo.toy.pool_accuracy import (
    PoolAccuracySettings,
    StalePoolsError,
    draw_pools,
    load_pools,
    measure,
    pool_prompts,
    save_pools,
)

from _report import write_report  # benchmarks/_report.py (scripts run from this folder)

DEFAULT_JUDGES = [name for name in JUDGES if name.endswith(("-v1", "-v2"))] + ["random", "ideal-aesthetic", "ideal-blend"]


def table(result: dict) -> str:
    """Agreement with the aesthetic and blend labels and the aesthetic rank correlation, per t; last
    row ("pair"): the agreement of the pairs past the tie threshold pooled over t, and their rate."""
    judges = list(result["per_t"][0]["judges"])
    lines = ["t    | " + " | ".join(f"{j:>22}" for j in judges),
             "     | " + " | ".join(f"{'agr ae / blend, rho ae':>22}" for _ in judges)]
    for entry in result["per_t"]:
        cells = []
        for j in judges:
            m = entry["judges"][j]
            cells.append(f"{m['aesthetic']['agreement'][0]:.2f} / {m['blend']['agreement'][0]:.2f}, "
                         f"{m['aesthetic']['spearman'][0]:+.2f}")
        lines.append(f"{entry['t']:<4} | " + " | ".join(f"{c:>22}" for c in cells))
    cells = []
    for j in judges:  # the pairs that pass the tie threshold, pooled over t: what SPO would train on
        m = result["trained_pairs"][j]
        cells.append(f"{m['aesthetic']['agreement_valid'][0]:.2f} / {m['blend']['agreement_valid'][0]:.2f}, "
                     f"{m['valid_rate']:.2f} valid")
    lines.append("pair | " + " | ".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def main() -> None:
    defaults = PoolAccuracySettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=defaults.prompts)
    parser.add_argument("--continuations", type=int, default=defaults.continuations)
    parser.add_argument("--k", type=int, default=defaults.k)
    parser.add_argument("--timesteps", type=int, nargs="+", default=defaults.timesteps)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--judges", nargs="+", default=[j for j in DEFAULT_JUDGES if j in JUDGES],
                        help="names of spo.toy.judges.JUDGES, reward-model directories (a latent reward model's "
                        "too), or LABEL=either")
    parser.add_argument("--cache", type=Path, default=None, help="default: REPO/runs/pool-accuracy/pools-P-C-k-seed.pt")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    try:
        specs = [judge_spec(j) for j in args.judges]
    except ValueError as err:
        parser.error(str(err))
    settings = PoolAccuracySettings(prompts=args.prompts, continuations=args.continuations, k=args.k,
                                    timesteps=args.timesteps, seed=args.seed)
    cache = args.cache or Path(__file__).parent.parent / "runs" / "pool-accuracy" / f"pools-{args.prompts}-{args.continuations}-{args.k}-{args.seed}.pt"
    start = time.perf_counter()
    try:
        pools = load_pools(cache, settings)
    except StalePoolsError as err:
        parser.error(str(err))
    drawn = pools is None
    backbone = None

    def base_model() -> ToyBackbone:
        nonlocal backbone
        if backbone is None:
            backbone = ToyBackbone.from_pretrained(resolve_weights("toy:base"), device="cpu")
            backbone.unet.to(memory_format=torch.channels_last)  # samples faster on CPU (benchmarks/toy_round.py)
        return backbone

    if pools is None:
        pools = draw_pools(base_model(), settings)
        save_pools(pools, settings, cache)
    draw_seconds = time.perf_counter() - start
    judges = {}
    for label, name in specs:
        judge = load_judge(name, seed=args.seed)
        if getattr(judge, "needs_backbone", False):  # a continuation control: finishes candidates with the base model
            judge.bind_sampling(base_model(), num_inference_steps=settings.num_inference_steps,
                                guidance_scale=settings.guidance_scale, eta=settings.eta)
        judges[label] = (judge, judge_threshold(name, judge))
    result = measure(judges, pools, pool_prompts(settings))
    result = {
        "settings": vars(settings) | {"base_model": "toy:base"},
        "device": f"CPU, {torch.get_num_threads()} threads ({platform.machine()})",
        "seconds_drawing_pools": round(draw_seconds, 1) if drawn else None,
        "thresholds": {name: threshold for name, (_, threshold) in judges.items()},
        **result,
    }
    print(table(result))
    write_report(result, args.output, shown={"seconds_drawing_pools": result["seconds_drawing_pools"]})


if __name__ == "__main__":
    main()
