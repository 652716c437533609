"""Judges for the toy world's experiments: who scores a pool's candidates.

A judge is a :data:`spo.sampling.PoolScorer` (images in [-1, 1], prompts, timesteps -> raw scores,
read by the tie rule as logits), named in :data:`JUDGES`: each shipped build's toy CLIP and toy
PickScore (clean: every image scored as at t = 0) and toy SPM (step-aware), and two controls,
never a default of any command:

- ``ideal-aesthetic``: the aesthetic oracle itself, score = log aesthetic (minus the sum of its
  scaled defects), so the tie rule compares aesthetic *ratios*: with the toy threshold 0.07 a pair
  counts when the better candidate's aesthetic is at least 15% higher. What SPO could do with a
  judge that knows exactly what the evaluation measures.
- ``ideal-blend``: the generic label's noise-free blend 0.7 alignment + 0.3 aesthetic, score = its
  log (the tie threshold 0.07 then asks for a 15% higher blend): a perfect toy PickScore, what SPO
  could do with a generic reward model that makes no mistake.
- ``random``: seeded uniform scores (every pool's pair is random): what moving the LoRA does with
  pairs that carry no information.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..builtin import TOY_REWARD_VERSIONS
from ..training.seeding import derive_seed
from .batched_oracles import aesthetic_batch, aesthetic_defects_batch, alignment_batch, to_oracle_images
from .oracles import EXCESS_SCALE, NOISE_SCALE, OFF_LINE_SCALE
from .preference_data import AESTHETIC_WEIGHT, ALIGNMENT_WEIGHT

#: controls by name; everything else is a reward model (see :func:`load_judge`)
CONTROL_JUDGES = ("ideal-aesthetic", "ideal-blend", "random")
#: the judges of the toy world's experiments: a control, or (reward model, how it scores)
JUDGES: dict[str, tuple[str, str]] = {
    "ideal-aesthetic": ("ideal-aesthetic", "control"),
    "ideal-blend": ("ideal-blend", "control"),
    "random": ("random", "control"),
    **{f"{model}-{version}": (f"toy:{model}-{version}", "step_aware" if model == "spm" else "clean")
       for version in TOY_REWARD_VERSIONS for model in ("clip", "pickscore", "spm")},
}
#: the toy preset's tie threshold: the release's 0.3 carried to the v1 toy SPM's logit scale, kept
#: for the controls (the ideal judges' scores are logs: 0.07 asks for a 15% higher oracle score)
TOY_THRESHOLD = 0.07
#: the release's tie threshold 0.3 on the softmax gap at PickScore's logit scale 100, as a cosine gap
RELEASE_COSINE_GAP = 2 * math.atanh(0.3) / 100


def tie_threshold(logit_scale: float) -> float:
    """The release's tie rule at another logit scale: the softmax gap of the same cosine gap
    (0.3 at PickScore's scale 100; 0.067 at the v1 toy SPM's 21.7, which the toy preset rounds to 0.07)."""
    return round(math.tanh(logit_scale * RELEASE_COSINE_GAP / 2), 3)


def judge_threshold(name: str, judge: Any) -> float:
    """The tie threshold SPO uses with judge ``name``: the preset's for the controls and the v1 SPM,
    else :func:`tie_threshold` at the reward model's own logit scale."""
    if name in CONTROL_JUDGES or name == "spm-v1":
        return TOY_THRESHOLD
    return tie_threshold(float(judge.model.logit_scale.exp()))


class AestheticOracleJudge:
    """The ideal aesthetic judge: log aesthetic oracle of each image (timesteps ignored)."""

    def __call__(self, images: Tensor, prompts: Sequence[str], timesteps: Tensor | None = None) -> Tensor:
        d = aesthetic_defects_batch(to_oracle_images(images))
        log_aesthetic = -(d["noise"] / NOISE_SCALE + d["off_line"] / OFF_LINE_SCALE + d["excess"] / EXCESS_SCALE)
        return log_aesthetic.float().to(images.device)


class BlendOracleJudge:
    """The ideal generic judge: log of the noise-free generic blend 0.7 alignment + 0.3 aesthetic
    of each image with its prompt (timesteps ignored): a perfect toy PickScore."""

    def __call__(self, images: Tensor, prompts: Sequence[str], timesteps: Tensor | None = None) -> Tensor:
        pictures = to_oracle_images(images)
        blend = ALIGNMENT_WEIGHT * alignment_batch(pictures, list(prompts)) + AESTHETIC_WEIGHT * aesthetic_batch(pictures)
        return blend.clamp(min=1e-6).log().float().to(images.device)


class RandomJudge:
    """Uniform scores in [0, 10), seeded by ``seed`` and the images themselves: best and worst are
    random, yet the same images get the same scores, so a resumed run is the uninterrupted one."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def __call__(self, images: Tensor, prompts: Sequence[str], timesteps: Tensor | None = None) -> Tensor:
        digest = zlib.crc32(images.detach().float().cpu().numpy().tobytes())
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "random-judge", digest))
        return (torch.rand(images.shape[0], generator=generator) * 10).to(images.device)


def judge_spec(argument: str) -> tuple[str, str]:
    """``LABEL=JUDGE`` or ``JUDGE`` (a name of :data:`JUDGES` or a reward model's directory) ->
    (label for reports, judge); e.g. ``spm-v2=runs/toy-build-v2/spm`` for a build not shipped."""
    label, sep, judge = argument.partition("=")
    judge = judge if sep else label
    judge_reference(judge)  # unknown judges fail here, named
    return label, judge


def judge_reference(name: str) -> tuple[str, str]:
    """(reference, how it scores) of a judge of :data:`JUDGES` or of a reward model's directory
    (an SPM directory scores step-aware, a CLIPModel directory clean); how = ``control`` for the
    controls."""
    from ..preference.spm import SPM_CONFIG

    if name in JUDGES:
        return JUDGES[name]
    if Path(name).is_dir():
        return name, "step_aware" if (Path(name) / SPM_CONFIG).exists() else "clean"
    raise ValueError(f"unknown judge {name!r}; expected one of {list(JUDGES)} or a reward model's directory")


def load_judge(name: str, *, seed: int = 0, device: str = "cpu") -> Any:
    """A judge of :data:`JUDGES` by name (``random`` seeded by ``seed``), or a reward model's
    directory (an SPM directory scores step-aware, a CLIPModel directory clean); a reward model
    loads as a step-aware preference model of its variant (``clean`` scores every image as at t = 0)."""
    from ..preference import StepAwarePreferenceModel

    reference, variant = judge_reference(name)
    if name == "ideal-aesthetic":
        return AestheticOracleJudge()
    if name == "ideal-blend":
        return BlendOracleJudge()
    if name == "random":
        return RandomJudge(seed)
    return StepAwarePreferenceModel.from_pretrained(reference, None, variant=variant, device=device)
