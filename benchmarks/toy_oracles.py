"""Accuracy and consistency of the toy world's oracles, measured on every scene of the grammar.

    python benchmarks/toy_oracles.py --output benchmarks/results/toy-oracles.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from spo.toy import DEGRADATIONS, aesthetic, alignment, all_scenes, degrade, misalign, render
from spo.toy.grammar import COLOURS

from _report import write_report  # benchmarks/_report.py (scripts run from this folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="renders per scene")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    scenes = [s for s in all_scenes() for _ in range(args.seeds)]
    clean = [render(s, rng) for s in scenes]
    own = np.array([alignment(x, s) for x, s in zip(clean, scenes)])
    changed = np.array([alignment(x, misalign(s, rng)) for x, s in zip(clean, scenes)])
    clean_aesthetic = np.array([aesthetic(x) for x in clean])
    result: dict = {
        "renders": len(clean),
        "alignment_clean_mean": round(float(own.mean()), 4),
        "alignment_clean_perfect_share": round(float((own == 1).mean()), 4),
        "alignment_one_attribute_changed_mean": round(float(changed.mean()), 4),
        "alignment_drops_when_prompt_changed_share": round(float((changed < own).mean()), 4),
        "aesthetic_clean_min": round(float(clean_aesthetic.min()), 4),
        "aesthetic_clean_std": float(clean_aesthetic.std()),
        "degradations": {},
    }
    for kind in DEGRADATIONS:
        for strength in (0.2, 0.6, 1.0):
            a, al = [], []
            for x, s in zip(clean, scenes):
                y = degrade(x, kind, strength, rng, np.array(COLOURS[s.colour]) / 255)
                a.append(aesthetic(y))
                al.append(alignment(y, s))
            a_arr = np.array(a)
            result["degradations"][f"{kind}@{strength}"] = {
                "aesthetic_mean": round(float(a_arr.mean()), 4),
                "below_clean_share": round(float((a_arr < clean_aesthetic - 1e-3).mean()), 4),
                "alignment_mean": round(float(np.mean(al)), 4),
            }
    write_report(result, args.output)


if __name__ == "__main__":
    main()
