"""Diffusion-DPO (Wallace et al., 2024): DPO on the denoising loss of offline preference pairs.

A pair (caption c, winner x0_w, loser x0_l) from Pick-a-Pic-format data is noised at ONE
timestep t ~ U{0, ..., T - 1} with ONE noise eps shared by both images; with the per-sample
error L(x0) = mean over C, H, W of (eps_theta(x_t, t, c) - eps)^2 (the target is v under
v-prediction) under the policy and L_ref under the frozen reference,

    inside = -beta_dpo / 2 * ((L_w - L_l) - (L_w,ref - L_l,ref)),
    loss = -log sigmoid(inside),

beta_dpo = 5000 for SD-1.5 and SDXL. At initialisation (policy = reference) the loss is log 2;
``implicit_accuracy`` = share of pairs with inside > 0. No sampling: a round reads pairs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backbones import Backbone, Conditioning
from ..config import ObjectiveConfig, SPOConfig
from ..diffusion import Schedule
from ..sampling.records import Records
from .base import Collected, Curve, LossOutput, Method


@dataclass
class DiffusionDPOConfig(ObjectiveConfig):
    """Diffusion-DPO's settings (``objective.name: diffusion_dpo``); its data is ``data.*``.

    Attributes:
        beta: ``beta_dpo`` on the denoising errors (5000 in both of Diffusion-DPO's launchers;
            the presets set it).
    """

    name: str = "diffusion_dpo"
    beta: float = 10.0

    def problems(self, config: SPOConfig) -> list[str]:
        return [] if self.beta > 0 else [f"objective.beta must be > 0, got {self.beta!r}"]


def diffusion_dpo_loss(err_win: Tensor, err_lose: Tensor, err_win_ref: Tensor, err_lose_ref: Tensor, *,
                       beta: float = 5000.0) -> LossOutput:
    """The Diffusion-DPO loss from per-sample denoising errors (policy and reference)."""
    model_diff = err_win - err_lose
    ref_diff = (err_win_ref - err_lose_ref).detach()
    inside = -0.5 * beta * (model_diff - ref_diff)
    loss = -F.logsigmoid(inside).mean()
    with torch.no_grad():
        metrics = {
            "loss": float(loss),
            "implicit_accuracy": float((inside > 0).float().mean()),
            "model_diff": float(model_diff.mean()),
            "ref_diff": float(ref_diff.mean()),
            "err_win": float(err_win.mean()),
        }
    return LossOutput(loss=loss, metrics=metrics)


def denoising_errors(backbone: Backbone, schedule: Schedule, cond: Conditioning, x0: Tensor, timesteps: Tensor,
                     noise: Tensor, *, reference: bool = False) -> Tensor:
    """Per-sample mean squared error of the network's prediction at x_t = ``schedule.add_noise``
    (sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with target eps or v; for a flow model
    (1 - s) x0 + s eps with target v = eps - x0)."""
    x_t = schedule.add_noise(x0, noise, timesteps.cpu())
    out = backbone.predict(x_t.to(x0.dtype), timesteps, cond, 1.0, reference=reference).float()
    target = schedule.training_target(x0, noise, timesteps.cpu())
    return ((out - target) ** 2).mean(dim=tuple(range(1, out.ndim)))


@dataclass
class LatentPairRecords(Records):
    """Preference pairs as latents (winner first), with the pair's timestep and shared noise."""

    cond: Conditioning
    x0_win: Tensor
    x0_lose: Tensor
    timesteps: Tensor
    noise: Tensor


class DiffusionDPOMethod(Method):
    """Offline Diffusion-DPO on ``data.preference_data`` (Pick-a-Pic format, the reader of
    ``spo train-spm``): ``train.prompts_per_round`` pairs per process per round, ties dropped
    unless ``data.keep_ties``, captions blanked with ``data.empty_caption_probability``."""

    name = "diffusion_dpo"
    config_class = DiffusionDPOConfig
    metric_names = ("loss", "implicit_accuracy", "model_diff", "ref_diff", "err_win")
    curves = (
        Curve("accuracy", "Implicit-reward accuracy", "share of pairs", ("implicit_accuracy",), reference=0.5),
        Curve("dpo_diffs", "Denoising-error difference (win - lose)", "difference", ("model_diff", "ref_diff"),
              reference=0.0),
        Curve("err_win", "Denoising error of the preferred image", "MSE", ("err_win",)),
    )
    needs_scorer = False
    needs_prompts = False
    needs_stochastic_steps = False
    progress_metric = "implicit_accuracy"

    def __init__(self, config: SPOConfig, backbone: Backbone, scorer: Any = None) -> None:
        super().__init__(config, backbone, scorer)
        self.data = self._load(config)

    @staticmethod
    def _load(config: SPOConfig) -> Any:
        from ..data.pickapic import PreferenceDataError, load_preference_split

        d = config.data
        if d.preference_data is None:
            raise PreferenceDataError(
                "objective.name=diffusion_dpo trains on preference pairs: set data.preference_data to "
                "Pick-a-Pic-format data (a save_to_disk directory or parquet files)"
            )
        # (a toy: reference was resolved where the config entered: spo.builtin.resolve_references)
        return load_preference_split(d.preference_data, d.preference_split, "data.preference_data")

    @classmethod
    def check_inputs(cls, config: SPOConfig) -> None:
        cls._load(config)

    def items(self, prompts: Sequence[str]) -> Sequence[Any]:
        return range(len(self.data))

    @torch.no_grad()
    def collect(self, items: Sequence[Any], generator: torch.Generator) -> Collected:
        from ..data.pickapic import load_pair

        d, bb = self.config.data, self.backbone
        rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))
        captions, wins, loses = [], [], []
        for row in items:
            pair = load_pair(self.data, int(row), bb.resolution)
            if pair is None:
                continue
            p0, p1 = pair["labels"]
            if p0 == p1 and not d.keep_ties:
                continue
            first = 0 if p0 >= p1 else 1  # a kept tie: jpg_0 wins, as the diffusers example does
            wins.append(pair["images"][first])
            loses.append(pair["images"][1 - first])
            captions.append("" if rng.random() < d.empty_caption_probability else pair["caption"])
        n = len(captions)
        if n == 0:
            empty = bb.initial_latents(1, generator)[:0]
            cond = bb.encode_prompts([""], with_negative=False).index(torch.zeros(0, dtype=torch.long))
            none = torch.zeros(0, dtype=self.schedule().timesteps.dtype, device=bb.device)
            return Collected(LatentPairRecords(cond, empty, empty, none, empty), units=len(items), valid=0)
        images = torch.stack(wins + loses).to(bb.device)
        latents = bb.encode_images(images, generator)
        schedule = self.schedule()
        timesteps = schedule.training_timesteps(n, generator).to(bb.device)
        noise = torch.randn(latents[:n].shape, generator=generator).to(bb.device, latents.dtype)
        records = LatentPairRecords(
            cond=bb.encode_prompts(captions, with_negative=False), x0_win=latents[:n], x0_lose=latents[n:],
            timesteps=timesteps, noise=noise,
        )
        return Collected(records=records, units=len(items), valid=n)

    def loss(self, backbone: Backbone, schedule: Schedule, records: Records) -> LossOutput:
        assert isinstance(records, LatentPairRecords)
        n = len(records)
        cond = Conditioning.cat([records.cond, records.cond])
        x0 = torch.cat([records.x0_win, records.x0_lose])
        t = torch.cat([records.timesteps, records.timesteps])
        noise = torch.cat([records.noise, records.noise])
        with torch.no_grad():
            ref = denoising_errors(backbone, schedule, cond, x0, t, noise, reference=True)
        err = denoising_errors(backbone, schedule, cond, x0, t, noise)
        return diffusion_dpo_loss(err[:n], err[n:], ref[:n], ref[n:], beta=self.config.objective.beta)


METHOD = DiffusionDPOMethod
