"""Training a step-aware preference model on noised preference pairs (``spo train-spm``).

For each pair: VAE-encode both images; draw t ~ U{0..T-1} and ONE noise tensor; noise both
latents with it; predict with the UNet under classifier-free guidance; take the DDIM x0
estimate; decode; score both images with the SPM at t; cross-entropy against the labels (tie
corrected, weighted by 1 / examples sharing the prompt, normalised over the batch of every
process). Validation: pair accuracy at fixed t (at t = 0 on the clean images). The defaults are
the authors' release's recipe (``step_aware_preference_model/``; docs/release-parity.md):
AdamW with weight decay 0.3, DeepSpeed's warm-up-then-linear-decay schedule, 16 pairs per
process in bf16, clipping at 1.0.

With ``preference.variant=clean`` the same trainer fits a clean-image reward model instead
(PickScore's recipe: the plain CLIP scores the pair's images as they are, no noising, no
diffusion model loaded) and saves it as a CLIPModel directory (``RUN_DIR/reward``) from which an
SPM is then built, as the paper builds its SPM from PickScore.

With ``preference.kind=latent`` it trains LPO's latent reward model (LRM,
:mod:`spo.preference.latent`; the LRM release's recipe, ``lrm/lrm_15/trainer``): every weight the
LRM's score reaches (its UNet's down and mid blocks with the time and conditioning embeddings, the
text encoder(s), the visual and text projections and the logit scale; the VAE stays frozen) on
the pairs' VAE latents noised at t, each image with its own noise (``spm.pair_noise=auto``), t
drawn from the sampling schedule's DDIM timesteps up to ``spm.max_timestep``
(``spm.timesteps=auto``), scored by the LRM on the noisy latents at t: no x0 estimate, no decode.
The loss, optimiser and schedule are the SPM's. The trained LRM is saved to ``RUN_DIR/lrm``.
``spm.pseudo_preference`` keeps the training rows the release's pseudo-preference rule
(``spm.filter_strategy``) accepts, whatever the judge.

Every draw of step s comes from generators seeded by (seed, purpose, s, rank), and the row order
from seeded epoch permutations, so ``--resume`` continues exactly. The start (accelerator, run
directory, config.yaml, resume checks, AdamW, metrics, trackers) is the SPO trainer's
(:mod:`spo.training.setup`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..backbones import Backbone, BackboneLoadError, Conditioning, load_backbone
from ..config import SPOConfig, config_to_dict
from ..data.pickapic import (
    PreferenceDataError,
    caption_weights,
    load_pair,
    load_preference_split,
    pseudo_preference_filter,
)
from ..errors import SPOError
from ..preference.clip_scorer import CLIPScorer
from ..preference.latent import load_latent_reward_model
from ..preference.loss import preference_pair_loss, release_accuracy
from ..preference.spm import load_preference_model
from ..weights import check_reference
from .checkpoint import save_checkpoint
from .engines import (DEEPSPEED, FSDP, accumulation_boundary, base_optimizer, engine_of, full_state, gathers,
                      hold_scalars, prepare_for_fsdp, sharded, trainable_parameters)
from .distributed import write_everywhere
from .model_card import write_card_everywhere
from .seeding import derive_seed, generator
from .checkpoint import CheckpointError
from .setup import Run, RunKind, changed_keys, start_run


class SPMTrainingError(SPOError, RuntimeError):
    """SPM training cannot go on; nothing was lost."""


@dataclass
class SPMTrainResult:
    run_dir: Path
    steps: int
    skipped_rows: int
    validation: dict[int, float]
    spm_path: Path | None
    #: what was trained and saved: ``"spm"``, ``"reward"`` (a clean reward model) or ``"lrm"``
    model: str = "spm"


#: what SPM runs' start differs in (spo.training.setup)
SPM_RUN = RunKind(name="spm", checkpoint_prefix="step", error=SPMTrainingError, mixed_precision="spm.mixed_precision",
                  batch_size="spm.batch_size", max_grad_norm="spm.max_grad_norm")


def warmup_decay_factor(step: int, warmup_steps: int, total_steps: int, warmup_type: str = "log") -> float:
    """The learning-rate factor of optimiser step ``step`` (0-based) under DeepSpeed's
    ``WarmupDecayLR`` as the release's SPM trainer drives it (DeepSpeed 0.12.3,
    ``runtime/lr_schedules.py``; accelerate's ``DummyScheduler`` with ``warmup_min_lr`` 0).

    DeepSpeed sets the rate only in ``scheduler.step()``, which its engine calls after each
    optimiser step, so step 0 runs at the optimiser's own (peak) rate; step s >= 1 runs at
    gamma(s - 1) with gamma(i) = log(i + 1) / log(W) (``warmup_type="log"``, DeepSpeed's default)
    or i / W for i < W = max(2, warmup_steps), then (total - i) / (total - W), never below 0.
    """
    if step <= 0:
        return 1.0
    i, w = step - 1, max(2, warmup_steps)
    if i < w:
        return math.log(i + 1) / math.log(w) if warmup_type == "log" else i / w
    return max(0.0, (total_steps - i) / max(1.0, total_steps - w))


@torch.no_grad()
def noised_x0_images(
    backbone: Backbone,
    images: torch.Tensor,
    cond: Conditioning,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    guidance_scale: float,
    generator_: torch.Generator | None = None,
) -> torch.Tensor:
    """Images (N, 2, 3, H, W) of N pairs -> the decoded DDIM x0 estimates after noising both
    images of pair i at ``timesteps[i]`` with the SAME ``noise[i]`` (``noise`` (N, C, h, w)), or
    each image with its own (``noise`` (N, 2, C, h, w)); returns (N, 2, 3, H, W).
    Decoded as ``spo train`` decodes what it scores (``preference.decoder`` when set)."""
    n = images.shape[0]
    latents = backbone.encode_images(images.flatten(0, 1), generator=generator_)  # (2N, C, h, w)
    t = timesteps.repeat_interleave(2).to(latents.device)
    eps = pair_noise_rows(noise).to(latents)
    schedule = backbone.schedule(1)
    # noising (DDPM's, or the flow's (1 - s) x0 + s eps) and the x0 estimate in fp32: alpha-bar
    # rounded to fp16 is ~7% off in sqrt(1 - abar) at small t
    x_t = schedule.add_noise(latents, eps, t.cpu())
    out = backbone.predict(x_t.to(latents.dtype), t, cond.repeat_interleave(2), guidance_scale)
    x0 = schedule.predict_x0(out, t.cpu(), x_t)
    return backbone.decode_for_scoring(x0.to(latents.dtype)).view(n, 2, *images.shape[2:])


def pair_noise_rows(noise: torch.Tensor) -> torch.Tensor:
    """The noise of each image, pair by pair (2N, C, h, w): ``noise`` (N, 2, C, h, w) holds one
    per image (``spm.pair_noise=independent``), (N, C, h, w) one per pair (``shared``)."""
    return noise.flatten(0, 1) if noise.dim() == 5 else noise.repeat_interleave(2, dim=0)


#: config keys an interrupted SPM run may change when resumed
SPM_RESUMABLE_CHANGES = ("spm.steps", "train.num_processes", "logging.")


class SPMTrainer:
    """Trains the SPM (or the LRM) of ``config.preference`` on ``config.spm.data`` into ``run_dir``."""

    def __init__(
        self,
        config: SPOConfig,
        run_dir: str | Path,
        *,
        resume: bool = False,
        accelerator: Any = None,
        progress: bool = True,
    ) -> None:
        cfg = config.spm
        if not cfg.data:
            raise PreferenceDataError("spm.data: give a Pick-a-Pic-format dataset (save_to_disk directory or parquet)")
        self.latent = config.preference.kind == "latent"  # LPO's latent reward model
        # a clean-image reward model (PickScore-style); preference.variant does not apply to an LRM
        self.clean = config.preference.variant == "clean" and not self.latent
        if config.preference.decoder is not None and not self.clean:  # fail before anything is written
            check_reference(config.preference.decoder, "preference.decoder", "directory", BackboneLoadError)
        # the pseudo-preference file is read (columns, values) before anything is written
        self.pseudo_keep = (pseudo_preference_filter(cfg.pseudo_preference, cfg.filter_strategy)
                            if cfg.pseudo_preference else None)
        self.config, self.run_dir, self.progress = config, Path(run_dir), progress
        with start_run(config, self.run_dir, SPM_RUN, resume=resume, accelerator=accelerator,
                       check_resume=self._check_resume) as run:
            self.accelerator, self.resume_from = run.accelerator, run.resume_from
            self._set_up(run)

    def _check_resume(self, saved: SPOConfig, saved_path: Path) -> None:
        """``--resume`` continues an SPM run only with the configuration it was started with
        (``spm.steps`` may grow under a constant learning rate: another schedule would reshape)."""
        changed = changed_keys(config_to_dict(saved), config_to_dict(self.config))
        if "spm.steps" in changed and self.config.spm.lr_schedule != "constant":
            raise CheckpointError(
                f"--resume with spm.steps changed would reshape the {self.config.spm.lr_schedule} learning-rate "
                "schedule; keep spm.steps, or use spm.lr_schedule=constant")
        changed = [k for k in changed if not k.startswith(SPM_RESUMABLE_CHANGES)]
        if changed:
            raise CheckpointError(f"--resume with a different configuration: {', '.join(changed)} differ from "
                                  f"{saved_path}; only spm.steps, logging.* and the process count may change")

    def _set_up(self, run: Run) -> None:
        """Everything after the run directory: data, models, optimiser, resume state."""
        acc, config = self.accelerator, run.resolved  # the loaders get the toy: references resolved
        cfg = config.spm
        self.config, self.resolved = run.config, config  # as written (config.yaml), and resolved

        with acc.main_process_first():  # one process prepares the datasets cache, then the others read it
            self.train_data = load_preference_split(cfg.data, cfg.train_split)
            self.train_rows, self.val_rows, self.val_data = self._splits()
        self.weights = caption_weights(self.train_data)
        if self.pseudo_keep is not None:  # training rows only, before the epoch permutations
            self.train_rows = self._pseudo_filtered(self.train_rows)
        torch.manual_seed(derive_seed(config.seed, "spm-init"))
        self.backbone: Backbone | None = None
        if self.clean:  # scored as they are: no diffusion model, one "timestep"
            self.num_train_timesteps, self.validation_timesteps = 1, [0]
        else:
            self.backbone = load_backbone(dataclasses.replace(config.model, device=str(acc.device)), config.sampling.negative_prompt)
            self.backbone.unet.requires_grad_(False)
            if config.preference.decoder is not None:  # the SPM learns on what `spo train` will score
                self.backbone.load_score_decoder(config.preference.decoder)
            self.backbone.tile_score_decodes(config.sampling.decode_tile)  # likewise
            self.num_train_timesteps = int(self.backbone.schedule(1).num_train_timesteps)
            self.validation_timesteps = list(cfg.validation_timesteps)
            too_late = [t for t in cfg.validation_timesteps if t >= self.num_train_timesteps]
            if too_late:
                raise SPMTrainingError(f"spm.validation_timesteps {too_late} are beyond the schedule (T = {self.num_train_timesteps})")
        self.timestep_mode = cfg.timesteps if cfg.timesteps != "auto" else ("sampling" if self.latent else "uniform")
        self.pair_noise = cfg.pair_noise if cfg.pair_noise != "auto" else ("independent" if self.latent else "shared")
        self.candidate_timesteps = self._candidate_timesteps() if self.backbone is not None else None
        self.guidance = cfg.guidance_scale if cfg.guidance_scale is not None else config.sampling.guidance_scale
        # trainable weights in fp32 whatever preference.dtype says (that is the scoring precision);
        # spm.mixed_precision autocasts the forward. The release trains from PickScore with its
        # identity init (train_spm.py: init_adaln_paras), not from a released SPM; the LRM release
        # from the diffusion model (and CLIP ViT-L/14's text projection), not from a released LRM.
        if self.latent:
            self.spm = load_latent_reward_model(config, acc.device, with_checkpoint=cfg.from_checkpoint,
                                                dtype=torch.float32)
            self.spm.requires_grad_(True)
            self._freeze_unreached()
        else:
            self.spm = load_preference_model(config, acc.device, with_checkpoint=cfg.from_checkpoint, dtype=torch.float32)
            self.spm.model.requires_grad_(True)
        if self.clean:  # the time modules are unused: frozen (DDP wants every trainable weight used)
            for module in self.spm.time_modules():
                module.requires_grad_(False)
        self.resolution = self.spm.size if self.clean else self.backbone.resolution
        self.relabeler = (
            CLIPScorer.from_pretrained(cfg.relabel, config.preference.processor, device=acc.device, what="spm.relabel")
            if cfg.relabel else None
        )
        # the release: DeepSpeed's AdamW (torch_adam) over every SPM weight, one parameter group
        if engine_of(acc) == FSDP:
            prepare_for_fsdp(acc, self.spm)
        elif engine_of(acc) == DEEPSPEED:
            hold_scalars(self.spm)
        self.policy, self.optimizer = run.optimizer(self.spm, [p for p in self.spm.parameters() if p.requires_grad], cfg)
        # read after prepare: FSDP2 replaces every parameter object (spo.training.engines)
        self.trainable = trainable_parameters(self.spm)
        self.params = list(self.trainable.values())
        if cfg.lr_schedule == "warmup_decay":
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                base_optimizer(self.optimizer),
                lambda s: warmup_decay_factor(s, cfg.warmup_steps, cfg.steps, cfg.warmup_type))
        else:
            from diffusers.optimization import get_scheduler

            self.lr_scheduler = get_scheduler("constant", base_optimizer(self.optimizer))
        #: under FSDP every forward is a collective: validation scores without the text cache
        #: (ranks with different prompts would run the text tower different numbers of times)
        self.uncached = sharded(acc)
        self.metrics = run.metrics
        self.step, self.skipped_rows = 0, 0
        self.validation: dict[int, float] = {}
        self.validated_at: int | None = None  # the step of the last validation
        state = run.load_checkpoint(trainable=self.trainable, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
                                    model=self.spm)
        if state is not None:  # (the process count was checked against config.yaml by start_run)
            saved_rows = state.get("train_rows")
            if saved_rows is not None and int(saved_rows) != len(self.train_rows):
                raise SPMTrainingError(
                    f"the checkpoint was trained on {int(saved_rows)} training rows, this run has {len(self.train_rows)} "
                    "(spm.data, spm.pseudo_preference or spm.filter_strategy changed?); --resume needs the same rows")
            self.step, self.skipped_rows = int(state["steps_done"]), int(state.get("skipped_rows", 0))
            self.metrics.truncate_after(self.step, key="step")
        run.start_trackers()

    # ------------------------------------------------------------------ set-up helpers
    def _splits(self) -> tuple[list[int], list[int], Any]:
        cfg = self.config.spm
        rows = list(range(len(self.train_data)))
        if cfg.validation_split is not None:
            try:
                val = load_preference_split(self.resolved.spm.data, cfg.validation_split)  # type: ignore[arg-type]
            except PreferenceDataError as err:
                raise PreferenceDataError(f"{err} (set spm.validation_split=null to hold out training rows)") from None
            val_rows = list(range(len(val)))
            if "has_label" in val.column_names:  # the release's keep_only_with_label_in_non_train
                val_rows = [r for r, labelled in zip(val_rows, val["has_label"]) if labelled]
            return rows, val_rows, val
        perm = torch.randperm(len(rows), generator=generator(self.config.seed, "holdout")).tolist()
        n_val = max(1, int(len(rows) * cfg.validation_fraction))
        if n_val >= len(rows):
            raise PreferenceDataError(f"{cfg.data}: {len(rows)} rows are too few to hold out a validation set")
        return sorted(perm[n_val:]), sorted(perm[:n_val]), self.train_data

    def _pseudo_filtered(self, rows: list[int]) -> list[int]:
        """The training rows ``spm.pseudo_preference`` keeps (the release's ``filter_strategy``)."""
        cfg, keep = self.config.spm, self.pseudo_keep
        assert keep is not None
        if len(keep) != len(self.train_data):
            raise PreferenceDataError(
                f"spm.pseudo_preference: {cfg.pseudo_preference} has {len(keep)} rows, the training split "
                f"{cfg.train_split!r} of {cfg.data} has {len(self.train_data)}: the file must be aligned row by row with it")
        kept = [r for r in rows if keep[r]]
        if not kept:
            raise PreferenceDataError(f"spm.pseudo_preference: filter_strategy {cfg.filter_strategy} keeps none of "
                                      f"the {len(rows)} training rows of {cfg.data}")
        return kept

    def _candidate_timesteps(self) -> torch.Tensor | None:
        """``spm.timesteps=sampling``: the sampling schedule's timesteps up to ``spm.max_timestep``,
        ascending (the LRM release: 1, 51, ..., 951); ``None`` for ``uniform``."""
        cfg = self.config.spm
        if self.timestep_mode != "sampling":
            return None
        assert self.backbone is not None
        steps = self.backbone.schedule(self.config.sampling.num_inference_steps).timesteps
        kept = steps[steps <= cfg.max_timestep] if cfg.max_timestep is not None else steps
        if kept.numel() == 0:
            raise SPMTrainingError(f"spm.max_timestep={cfg.max_timestep} keeps none of the "
                                   f"{self.config.sampling.num_inference_steps} sampling timesteps {steps.tolist()}")
        return kept.sort().values

    def _training_timesteps(self, n: int, gen: torch.Generator) -> torch.Tensor:
        if self.clean:
            return torch.randint(0, 1, (n,), generator=gen)
        assert self.backbone is not None
        if self.candidate_timesteps is None:  # uniform over 0 .. T - 1 (the SPM release)
            return self.backbone.schedule(1).training_timesteps(n, gen)
        index = torch.randint(0, len(self.candidate_timesteps), (n,), generator=gen)
        return self.candidate_timesteps[index]

    def _freeze_unreached(self) -> None:
        """Freeze the LRM's weights that its score never reaches (the UNet's up blocks and output
        layers; SDXL: the first text encoder's last layer and final norm, as its penultimate hidden
        states condition the UNet): one backward pass on a blank latent finds them. They would get
        no gradient anyway; DDP wants every trainable weight used, and AdamW keeps no state for
        them. The release trains every weight, these with zero gradients only."""
        assert self.backbone is not None
        lrm = self.spm
        blank = torch.zeros(1, *self.backbone.latent_shape, device=lrm.device)
        t = torch.zeros(1, dtype=torch.long, device=lrm.device)
        lrm.zero_grad(set_to_none=True)
        lrm.score(blank, [""], t).sum().backward()
        for p in lrm.parameters():
            if p.grad is None:
                p.requires_grad_(False)
        lrm.zero_grad(set_to_none=True)

    def _row_at(self, position: int) -> int:
        """Training row at a position of the infinite sequence of seeded epoch permutations."""
        n = len(self.train_rows)
        epoch, offset = divmod(position, n)
        if getattr(self, "_perm_epoch", None) != epoch:
            self._perm = torch.randperm(n, generator=generator(self.config.seed, "spm-epoch", epoch)).tolist()
            self._perm_epoch = epoch
        return self.train_rows[self._perm[offset]]

    # ------------------------------------------------------------------ scoring pairs
    def _noise(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """One noise tensor per pair (N, C, h, w), or per image (N, 2, C, h, w) with
        ``spm.pair_noise=independent``."""
        if self.backbone is None:
            return torch.zeros(n, 1)
        per = (2,) if self.pair_noise == "independent" else ()
        return torch.randn(n, *per, *self.backbone.latent_shape, generator=gen)

    @torch.no_grad()
    def _encode_pairs(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Images (N, 2, 3, H, W) -> their VAE latents (2N, C, h, w), pair by pair (the posterior sampled)."""
        assert self.backbone is not None
        return self.backbone.encode_images(images.flatten(0, 1).to(self.accelerator.device), generator=gen)

    def _score_latent_pairs(self, captions: list[str], latents: torch.Tensor, timesteps: torch.Tensor,
                            noise: torch.Tensor, grad: bool, clean: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The LRM's scores of both images of each pair (``latents`` (2N, C, h, w)) noised at its
        t (``clean``: the latents themselves), scored at t: no x0 estimate, no decode."""
        assert self.backbone is not None
        ts = timesteps.repeat_interleave(2)
        if clean:
            x_t = latents.float()
        else:  # in fp32, as the SPM path noises
            x_t = self.backbone.schedule(1).add_noise(latents, pair_noise_rows(noise).to(latents.device), ts.cpu())
        prompts = [c for c in captions for _ in range(2)]
        ts = ts.to(x_t.device)
        with torch.set_grad_enabled(grad), self.accelerator.autocast():
            scores = self.policy(x_t, prompts, ts, grad=True) if grad or self.uncached else self.spm(x_t, prompts, ts)
        scores = scores.float().view(-1, 2)
        return scores[:, 0], scores[:, 1]

    def _score_pairs(self, captions: list[str], images: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor,
                     gen: torch.Generator, grad: bool, clean: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of both images of each pair at its t: on the decoded x0 estimates after
        noising, or (``clean``, or a clean reward model) on the images themselves."""
        if self.latent:
            return self._score_latent_pairs(captions, self._encode_pairs(images, gen), timesteps, noise, grad, clean)
        if self.backbone is None or clean:  # the images themselves (the release's validation at t = 0)
            x0_images = images.to(self.accelerator.device)
        else:
            cond = self.backbone.encode_prompts(captions, with_negative=self.guidance != 1.0)
            x0_images = noised_x0_images(self.backbone, images.to(self.accelerator.device), cond, timesteps, noise,
                                         self.guidance, gen)
        # the release's training and validation path: clamp, resize, clamp, normalise (spm_task.py)
        flat = x0_images.flatten(0, 1).clamp(-1, 1)
        prompts = [c for c in captions for _ in range(2)]
        ts = timesteps.repeat_interleave(2).to(flat.device)
        with torch.set_grad_enabled(grad), self.accelerator.autocast():
            # training goes through the (DDP-wrapped) policy so gradients are synchronised
            scores = self.policy(flat, prompts, ts, grad=True) if grad or self.uncached else self.spm(flat, prompts, ts)
        scores = scores.view(-1, 2)
        return scores[:, 0], scores[:, 1]

    def _relabel(self, images: torch.Tensor, captions: list[str], labels: torch.Tensor) -> torch.Tensor:
        if self.relabeler is None:
            return labels
        flat = images.flatten(0, 1).to(self.accelerator.device)
        s = self.relabeler(flat, [c for c in captions for _ in range(2)], torch.zeros(flat.shape[0]))
        p = torch.softmax(s.view(-1, 2), dim=-1).cpu()
        gap = (p[:, 0] - p[:, 1]).abs()
        winner_0 = (p[:, 0] > p[:, 1]).float()
        hard = torch.stack([winner_0, 1 - winner_0], dim=-1)
        # the release (update_as_pickscore_label): a winner only where the gap EXCEEDS the threshold
        return torch.where((gap <= self.config.spm.relabel_threshold)[:, None], torch.full_like(hard, 0.5), hard)

    # ------------------------------------------------------------------ training
    def _micro_batch(self, step: int, micro: int) -> tuple[list[dict[str, Any]], list[float], int]:
        acc, cfg = self.accelerator, self.config.spm
        per_step = cfg.batch_size * acc.num_processes * cfg.gradient_accumulation_steps
        start = step * per_step + (micro * acc.num_processes + acc.process_index) * cfg.batch_size
        pairs, weights, bad = [], [], 0
        for position in range(start, start + cfg.batch_size):
            row = self._row_at(position)
            pair = load_pair(self.train_data, row, self.resolution)
            if pair is None:
                bad += 1
                continue
            pairs.append(pair)
            weights.append(self.weights[row])
        return pairs, weights, bad

    def train_step(self) -> dict[str, float]:
        acc, cfg = self.accelerator, self.config.spm
        self.policy.train()
        losses, bad_total, used = [], 0, 0
        for micro in range(cfg.gradient_accumulation_steps):
            pairs, weights, bad = self._micro_batch(self.step, micro)
            bad_total += bad
            gen = generator(self.config.seed, "spm-step", self.step, micro, acc.process_index)
            last = micro == cfg.gradient_accumulation_steps - 1
            # under FSDP every micro-batch reduce-scatters: no_sync would hold whole gradients (and
            # under DeepSpeed accumulation_boundary below says which backward ends the step)
            plain = last or sharded(acc) or engine_of(acc) == DEEPSPEED
            sync = acc.no_sync(self.policy) if not plain else contextlib.nullcontext()
            # the release's criterion normalises the example weights over the batch gathered from
            # every process (all_gather with gradients): its gradient is that of the loss
            # sum_all(w ce) / sum_all(w); DDP averages over processes, so each contributes
            # num_processes x its share
            weight_sum = acc.reduce(torch.tensor([float(sum(weights))], device=acc.device, dtype=torch.float64),
                                    reduction="sum")
            with sync:
                if pairs:
                    images = torch.stack([p["images"] for p in pairs])
                    captions = [p["caption"] for p in pairs]
                    labels = self._relabel(images, captions, torch.tensor([p["labels"] for p in pairs]))
                    t = self._training_timesteps(len(pairs), gen)
                    noise = self._noise(len(pairs), gen)
                    s0, s1 = self._score_pairs(captions, images, t, noise, gen, grad=True)
                    share = preference_pair_loss(s0, s1, labels.to(s0.device), torch.tensor(weights, device=s0.device),
                                                 weight_sum=float(weight_sum))
                    loss = share * acc.num_processes
                    losses.append(float(share.detach()))
                    used += len(pairs)
                else:  # every row of this micro-batch was bad: a zero-weight pass through the DDP
                    # wrapper keeps this process's gradient all-reduce in step with the others
                    loss = self._blank_forward().sum() * 0.0
                if not torch.isfinite(loss.detach()).all():
                    bad_flag = torch.ones(1, device=acc.device)
                else:
                    bad_flag = torch.zeros(1, device=acc.device)
                if float(acc.reduce(bad_flag, reduction="sum")) > 0:
                    raise SPMTrainingError(
                        f"non-finite SPM loss at step {self.step + 1}; the last checkpoint is intact: lower spm.lr, then --resume"
                    )
                with accumulation_boundary(acc, last):
                    acc.backward(loss / cfg.gradient_accumulation_steps)
        if cfg.max_grad_norm is not None:
            acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
        lr = self.lr_scheduler.get_last_lr()[0]  # the rate this step runs at
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        self.step += 1
        # each process's share of each micro-batch's loss; their sum is the loss of the whole batch
        stats = torch.tensor([sum(losses), bad_total, used], device=acc.device, dtype=torch.float64)
        total = acc.reduce(stats, reduction="sum").tolist()
        if total[2] == 0:
            raise PreferenceDataError(f"{cfg.data}: no usable pair in step {self.step} ({int(total[1])} bad rows)")
        self.skipped_rows += int(total[1])
        entry = {"type": "step", "step": self.step, "loss": total[0] / cfg.gradient_accumulation_steps,
                 "pairs": int(total[2]), "skipped_rows": self.skipped_rows, "lr": lr,
                 "num_processes": acc.num_processes}
        self.metrics.write(entry, self.step, "spm")
        return entry

    def _blank_forward(self) -> torch.Tensor:
        """One forward of the policy on a blank input (in step with the other processes'
        collectives: DDP's all-reduce, FSDP's all-gathers)."""
        acc = self.accelerator
        blank = (torch.zeros(1, *self.backbone.latent_shape, device=acc.device) if self.latent
                 else torch.zeros(1, 3, self.resolution, self.resolution, device=acc.device))
        return self.policy(blank, [""], torch.zeros(1, device=acc.device), grad=True)

    @torch.no_grad()
    def validate(self) -> dict[int, float]:
        """Pair accuracy at each validation timestep, all processes together, as the release
        counts it (``SPMTask.run_inference``): labels relabelled as in training when
        ``spm.relabel`` is set, ties per ``spm.validation_ties``, and at t = 0 the clean images
        scored themselves (``spm.clean_validation_at_zero``)."""
        acc, cfg = self.accelerator, self.config.spm
        ties = cfg.validation_ties == "half" or (cfg.validation_ties == "auto" and not cfg.relabel)
        self.spm.eval()
        self.spm.clear_cache()  # the text tower has been trained since the cache was filled
        rows = self.val_rows[: cfg.validation_pairs] if cfg.validation_pairs else self.val_rows
        mine = rows[acc.process_index :: acc.num_processes]
        result: dict[int, float] = {}
        counts = torch.zeros(len(self.validation_timesteps), 3, dtype=torch.float64, device=acc.device)
        t_dtype = torch.long if self.clean else self.backbone.schedule(1).timesteps.dtype
        # under FSDP every process runs as many forwards as the busiest one (a blank one when it has
        # no pair left): its share of the rows rounded up, in batches
        batches = -(-len(mine) // cfg.batch_size)
        if sharded(acc):
            batches = -(-(-(-len(rows) // acc.num_processes)) // cfg.batch_size)
        for start in range(0, batches * cfg.batch_size, cfg.batch_size):  # each batch loaded and relabelled once
            pairs = [load_pair(self.val_data, r, self.resolution) for r in mine[start : start + cfg.batch_size]]
            keep = [p for p in pairs if p is not None]
            counts[:, 2] += len(pairs) - len(keep)
            if not keep:
                if sharded(acc):
                    for _ in self.validation_timesteps:
                        self._blank_forward()
                continue
            images = torch.stack([p["images"] for p in keep])
            captions = [p["caption"] for p in keep]
            labels = self._relabel(images, captions, torch.tensor([p["labels"] for p in keep]))
            latents = (self._encode_pairs(images, generator(self.config.seed, "spm-val-latents", start, acc.process_index))
                       if self.latent else None)  # the LRM's pairs: encoded once, noised at each t
            for j, t_value in enumerate(self.validation_timesteps):
                gen = generator(self.config.seed, "spm-val", t_value, start, acc.process_index)
                t = torch.full((len(keep),), t_value, dtype=t_dtype)
                noise = self._noise(len(keep), gen)
                clean = t_value == 0 and cfg.clean_validation_at_zero
                if latents is not None:
                    s0, s1 = self._score_latent_pairs(captions, latents, t, noise, grad=False, clean=clean)
                else:
                    s0, s1 = self._score_pairs(captions, images, t, noise, gen, grad=False, clean=clean)
                correct, counted = release_accuracy(s0.cpu(), s1.cpu(), labels, ties=ties)
                counts[j, 0] += correct
                counts[j, 1] += counted
        counts = acc.reduce(counts, reduction="sum").cpu()
        for j, t_value in enumerate(self.validation_timesteps):
            result[t_value] = float(counts[j, 0] / counts[j, 1]) if counts[j, 1] > 0 else float("nan")
        if int(counts[:, 1].sum()) == 0:
            raise PreferenceDataError(f"{cfg.data}: the validation split has no usable non-tied pair")
        entry = {"type": "validation", "step": self.step, "pairs": int(counts[0, 1]), "bad_rows": int(counts[0, 2]),
                 **{f"accuracy_t{t}": v for t, v in result.items()}}
        self.metrics.write(entry, self.step, "spm_val")
        self.validation, self.validated_at = result, self.step
        return result

    def checkpoint(self) -> Path:
        return save_checkpoint(
            self.accelerator, self.run_dir, self.step, trainable=self.trainable, optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler, keep=self.config.logging.keep_checkpoints, kind="step", model=self.spm,
            state={"skipped_rows": self.skipped_rows, "seed": self.config.seed,
                   "num_processes": self.accelerator.num_processes, "train_rows": len(self.train_rows)},
        )

    def train(self, stop_after: int | None = None) -> SPMTrainResult:
        acc, cfg = self.accelerator, self.config.spm
        end = cfg.steps if stop_after is None else min(stop_after, cfg.steps)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="SPM steps", unit="step",
                   disable=not (self.progress and acc.is_main_process))
        start = time.perf_counter()
        try:  # the bar ends its line even when a round fails, so the error starts a line of its own
            if self.step == 0 and cfg.validate_on_start and end > 0 and self.validated_at != 0:
                self.validate()  # the release's eval_on_start (unless the caller has just validated)
            while self.step < end:
                entry = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{entry['loss']:.4f}", skipped=self.skipped_rows)
                if self.step % cfg.validate_every == 0 and self.step != cfg.steps:
                    self.validate()
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.checkpoint()
        finally:
            bar.close()
        spm_path = None
        model = "reward" if self.clean else "lrm" if self.latent else "spm"
        if self.step == cfg.steps:
            self.validate()
            noun = {"reward": "reward model", "lrm": "latent reward model", "spm": "SPM"}[model]
            # the weights whole on the main process, gathered by every process (FSDP's shards)
            state = full_state(acc, self.spm, [n for n, _ in self.spm.named_parameters()]) if gathers(acc) else None
            if state is not None:
                persistent = set(self.spm.state_dict())  # buffers are not sharded; saved ones only
                state.update({n: b for n, b in self.spm.named_buffers() if n in persistent})
            spm_path = write_everywhere(
                acc, f"writing the trained {noun} to {self.run_dir}",
                lambda: (self.spm.save_clip(self.run_dir / model, state) if self.clean
                         else self.spm.save(self.run_dir / model, state)))
            write_card_everywhere(acc, self.run_dir, self.run_dir / model, self.config)
        if acc.trackers:
            acc.end_training()
        self.seconds = time.perf_counter() - start
        return SPMTrainResult(self.run_dir, self.step, self.skipped_rows, dict(self.validation), spm_path, model)
