"""What the toy world's preference models prefer, on controlled pairs with known ground truth.

For every scene of the grammar (x --seeds renders): a clean render against (a) the same render
degraded in detail (each kind at strength 0.5) and (b) a render with one layout attribute
changed. Reports, for the toy CLIP (contrastive only), the toy PickScore (fine-tuned on the
generic pairs) and the toy SPM at t = 0, the share of pairs in which the clean / aligned image
scores higher (a latent reward model, ``lrm=DIR``: each image noised at t = 1 with its own seeded
noise on the toy base model's schedule and scored at t = 1, as LPO scores a finished candidate) (``--models``: by default each shipped build's toy CLIP, toy PickScore and toy
SPM). With ``--data`` (a built preference set), also the accuracy on its validation pairs
of the noise-free blend (0.7 alignment + 0.3 aesthetic, a perfect model of the labels' mean):
the ceiling a reward model can be expected to approach, since the labels carry noise.

    python benchmarks/toy_reward_models.py --data runs/toy-build/preference-data \
        --output benchmarks/results/toy-reward-models.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from spo.toy.judges import JUDGES, judge_spec, load_judge
from spo.toy import DEGRADATIONS, all_scenes, degrade, misalign, render
from spo.toy.render import to_tensor_range
from spo.toy.grammar import COLOURS

from _report import write_report  # benchmarks/_report.py (scripts run from this folder)


#: where a latent reward model scores the controlled pairs: the smallest DDIM timestep of the toy schedule
LATENT_T = 1


def _noised(images: torch.Tensor, seed: int) -> torch.Tensor:
    """``images`` (pixel space: the toy's latents) noised at ``LATENT_T`` on the toy base model's
    schedule, each with its own noise from a generator seeded by ``seed``."""
    from diffusers import DDIMScheduler

    from spo.builtin import resolve_weights
    from spo.diffusion.schedule import schedule_from_config

    schedule = schedule_from_config(DDIMScheduler.from_pretrained(resolve_weights("toy:base"), subfolder="scheduler"), 20)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return schedule.add_noise(images, noise, torch.full((images.shape[0],), LATENT_T)).float()


def preferred_share(model, a: list[np.ndarray], b: list[np.ndarray], prompts: list[str]) -> float:
    xa = torch.from_numpy(np.stack([to_tensor_range(x) for x in a]))
    xb = torch.from_numpy(np.stack([to_tensor_range(x) for x in b]))
    t = torch.zeros(len(a))
    if getattr(model, "takes_latents", False):
        xa, xb, t = _noised(xa, 1), _noised(xb, 2), torch.full((len(a),), LATENT_T)
    with torch.no_grad():
        sa = model(xa, prompts, t)
        sb = model(xb, prompts, t)
    return round(float((sa > sb).float().mean()), 4)


def logit_scale(model) -> float:
    return float((model.logit_scale if hasattr(model, "logit_scale") else model.model.logit_scale).exp())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2, help="renders per scene")
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--data", type=Path, default=None, help="a built preference set (spo toy build)")
    parser.add_argument("--models", nargs="+", default=[n for n, (_, how) in JUDGES.items() if how != "control"],
                        help="judges of spo.toy.judges.JUDGES, reward-model directories or LABEL=either (an SPM scores at t = 0)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    models = {label: load_judge(name) for label, name in map(judge_spec, args.models)}
    rng = np.random.default_rng(0)
    scenes = [s for s in all_scenes() for _ in range(args.seeds)]
    prompts = [s.prompt for s in scenes]
    clean = [render(s, rng) for s in scenes]
    wrong = [render(misalign(s, rng), rng) for s in scenes]
    result: dict = {"pairs_per_comparison": len(scenes), "strength": args.strength, "clean_over_misaligned": {},
                    "clean_over_degraded": {}}
    # the scale of the scores (the tie threshold of SPO acts on softmax gaps of these)
    result["exp_logit_scale"] = {name: round(logit_scale(m), 3) for name, m in models.items()}
    for name, model in models.items():
        result["clean_over_misaligned"][name] = preferred_share(model, clean, wrong, prompts)
        result["clean_over_degraded"][name] = {}
        for kind in DEGRADATIONS:
            degraded = [degrade(x, kind, args.strength, rng, np.array(COLOURS[s.colour]) / 255) for x, s in zip(clean, scenes)]
            result["clean_over_degraded"][name][kind] = preferred_share(model, clean, degraded, prompts)
    if args.data is not None:
        from spo.data import load_preference_split
        from spo.toy.preference_data import AESTHETIC_WEIGHT, ALIGNMENT_WEIGHT

        val = load_preference_split(str(args.data), "validation_unique")
        decided = [r for r in val.remove_columns(["jpg_0", "jpg_1"]) if r["label_0"] != r["label_1"]]
        g = [(ALIGNMENT_WEIGHT * r["alignment_0"] + AESTHETIC_WEIGHT * r["aesthetic_0"],
              ALIGNMENT_WEIGHT * r["alignment_1"] + AESTHETIC_WEIGHT * r["aesthetic_1"]) for r in decided]
        agree = [(g0 > g1) == (r["label_0"] > r["label_1"]) for (g0, g1), r in zip(g, decided)]
        result["validation_pairs_non_tied"] = len(decided)
        result["noise_free_blend_accuracy"] = round(float(np.mean(agree)), 4)
        result["aesthetic_only_accuracy"] = round(float(np.mean(
            [(r["aesthetic_0"] > r["aesthetic_1"]) == (r["label_0"] > r["label_1"]) for r in decided])), 4)
    write_report(result, args.output)


if __name__ == "__main__":
    main()
