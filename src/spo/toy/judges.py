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
- ``ideal-blend-continuation`` (``-4``): a latent judge (``takes_latents``, as LPO's latent reward
  model): each candidate x_{t-1} is finished M = 1 (4) times by the *current* policy with the
  run's stochastic sampler and scored by the log of the mean noise-free blend of its finished
  images: a judge that knows where each candidate goes under the policy being trained, what an
  ideal step-aware (or latent) reward model could at best know. It samples, so it needs the
  policy: it declares ``needs_backbone`` and SPO binds it (:class:`BlendContinuationJudge`).

A latent reward model's directory (``lrm_config.json``, :mod:`spo.preference.latent`) is a judge
too (how = ``latent``): it scores the candidates' latents at the pool's t, as LPO does.
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
CONTROL_JUDGES = ("ideal-aesthetic", "ideal-blend", "random", "ideal-blend-continuation", "ideal-blend-continuation-4")
#: continuations per candidate of the continuation controls
CONTINUATION_JUDGES = {"ideal-blend-continuation": 1, "ideal-blend-continuation-4": 4}
#: the judges of the toy world's experiments: a control, or (reward model, how it scores)
JUDGES: dict[str, tuple[str, str]] = {
    "ideal-aesthetic": ("ideal-aesthetic", "control"),
    "ideal-blend": ("ideal-blend", "control"),
    "random": ("random", "control"),
    **{name: (name, "control") for name in CONTINUATION_JUDGES},
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


#: the release's SPO tie threshold, which the toy preset's 0.07 carries to the controls' scale
RELEASE_THRESHOLD = 0.3


def control_threshold(release: float) -> float:
    """A release's tie threshold carried to the controls' scale: g -> tanh(atanh(g) * atanh(0.07) /
    atanh(0.3)), the ratio of logit gaps that maps SPO's release 0.3 to the toy controls' 0.07
    (LPO's 0.35 and 0.5 -> 0.083 and 0.124), rounded to 3 decimals."""
    ratio = math.atanh(TOY_THRESHOLD) / math.atanh(RELEASE_THRESHOLD)
    return round(math.tanh(math.atanh(release) * ratio), 3)


def lpo_thresholds(num_inference_steps: int = 20, low: float | None = None, high: float | None = None) -> dict[int, float]:
    """The ``toy-lpo`` preset's tie threshold at each timestep of the toy base model's schedule
    (``pools.threshold_schedule`` sigma, ``threshold_min`` 0.35 to ``threshold_max`` 0.5 unless
    ``low`` / ``high`` are given), keyed by the pool's branching timestep t."""
    import json

    from ..builtin import resolve_weights
    from ..config import load_config
    from ..diffusion.schedule import schedule_from_config
    from ..sampling.pairs import tie_thresholds

    pools = load_config("toy-lpo").pools
    scheduler = json.loads((Path(resolve_weights("toy:base")) / "scheduler" / "scheduler_config.json").read_text())
    schedule = schedule_from_config(scheduler, num_inference_steps)
    thresholds = tie_thresholds(schedule, schedule.timesteps.tolist(), pools.threshold_schedule, pools.threshold,
                                pools.threshold_min if low is None else low, pools.threshold_max if high is None else high)
    return {int(t): float(v) for t, v in thresholds.items()}


def judge_threshold(name: str, judge: Any) -> float | dict[int, float]:
    """The tie threshold SPO uses with judge ``name``: the preset's for the controls and the v1 SPM,
    :func:`tie_threshold` at the reward model's own logit scale for the other reward models, and
    for a latent reward model LPO's own, which depends on t: the ``toy-lpo`` preset's sigma
    schedule (:func:`lpo_thresholds`, by the pool's branching t)."""
    if name in CONTROL_JUDGES or name == "spm-v1":
        return TOY_THRESHOLD
    if judge_reference(name)[1] == "latent":
        return lpo_thresholds()
    return tie_threshold(float(judge.model.logit_scale.exp()))


class AestheticOracleJudge:
    """The ideal aesthetic judge: log aesthetic oracle of each image (timesteps ignored)."""

    def __call__(self, images: Tensor, prompts: Sequence[str], timesteps: Tensor | None = None) -> Tensor:
        d = aesthetic_defects_batch(to_oracle_images(images))
        log_aesthetic = -(d["noise"] / NOISE_SCALE + d["off_line"] / OFF_LINE_SCALE + d["excess"] / EXCESS_SCALE)
        return log_aesthetic.float().to(images.device)


def blend_oracle(images: Tensor, prompts: Sequence[str]) -> Tensor:
    """The noise-free generic blend 0.7 alignment + 0.3 aesthetic of each image (in [-1, 1]) with its prompt."""
    pictures = to_oracle_images(images)
    return ALIGNMENT_WEIGHT * alignment_batch(pictures, list(prompts)) + AESTHETIC_WEIGHT * aesthetic_batch(pictures)


class BlendOracleJudge:
    """The ideal generic judge: log of the noise-free generic blend 0.7 alignment + 0.3 aesthetic
    of each image with its prompt (timesteps ignored): a perfect toy PickScore."""

    def __call__(self, images: Tensor, prompts: Sequence[str], timesteps: Tensor | None = None) -> Tensor:
        return blend_oracle(images, prompts).clamp(min=1e-6).log().float().to(images.device)


class BlendContinuationJudge:
    """The ideal generic judge of where a candidate goes: a latent judge (``takes_latents``) that
    finishes each candidate latent x_{t-1}, given at its pool's branching timestep t (the candidate
    is at the schedule's next timestep), ``continuations`` = M times with the *current* policy
    (LoRA on: ``backbone.predict`` with the run's ``sampling.guidance_scale``, the stochastic DDIM
    step with ``sampling.eta`` on the ``sampling.num_inference_steps`` schedule) and scores it by
    the log of the mean noise-free blend (as :class:`BlendOracleJudge`) of its M finished images.
    At the last step (the candidate already is x_0) it scores the candidate itself.

    It samples, so it needs the policy: ``needs_backbone`` asks SPO to call :meth:`bind` with the
    trained backbone and the run's config before sampling (:class:`spo.objectives.spo.SPOMethod`);
    elsewhere (pool accuracy) :meth:`bind_sampling` binds a backbone and sampler settings directly.

    All candidates x M continue in one batch per step (UNet calls chunked at ``batch_size`` rows),
    under ``no_grad``, with the judge's own generator seeded from (``seed``, the timesteps, a digest
    of the candidates' bytes): the same candidates get the same continuations, so a resumed run
    equals the uninterrupted one, and the trainer's generators are never drawn from.

    Cost: a pool at step index i of N costs N - 1 - i further policy passes on k x M rows (2k x M
    UNet rows with CFG) and k x M oracle calls: the rest of a trajectory per candidate and
    continuation (from t = 751 of the toy's 20 steps, 15 passes). Summed over a rollout's pools,
    per prompt: the toy preset's 16 pooled steps (t <= 751) add 0 + 1 + ... + 15 = 120 passes per
    row, 6 full trajectories per candidate and continuation, 24 M trajectories beside the one SPO
    samples; toy-lpo's 20 pooled steps add 190 passes per row, 9.5 trajectories, 38 M per prompt.
    """

    takes_latents = True
    needs_backbone = True

    def __init__(self, continuations: int = 1, seed: int = 0, batch_size: int = 64) -> None:
        if continuations < 1:
            raise ValueError(f"continuations must be >= 1, got {continuations}")
        self.continuations, self.seed, self.batch_size = continuations, seed, batch_size
        self.backbone: Any = None
        self.num_inference_steps, self.guidance_scale, self.eta = 20, 3.0, 1.0

    def bind(self, backbone: Any, config: Any) -> None:
        """The SPO method's hook (``needs_backbone``): sample with ``backbone`` (the policy) as the run does."""
        s = config.sampling
        self.bind_sampling(backbone, num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale, eta=s.eta)

    def bind_sampling(self, backbone: Any, *, num_inference_steps: int, guidance_scale: float, eta: float) -> None:
        self.backbone, self.num_inference_steps = backbone, num_inference_steps
        self.guidance_scale, self.eta = guidance_scale, eta

    @torch.no_grad()
    def __call__(self, latents: Tensor, prompts: Sequence[str], timesteps: Tensor) -> Tensor:
        if self.backbone is None:
            raise RuntimeError("BlendContinuationJudge samples with the policy: bind(backbone, config) first "
                               "(SPO does it for a scorer with needs_backbone)")
        schedule = self.backbone.schedule(self.num_inference_steps)
        ts = schedule.timesteps.tolist()
        steps = torch.as_tensor(timesteps).reshape(-1).expand(latents.shape[0]).tolist()
        scores = torch.empty(latents.shape[0], dtype=torch.float32)
        for t in dict.fromkeys(steps):  # rows of one timestep together (the sampler gives one t per call)
            rows = [r for r, s in enumerate(steps) if s == t]
            start = int(schedule.step_index(float(t))) + 1  # the candidates are at the next timestep
            scores[rows] = self._score(latents[rows], [prompts[r] for r in rows], ts, start, schedule)
        return scores.to(latents.device)

    def _score(self, x: Tensor, prompts: list[str], ts: list[int], start: int, schedule: Any) -> Tensor:
        bb, m = self.backbone, self.continuations
        if start >= len(ts):  # the candidate is x_0: no continuation
            return blend_oracle(bb.decode(x), prompts).clamp(min=1e-6).log().float().cpu()
        digest = zlib.crc32(x.detach().float().cpu().contiguous().numpy().tobytes())
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "blend-continuation", ts[start - 1], digest))
        cfg = self.guidance_scale
        cond = bb.encode_prompts(prompts, with_negative=cfg > 1.0).repeat_interleave(m)
        x = x.to(bb.device, bb.dtype).repeat_interleave(m, dim=0)
        for t in ts[start:]:
            out = torch.cat([bb.predict(x[s : s + self.batch_size], t, cond.index(slice(s, s + self.batch_size)), cfg)
                             for s in range(0, x.shape[0], self.batch_size)])
            noise = torch.randn(x.shape, generator=generator).to(bb.device, out.dtype) if self.eta > 0 else None
            x = schedule.step(out, t, x, eta=self.eta, noise=noise).prev_sample
        blend = blend_oracle(bb.decode(x), [q for q in prompts for _ in range(m)]).double().cpu()
        return blend.view(-1, m).mean(dim=1).clamp(min=1e-6).log().float()


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
    (an SPM directory scores step-aware, a CLIPModel directory clean, a latent reward model's
    directory, holding ``lrm_config.json``, ``latent``); how = ``control`` for the controls."""
    from ..preference.latent import LRM_CONFIG
    from ..preference.spm import SPM_CONFIG

    if name in JUDGES:
        return JUDGES[name]
    if Path(name).is_dir():
        if (Path(name) / LRM_CONFIG).exists():
            return name, "latent"
        return name, "step_aware" if (Path(name) / SPM_CONFIG).exists() else "clean"
    raise ValueError(f"unknown judge {name!r}; expected one of {list(JUDGES)} or a reward model's directory")


def load_judge(name: str, *, seed: int = 0, device: str = "cpu") -> Any:
    """A judge of :data:`JUDGES` by name (``random`` and the continuation controls seeded by
    ``seed``; a continuation control still needs :meth:`BlendContinuationJudge.bind`), or a reward
    model's directory (an SPM directory scores step-aware, a CLIPModel directory clean, an LRM
    directory loads as :class:`~spo.preference.latent.LatentRewardModel`); a reward model loads as a
    step-aware preference model of its variant (``clean`` scores every image as at t = 0)."""
    from ..preference import StepAwarePreferenceModel

    reference, variant = judge_reference(name)
    if variant == "latent":
        from ..preference.latent import LatentRewardModel

        return LatentRewardModel.from_pretrained(reference, device=device)
    if name in CONTINUATION_JUDGES:
        return BlendContinuationJudge(CONTINUATION_JUDGES[name], seed=seed)
    if name == "ideal-aesthetic":
        return AestheticOracleJudge()
    if name == "ideal-blend":
        return BlendOracleJudge()
    if name == "random":
        return RandomJudge(seed)
    return StepAwarePreferenceModel.from_pretrained(reference, None, variant=variant, device=device)
