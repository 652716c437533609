"""The batched torch oracles against the numpy reference: agreement and speed.

Scores the same images with :mod:`spo.toy.oracles` (numpy, one by one: the reference) and
:mod:`spo.toy.batched_oracles` (torch, batched): every scene x 3 clean renders (648), the same
renders with each degradation at strengths 0.2 / 0.6 / 1.0 and with a changed prompt, and
``--samples`` images of the shipped base model (training prompts, DDIM 20, eta 1, CFG 3, seed 0).
Reports the largest aesthetic difference, every alignment disagreement, and images per second of
both (one process, the machine's threads).

    python benchmarks/toy_batched_oracles.py --output benchmarks/results/toy-batched-oracles.json
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from spo.builtin import resolve_weights
from spo.sampling import ddim_sample
from spo.toy import DEGRADATIONS, aesthetic, alignment, all_scenes, degrade, misalign, render
from spo.toy.batched_oracles import aesthetic_batch, alignment_batch, to_oracle_images
from spo.toy.grammar import COLOURS, training_prompts
from spo.toy.model import ToyBackbone

from _report import write_report  # benchmarks/_report.py (scripts run from this folder)


def controlled_sets(seeds: int) -> dict[str, tuple[list[np.ndarray], list]]:
    rng = np.random.default_rng(0)
    scenes = [s for s in all_scenes() for _ in range(seeds)]
    clean = [render(s, rng) for s in scenes]
    sets = {"clean": (clean, scenes), "prompt changed": (clean, [misalign(s, rng) for s in scenes])}
    for kind in DEGRADATIONS:
        for strength in (0.2, 0.6, 1.0):
            sets[f"{kind}@{strength}"] = (
                [degrade(x, kind, strength, rng, np.array(COLOURS[s.colour]) / 255) for x, s in zip(clean, scenes)], scenes)
    return sets


def base_samples(n: int) -> tuple[list[np.ndarray], list[str]]:
    backbone = ToyBackbone.from_pretrained(resolve_weights("toy:base"), device="cpu")
    prompts = (training_prompts() * (n // len(training_prompts()) + 1))[:n]
    latents = ddim_sample(backbone, prompts, num_inference_steps=20, eta=1.0, guidance_scale=3.0,
                          generator=torch.Generator().manual_seed(0))
    return list(to_oracle_images(backbone.decode(latents)).numpy()), prompts


def compare(images: list[np.ndarray], prompts: list) -> dict:
    start = time.perf_counter()
    ae_ref = np.array([aesthetic(x) for x in images])
    al_ref = np.array([alignment(x, p) for x, p in zip(images, prompts)])
    numpy_seconds = time.perf_counter() - start
    batch = torch.from_numpy(np.stack(images))
    start = time.perf_counter()
    ae = aesthetic_batch(batch).numpy()
    aesthetic_seconds = time.perf_counter() - start
    start = time.perf_counter()
    al = alignment_batch(batch, prompts).numpy()
    alignment_seconds = time.perf_counter() - start
    bad = np.nonzero(al != al_ref)[0]
    return {
        "images": len(images),
        "aesthetic_max_abs_difference": float(np.abs(ae - ae_ref).max()),
        "alignment_disagreements": [{"index": int(i), "numpy": float(al_ref[i]), "batched": float(al[i])} for i in bad],
        "seconds": {"numpy_both": numpy_seconds, "batched_aesthetic": aesthetic_seconds, "batched_alignment": alignment_seconds},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="renders per scene")
    parser.add_argument("--samples", type=int, default=200, help="base-model samples")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    parts = {name: compare(*data) for name, data in controlled_sets(args.seeds).items()}
    if args.samples:
        parts["base-model samples"] = compare(*base_samples(args.samples))
    n = sum(p["images"] for p in parts.values())
    seconds = {k: sum(p["seconds"][k] for p in parts.values()) for k in ("numpy_both", "batched_aesthetic", "batched_alignment")}
    result = {
        "device": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "images": n,
        "aesthetic_max_abs_difference": max(p["aesthetic_max_abs_difference"] for p in parts.values()),
        "alignment_disagreements": sum(len(p["alignment_disagreements"]) for p in parts.values()),
        "images_per_second": {
            "numpy_aesthetic_and_alignment": round(n / seconds["numpy_both"], 1),
            "batched_aesthetic": round(n / seconds["batched_aesthetic"], 1),
            "batched_alignment": round(n / seconds["batched_alignment"], 1),
            "batched_both": round(n / (seconds["batched_aesthetic"] + seconds["batched_alignment"]), 1),
        },
        "parts": parts,
    }
    write_report(result, args.output, shown={k: v for k, v in result.items() if k != "parts"})


if __name__ == "__main__":
    main()
