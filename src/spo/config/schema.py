"""Typed configuration schema for SPO post-training.

Every section of the configuration is a plain dataclass whose defaults are the
values of the SD-1.5 release of *Step-by-step Preference Optimization* (SPO),
unless a field's documentation says otherwise.  The classes hold data (and, for
the method's section, its range checks): layering and overrides live in
:mod:`spo.config.loading`, type checking in :mod:`spo.config.types` (pydantic on
the field annotations declared here, so the annotations are part of the
contract: ``X | None``, ``Literal[...]``, ``int``, ``float``, ``bool``, ``str``,
``list[str]`` and ``tuple[float, float]`` are understood).  The ``objective``
section is the settings class of the method ``objective.name`` names, declared
in that method's module (:class:`ObjectiveConfig`).

Vocabulary (from the paper):

* *candidate pool* -- at a sampling step ``t`` the shared noisy latent ``x_t``
  is branched into ``k`` candidates ``x_{t-1}`` sampled from the current policy;
* *step-aware preference model* (SPM) -- a scorer that ranks the noisy
  candidates directly, conditioned on the timestep;
* *win / lose sample* -- the best and worst candidate of a pool, whose
  log-probability ratios against the frozen reference model enter the
  DPO-style SPO objective with temperature ``beta``;
* *resampling* -- the candidate from which the trajectory continues to the next
  step (``random``, ``win`` or ``lose``);
* *MSPO* -- the multi-step variant that scores a pool after ``j`` inner steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..registry import METHODS

__all__ = [
    "Backbone",
    "DType",
    "ModelConfig",
    "DataConfig",
    "SamplingConfig",
    "PoolsConfig",
    "PreferenceConfig",
    "ObjectiveConfig",
    "OptimizerConfig",
    "LoRAConfig",
    "TrainConfig",
    "LoggingConfig",
    "EvalConfig",
    "SPOConfig",
]

Backbone = str
"""A diffusion backbone's registered name (:data:`spo.registry.BACKBONES`: ``sd15``, ``sdxl``,
``sd3``, ``toy``, or a plugin's)."""

DType = Literal["float32", "float16", "bfloat16"]
"""Names of the torch dtypes a frozen network may be stored in."""


def _default_lora_targets() -> list[str]:
    return ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class ModelConfig:
    """The diffusion backbone being post-trained.

    Attributes:
        backbone: Which architecture ``pretrained`` is (``"sd15"``, ``"sdxl"``, ``"sd3"``, ``"toy"``,
            or a plugin's: :data:`spo.registry.BACKBONES`).
        pretrained: Local diffusers pipeline directory or Hugging Face hub id.
        revision: Hub revision (branch, tag or commit) of ``pretrained``.
        variant: Weight-file variant of ``pretrained`` (e.g. ``"fp16"``).
        vae: Optional replacement VAE (directory or hub id), e.g. the fp16-safe
            ``"madebyollin/sdxl-vae-fp16-fix"`` used by the SDXL preset.
        dtype: Dtype in which the frozen weights (VAE, text encoders, the base
            UNet under LoRA, the reference UNet) are held.
        device: Torch device string; ``None`` picks ``cuda`` when available,
            else ``cpu``.
        resolution: Side length in pixels of generated images; ``None`` (the
            default) is the pipeline's native size, UNet ``sample_size`` x the
            VAE scale factor (512 for SD-1.5, 1024 for SDXL), as diffusers
            pipelines do; a value must be a multiple of 8 (the VAE factor).
        finetune: ``"lora"`` trains low-rank adapters on the UNet attention
            projections (the reference model is the UNet with adapters
            disabled); ``"full"`` fine-tunes every UNet weight against a
            frozen reference copy.
        gradient_checkpointing: Recompute UNet activations in the backward
            pass to save memory.
        channels_last: Hold the UNet (and the VAE decoder) in the channels-last
            memory format during training (faster convolutions on most
            hardware; on 2 CPU cores the toy UNet samples 11% faster, trains 8%
            slower, and a round takes 5% less time: benchmarks/toy_round.py).
            Numerically equivalent up to float rounding.
        compile: ``torch.compile`` the UNet's and the VAE decoder's forward
            (``nn.Module.compile``, in place: LoRA saving is unchanged). The
            first round pays the compilation; its effect on round time has not
            been measured on a GPU here (``benchmarks/fullsize.py --variants
            compile`` measures it).
        offload_text_encoders: Keep the text encoders in host memory, moved to
            the device only to encode a prompt list the cache has not seen (the
            same embeddings: the same device computes them). Frees SDXL's
            ~1.6 GB (fp16) of text encoders on the GPU for one copy each way
            per encode; not measured on a GPU here.
    """

    backbone: Backbone = "sd15"
    pretrained: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    revision: str | None = None
    variant: str | None = None
    vae: str | None = None
    dtype: DType = "float32"
    device: str | None = None
    resolution: int | None = None
    finetune: Literal["lora", "full"] = "lora"
    gradient_checkpointing: bool = False
    channels_last: bool = False
    compile: bool = False
    offload_text_encoders: bool = False


@dataclass
class DataConfig:
    """Training prompts (online methods) and preference pairs (Diffusion-DPO).

    Attributes:
        prompts: Path of the training prompt file: either plain text with one
            prompt per line, or a JSON list of strings.  ``None`` leaves the
            choice to the caller (e.g. a built-in prompt set).
        preference_data: Pick-a-Pic-format preference pairs (a ``save_to_disk``
            directory or parquet files: caption, jpg_0, jpg_1, label_0,
            label_1) that ``objective.name=diffusion_dpo`` trains on; the
            reader of ``spo train-spm``.
        preference_split: Which split of ``preference_data``.
        keep_ties: Keep pairs labelled 0.5/0.5 (``jpg_0`` then counts as the
            winner, as the diffusers example does); Diffusion-DPO's own code
            drops them (the default).
        empty_caption_probability: Chance that a pair's caption is replaced by
            the empty prompt (Diffusion-DPO's ``proportion_empty_prompts``,
            0.2 by default).
    """

    prompts: str | None = None
    preference_data: str | None = None
    preference_split: str = "train"
    keep_ties: bool = False
    empty_caption_probability: float = 0.2


@dataclass
class SamplingConfig:
    """The DDIM sampler that generates the training trajectories.

    Attributes:
        num_inference_steps: Number of DDIM denoising steps per trajectory.
        eta: DDIM stochasticity; ``1.0`` makes every step a Gaussian policy
            with non-zero variance, which the SPO log-probabilities require.
        guidance_scale: Classifier-free guidance weight (``1.0`` disables
            guidance).
        negative_prompt: Unconditional prompt for CFG.  ``None`` keeps the
            pipeline's default: the empty string for SD-1.5, zero embeddings
            for SDXL when its ``force_zeros_for_empty_prompt`` is set.
        num_train_timesteps: Length of the diffusion schedule the backbone was
            trained with; used to validate ``pools.kappa`` before any model is
            loaded.
        decode_batch_size: Decode at most this many candidates' x0-hat at
            once before scoring them (``None``: a whole step's candidates in
            one batch). 8 by default (1 in the SDXL preset): at full SD-1.5
            size in fp16 on an H200 it cut the sampling peak from 39.4 to
            11.4 GiB for about 2% more round time (``benchmarks/fullsize.py``,
            docs/benchmarks.md). Results do not depend on it.
        batch_size: Run the denoiser on at most this many images at once while
            sampling, without gradients (a step's pool of prompts x k candidates,
            each two rows under CFG; ``None``: all at once). Lowers the sampling
            peak of the UNet's activations; the training passes are set by
            ``train.batch_size``. A smaller batch may round differently on some
            kernels (tests/test_sampling_batch_size.py says what it changes here).
        decode_tile: Decode each x0-hat for scoring in tiles of this many pixels a
            side instead of whole (diffusers' VAE tiling: tiles overlapping by a
            quarter, blended), which lowers the decode's memory for large images
            (SDXL's 1024 px). **Changes the scores**: the preference model sees the
            blended image. Only the decodes for scoring (the pools' candidates,
            DDPO's final-image rewards, and ``spo train-spm``'s x0 estimates, so an
            SPM learns on what it will score); the final images, previews and
            ``spo eval`` decode whole. ``None``: whole. Must be a multiple of 4 x
            the VAE's factor (32 px for SD-1.5, SDXL, SD3) and smaller than the
            image; not with ``preference.decoder``, nor with a latent reward model.
    """

    num_inference_steps: int = 20
    eta: float = 1.0
    guidance_scale: float = 5.0
    negative_prompt: str | None = None
    num_train_timesteps: int = 1000
    decode_batch_size: int | None = 8
    batch_size: int | None = None
    decode_tile: int | None = None


@dataclass
class PoolsConfig:
    """Candidate pools: where the trajectory branches and how pairs are made.

    Attributes:
        k: Number of candidates ``x_{t-1}`` sampled from the shared ``x_t`` in
            each pool (4 for SD-1.5, 2 for SDXL).
        divert_start_step: Index of the first sampling step that draws a pool;
            the earlier steps are plain DDIM.  The release uses 4 of 20 steps,
            i.e. 16 pools, at ``t = 751, 701, ..., 1`` on SD-1.5's schedule.
        kappa: The paper's ``kappa``: when set, pools are drawn at every step
            whose timestep satisfies ``t <= kappa``, overriding
            ``divert_start_step``.  Not the same as the release: ``kappa=750``
            starts at t = 701 (15 pools, one fewer); ``kappa=751`` is the
            release's 16.
        threshold: Tie threshold.  A pool is used for training only if,
            after a softmax over the pair's two raw scores, the win's
            probability minus the lose's exceeds this value (0.3 for SD-1.5,
            0.4 for SDXL).
        inner_steps: MSPO ``j``: number of denoising steps from ``x_t`` before
            the candidates are scored, counting the branching step itself as in
            the CVPR paper.  ``1`` is plain SPO; the SDXL release uses 4 (its
            ``num_inner_step=3`` plus the branching step); the arXiv version's
            count of 3 is reached by setting 3.
        resampler: Which candidate the trajectory continues from:
            ``"random"`` (the paper's choice), the ``"win"`` or the ``"lose"``
            sample.
        pair: How the training pair is chosen within a pool: the best and the
            worst candidate (``"best_worst"``) or two random distinct ones
            ordered by score (``"random"``).
        fold_last_step: Never open a pool at the last sampling step: when a
            segment would start there, that step joins the segment before it
            (its candidates each take it on their own before being scored).
            The release's SDXL pipeline does this (``multi_sample_pipeline_sdxl``
            branches only where ``i != len(timesteps) - 1``): with MSPO j = 3 the
            last segment has 4 steps; with j = 1 the last two steps form one
            segment. Its SD-1.5 pipeline pools every step (``false``).
        threshold_schedule: How the tie threshold depends on the pool's timestep t (LPO's
            ``dynamic_threshold``, ``lpo/preference_models/compare_funcs.py``): ``"constant"``
            (``threshold`` at every t, SPO's rule); ``"sigma"``: from ``threshold_min`` at the
            smallest sampling timestep to ``threshold_max`` at the largest, linear in the
            stochastic step's standard deviation sigma_t (eta = 1) of the backbone's own
            schedule (LPO's presets: 0.35 to 0.5 for SD-1.5, 0.45 to 0.6 for SDXL);
            ``"variance"``: linear in sigma_t squared; ``"linear"``: linear in t. The release
            tabulates sigma_t for SD's 20-step schedule; computed here it equals that table to
            its 4 decimals. ``threshold`` is then unused.
        threshold_min: The threshold at the smallest sampling timestep (a non-constant schedule).
        threshold_max: The threshold at the largest sampling timestep (a non-constant schedule).
    """

    k: int = 4
    divert_start_step: int = 4
    kappa: int | None = None
    threshold: float = 0.3
    inner_steps: int = 1
    resampler: Literal["random", "win", "lose"] = "random"
    pair: Literal["best_worst", "random"] = "best_worst"
    fold_last_step: bool = False
    threshold_schedule: Literal["constant", "sigma", "variance", "linear"] = "constant"
    threshold_min: float | None = None
    threshold_max: float | None = None


@dataclass
class PreferenceConfig:
    """The step-aware preference model (SPM) that ranks noisy candidates.

    Attributes:
        pretrained: CLIPModel directory or hub id the SPM is built on
            (PickScore).
        processor: CLIP processor / tokenizer directory or hub id, used when
            ``pretrained`` ships none (``null``: ``pretrained`` must hold them).
        checkpoint: A released SPM state dict loaded over ``pretrained``: a
            local file or a hub file reference ``REPO_ID/FILE`` (the presets:
            ``SPO-Diffusion-Models/Step-Aware_Preference_Models/`` +
            ``sd-v1-5_step-aware_preference_model.bin`` or
            ``sdxl_step-aware_preference_model.bin``, as the release's configs).
            ``null``: the time modules come from ``pretrained`` when it is an
            SPM directory of ours; a plain CLIP/PickScore has none, and scoring
            with it must be asked for as ``variant: clean``.
        variant: ``"step_aware"`` scores the noisy ``x_{t-1}`` conditioned on
            ``t`` (the SPM: needs trained time modules, from ``checkpoint`` or
            an SPM directory); ``"step_agnostic"`` scores the noisy sample
            without timestep conditioning; ``"clean"`` scores with the plain
            preference model (e.g. PickScore), no time input.
        dtype: Dtype of the (frozen) preference model weights.
        time_frequencies: Number of sinusoidal frequencies of the timestep
            embedding of the step-aware model.
        decoder: Optional local directory or hub id of a diffusers
            ``AutoencoderTiny`` (TAESD: ``madebyollin/taesd`` for SD-1.5,
            ``madebyollin/taesdxl`` for SDXL) used to decode x0-hat for
            scoring only: the candidates of the pools (and D3PO's / DDPO's
            final-image rewards) in ``spo train``, and the x0 estimates of
            ``spo train-spm``, so an SPM is trained on what it will score.
            The final images, evaluation and ``spo sample`` keep the
            pipeline's VAE. ``null``: the pipeline's VAE everywhere. Its
            effect on pair choice with real weights is not measured here.
        kind: ``"clip"`` (the default): a CLIP/PickScore-based model that scores decoded
            images (the SPM, or a clean reward model); ``"latent"``: LPO's latent reward model
            (LRM, :mod:`spo.preference.latent`), the diffusion model's own UNet down and mid
            blocks scoring the noisy latents directly at t (no VAE decode). With ``latent``,
            ``pretrained`` is a diffusion model (diffusers directory, hub id, ``toy:base``) whose
            UNet and text encoder(s) start the LRM, or a saved LRM directory of ours;
            ``checkpoint`` is the authors' released LRM (hub ``casiatao/LRM``: a folder with
            ``unet/``, ``text_encoder/`` and ``state_dict.pt``) loaded over it; ``processor``,
            ``variant``, ``time_frequencies`` and ``decoder`` do not apply.
        guidance_scale: The LRM's own classifier-free guidance on its pooled mid-block
            features (the release: 7.5; ``1.0`` disables it). ``kind=latent`` only.
        multi_scale: The LRM pools every down block's last resnet output and the mid block
            (the release); ``false``: the mid block alone. ``kind=latent`` only.
        multi_scale_cfg: Also apply the guidance to the pooled down-block features (the
            release's configs: ``false``). ``kind=latent`` only.
        text_projection: A CLIPModel (directory, hub id, or weights file) whose
            ``text_projection`` initialises the LRM's when it is built from a diffusion model
            (the release: ``openai/clip-vit-large-patch14``, whose text tower is SD-1.5's text
            encoder); ``null``: a fresh normal(0, 0.02) initialisation. Not used for SDXL, whose
            LRM scores in the second text encoder's own projected space. ``kind=latent`` only.
        offload: Keep the preference model in host memory outside the sampling phase: it is
            moved to the device when a round's sampling starts and back when it ends, so the
            training phase has its memory (PickScore-sized, ViT-H/14: about 3.7 GiB in fp32,
            1.8 GiB in fp16) for two copies a round. The same device scores: the same numbers.
    """

    pretrained: str = "yuvalkirstain/PickScore_v1"
    processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    checkpoint: str | None = None
    variant: Literal["step_aware", "step_agnostic", "clean"] = "step_aware"
    dtype: DType = "float32"
    time_frequencies: int = 256
    decoder: str | None = None
    kind: Literal["clip", "latent"] = "clip"
    guidance_scale: float = 7.5
    multi_scale: bool = True
    multi_scale_cfg: bool = False
    text_projection: str | None = None
    offload: bool = False


@dataclass
class ObjectiveConfig:
    """The training method (``objective.name``) and its own settings.

    This base holds the name only. Each method declares its settings in its own module of
    :mod:`spo.objectives` (``SPOMethodConfig``, ``DiffusionDPOConfig``, ``D3POConfig``,
    ``DDPOConfig``: a subclass of this class, the method's ``config_class``), with its range checks
    beside them in :meth:`problems`; the loader builds the ``objective`` section as the class of
    the method it names (:data:`spo.registry.METHODS`). A layer that names another method starts
    the section again from that method's defaults.

    Attributes:
        name: The method: ``"spo"``, ``"diffusion_dpo"``, ``"d3po"``, ``"ddpo"``, or one registered
            by a plugin.
    """

    name: str = "spo"

    def problems(self, config: "SPOConfig") -> list[str]:
        """Range and consistency problems of the method's settings in ``config`` (one message
        each, naming the dotted key); called once every value is well typed."""
        return []


def default_objective() -> ObjectiveConfig:
    """The default method's settings (SPO's), found through the registry of methods."""
    return METHODS.get(ObjectiveConfig.name).config_class()


@dataclass
class OptimizerConfig:
    """AdamW optimiser and learning-rate schedule.

    Attributes:
        name: ``adamw`` (torch's), or ``adamw8bit``: bitsandbytes' 8-bit AdamW
            (the release's ``use_8bit_adam``), its two moments held in 8 bits
            (2 bytes per trained weight instead of 8; tensors under 4096
            elements keep 32-bit moments, as bitsandbytes does). It changes
            the training numbers; needs ``pip install bitsandbytes``; refused
            under FSDP and DeepSpeed (not tested there).
        lr: Learning rate (6e-5 for SD-1.5, 1e-5 for SDXL).
        betas: AdamW ``(beta1, beta2)``.
        weight_decay: AdamW decoupled weight decay.
        eps: AdamW epsilon.
        max_grad_norm: Gradient-norm clipping threshold; ``None`` disables it
            (the default: what the release ran. Its configs say 1.0, but
            ``train_spo.py`` hands ``clip_grad_norm_`` a ``filter`` iterator
            that AdamW's constructor has already consumed, so no parameter is
            ever clipped. The baselines' presets clip at 1.0, as their code
            does).
        lr_scheduler: Learning-rate schedule.
        warmup_rounds: Rounds of linear warm-up (for schedules that use it).
            The schedule advances once per sampling round, since the number of
            optimiser steps in a round depends on how many pairs were valid.
    """

    name: Literal["adamw", "adamw8bit"] = "adamw"
    lr: float = 6e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    eps: float = 1e-8
    max_grad_norm: float | None = None
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    warmup_rounds: int = 0


@dataclass
class LoRAConfig:
    """Low-rank adapters on the UNet (used when ``model.finetune == "lora"``).

    Attributes:
        rank: Adapter rank ``r`` (4 for SD-1.5, 64 for SDXL).
        alpha: Adapter scaling ``alpha`` (the update is scaled by
            ``alpha / rank``); ``None`` means ``alpha = rank``.
        target_modules: Names of the UNet linear layers that receive adapters.
        init: Initialisation of the adapter weights: ``"gaussian"`` (A drawn
            from a Gaussian, B zero) or ``"default"`` (the library's
            Kaiming-uniform A, B zero).  Both start at the pretrained model.
        dropout: Dropout probability on the adapter input.
    """

    rank: int = 4
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=_default_lora_targets)
    init: Literal["gaussian", "default"] = "gaussian"
    dropout: float = 0.0


@dataclass
class TrainConfig:
    """The outer sample-then-train loop.

    Attributes:
        rounds: Number of sampling rounds; each samples trajectories with
            candidate pools, then trains on the retained pairs.  The SD-1.5
            release is about 10 epochs over 4k prompts at 40 prompts per round.
        prompts_per_round: Prompts sampled per process per round (10 for
            SD-1.5, 2 for SDXL).
        batch_size: Pairs per training micro-batch (10 for SD-1.5, 2 for SDXL).
        gradient_accumulation_steps: Micro-batches accumulated per optimiser
            step (1 for SD-1.5, 2 for SDXL).
        carry_accumulation: Micro-batches left over at a round's end (fewer
            than ``gradient_accumulation_steps``) keep their gradients and
            join the next round's first optimiser step, as the release does
            (accelerate's accumulation counter runs across rounds; each
            micro-batch's mean loss is divided by the accumulation steps).
            ``false``: every round ends with an optimiser step on what it has,
            micro-batches weighted by their pairs.
        epochs_per_round: Passes over a round's pairs before sampling again.
        mixed_precision: Autocast mode of the trainable network (trainable
            LoRA weights stay in fp32).
        allow_tf32: Let float32 matrix products on CUDA use TensorFloat-32
            (``torch.backends.cuda.matmul.allow_tf32``), as the release sets;
            no effect on a CPU.
        num_processes: Recorded by the trainer in the run's ``config.yaml``
            (how many processes the run used); resuming with another count is
            refused, since the run would not continue exactly.  Leave unset.
    """

    rounds: int = 1000
    prompts_per_round: int = 10
    batch_size: int = 10
    gradient_accumulation_steps: int = 1
    carry_accumulation: bool = False
    epochs_per_round: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    allow_tf32: bool = True
    num_processes: int | None = None


@dataclass
class LoggingConfig:
    """Metrics, checkpoints and preview samples.

    Attributes:
        log_every: Write a step line to metrics.jsonl every this many optimiser steps
            (round lines are always written).
        checkpoint_every: Save a checkpoint every this many rounds.
        tensorboard: Write TensorBoard event files.
        wandb: Log to Weights & Biases.
        wandb_project: Weights & Biases project name.
        sample_every: Draw preview images every this many rounds and after the
            last round (``0`` disables previews): the policy draws the preview
            prompts from the same fixed noise each time (seeded by ``seed``) with
            the run's ``sampling.*`` (steps, eta, guidance); the reference model
            draws them once. Captioned grids go to ``RUN_DIR/samples/``
            (``round-NNNNNN.png`` after NNNNNN rounds, ``reference.png``) and to
            TensorBoard / wandb; ``spo report`` shows them as a strip over
            rounds. The weights trained are the same with or without previews.
        sample_prompts: The preview prompts; ``None``: the first
            ``sample_count`` prompts of ``eval.prompts`` when set, else of the
            training prompts.
        sample_count: How many prompts the previews draw when ``sample_prompts``
            is ``None``.
        keep_checkpoints: How many of the latest checkpoints to keep (older
            ones are deleted after a new one is complete).
    """

    log_every: int = 1
    checkpoint_every: int = 10
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "spo"
    sample_every: int = 0
    sample_prompts: list[str] | None = None
    sample_count: int = 4
    keep_checkpoints: int = 2


@dataclass
class EvalConfig:
    """Evaluation of a trained model.

    Attributes:
        prompts: Path of the evaluation prompt file (same formats as
            ``data.prompts``).
        seeds: Number of seeds (images) per evaluation prompt.
        guidance_scale: CFG weight for evaluation; ``None`` uses
            ``sampling.guidance_scale``.
    """

    prompts: str | None = None
    seeds: int = 3
    guidance_scale: float | None = None


def _default_validation_timesteps() -> list[int]:
    return [0, 251, 501, 701, 951]


@dataclass
class SPMTrainConfig:
    """Training a step-aware preference model on noised preference pairs (``spo train-spm``).

    Each pair (caption, jpg_0, jpg_1, label_0, label_1) is encoded with the diffusion model's
    VAE (``model.*``), noised at one t ~ U{0..T-1} with ONE noise tensor for both images, denoised
    to the DDIM x0 estimate under classifier-free guidance, decoded, and scored by the SPM at t.
    The defaults are the release's SD-1.5 recipe (``step_aware_preference_model/``: hydra configs,
    DeepSpeed accelerator, run_commands/train_spm_sd15.sh); docs/release-parity.md lists each.

    Attributes:
        data: Pick-a-Pic-format data: a ``datasets`` directory saved with ``save_to_disk``, or
            parquet file(s) (a file, a directory of them, or a glob). A ``num_example_per_prompt``
            column, where present (Pick-a-Pic v1), gives the example weights 1 / n as in the
            release; without it n counts the rows sharing the caption in the split. A
            ``has_label`` column, where present, keeps validation to labelled rows (the release's
            ``keep_only_with_label_in_non_train``).
        train_split: Split to train on (a saved ``DatasetDict``); ignored for a single split.
        validation_split: Split for validation (Pick-a-Pic: ``validation_unique``); ``null``
            holds out ``validation_fraction`` of the training rows instead.
        validation_fraction: Share of training rows held out when there is no validation split.
        steps: Optimiser steps (the release: 8k for SD-1.5, 7k for SDXL, on 4 GPUs).
        batch_size: Pairs per process per micro-batch (the release: 16 per GPU).
        gradient_accumulation_steps: Micro-batches per optimiser step (the release: 1).
        lr: Peak AdamW learning rate (3e-6 for SD-1.5, 1e-6 for SDXL).
        weight_decay: AdamW decoupled weight decay on every SPM weight (the release: 0.3,
            ``optimizers/dummy_optimizer.py``; not ``optimizer.weight_decay``, which is SPO's).
        betas: AdamW ``(beta1, beta2)`` (the release: torch's defaults).
        eps: AdamW epsilon (the release: torch's default).
        max_grad_norm: Gradient-norm clipping (the release: DeepSpeed's ``gradient_clipping``
            1.0); ``null`` disables it. Not ``optimizer.max_grad_norm``, which is SPO's.
        lr_schedule: ``"warmup_decay"``: DeepSpeed's ``WarmupDecayLR`` as the release drives it
            (warm-up over ``warmup_steps`` from 0, then linear decay to 0 at ``steps``; its first
            optimiser step runs at the full ``lr``, before the schedule first sets the rate:
            :func:`spo.training.spm_trainer.warmup_decay_factor`). ``"constant"``: ``lr`` always.
        warmup_steps: Warm-up steps of ``warmup_decay`` (the release: 500).
        warmup_type: ``"log"`` (DeepSpeed's default, which the release keeps: the rate rises as
            log(i + 1) / log(warmup_steps)) or ``"linear"``.
        guidance_scale: CFG of the x0 estimate; ``null`` = ``sampling.guidance_scale``.
        validation_timesteps: t at which validation pair accuracy is measured.
        validation_pairs: At most this many validation pairs (``null`` = all, as the release).
        validate_every: Steps between validations (also run at the end).
        validate_on_start: Also validate before the first step (the release's ``eval_on_start``).
        clean_validation_at_zero: At t = 0 validation scores the clean images themselves (no
            noising, no UNet, no decoding), as the release's ``run_inference`` does; ``false``
            noises them at t = 0 like any other t.
        validation_ties: How validation accuracy counts tied labels: ``"half"`` counts a tie as
            half right (when the scores differ), the release's formula for human labels;
            ``"skip"`` leaves ties out; ``"auto"`` is the release's choice: ``skip`` with
            ``relabel``, ``half`` without.
        checkpoint_every: Steps between checkpoints (atomic; ``--resume`` continues exactly).
        relabel: Optional reward model (CLIPModel directory or hub id) that relabels each pair on
            its clean images, training and validation pairs alike (the release's SDXL recipe:
            PickScore); ``null`` keeps the human labels.
        relabel_threshold: With ``relabel``: a pair is a tie unless one image's probability
            exceeds the other's by more than this (the release: 0.1).
        mixed_precision: Autocast of the SPM forward (the release: bf16; its DeepSpeed also
            keeps the weights themselves in bf16, ours stay fp32 under autocast).
        timesteps: Which t a training pair is noised at: ``"uniform"`` over 0 .. T - 1 (the SPM
            release), ``"sampling"``: one of the backbone's ``sampling.num_inference_steps``
            DDIM timesteps up to ``max_timestep`` (the LRM release: 1, 51, ..., 951); ``"auto"``:
            ``sampling`` for ``preference.kind=latent``, else ``uniform``.
        max_timestep: With ``timesteps=sampling``, the largest t drawn (the LRM release: 951);
            ``null``: every sampling timestep.
        pair_noise: ``"shared"``: both images of a pair noised with one noise tensor (the SPM
            release); ``"independent"``: each its own (the LRM release draws ``randn_like`` over
            both images); ``"auto"``: ``independent`` for ``preference.kind=latent``, else ``shared``.
        pseudo_preference: A CSV aligned row by row with the training split, with the columns
            ``different_flag``, ``aesthetic_gap``, ``clipscore_gap`` and ``vqascore_gap`` (the LRM
            release's pseudo-preference file of Pick-a-Pic v1, from its README's Google Drive
            link); training keeps the rows ``filter_strategy`` accepts. ``null``: every row.
        filter_strategy: The LRM release's rule (``step_sd_hf_dataset.py``): keep a decided pair
            (``different_flag == 1``) when its CLIP-score and VQA-score gaps are > 0 and its
            aesthetic gap > 0 (1), > -0.5 (2, the release's choice) or > -1 (3); keep a tie
            (``different_flag == 0``) when the aesthetic gap < 0.2, CLIP-score gap < 0.03 and
            VQA-score gap < 0.07.
        from_checkpoint: Start from ``preference.checkpoint`` (e.g. fine-tune a released SPM).
            ``false`` (the release's recipe, ``train_spm.py``): start from
            ``preference.pretrained`` (PickScore) with the time modules at their identity
            initialisation, whatever ``preference.checkpoint`` names (the presets name the
            released SPM there for ``spo train``).
    """

    data: str | None = None
    train_split: str = "train"
    validation_split: str | None = "validation_unique"
    validation_fraction: float = 0.1
    steps: int = 8000
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    lr: float = 3e-6
    weight_decay: float = 0.3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    lr_schedule: Literal["warmup_decay", "constant"] = "warmup_decay"
    warmup_steps: int = 500
    warmup_type: Literal["log", "linear"] = "log"
    guidance_scale: float | None = None
    validation_timesteps: list[int] = field(default_factory=_default_validation_timesteps)
    validation_pairs: int | None = None
    validate_every: int = 1000
    validate_on_start: bool = True
    clean_validation_at_zero: bool = True
    validation_ties: Literal["auto", "half", "skip"] = "auto"
    checkpoint_every: int = 1000
    relabel: str | None = None
    relabel_threshold: float = 0.1
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    from_checkpoint: bool = False
    timesteps: Literal["auto", "uniform", "sampling"] = "auto"
    max_timestep: int | None = None
    pair_noise: Literal["auto", "shared", "independent"] = "auto"
    pseudo_preference: str | None = None
    filter_strategy: Literal[1, 2, 3] = 2


@dataclass
class SPOConfig:
    """Complete configuration of an SPO run.

    Attributes:
        seed: Global random seed (the release's 42).
        model: The diffusion backbone (:class:`ModelConfig`).
        data: Training prompts (:class:`DataConfig`).
        sampling: The DDIM sampler (:class:`SamplingConfig`).
        pools: Candidate pools (:class:`PoolsConfig`).
        preference: The step-aware preference model (:class:`PreferenceConfig`).
        objective: The training method and its settings (:class:`ObjectiveConfig`, as the
            subclass of the method ``objective.name`` names).
        optimizer: AdamW and LR schedule (:class:`OptimizerConfig`).
        lora: Low-rank adapters (:class:`LoRAConfig`).
        train: The sample-then-train loop (:class:`TrainConfig`).
        logging: Metrics and checkpoints (:class:`LoggingConfig`).
        eval: Evaluation (:class:`EvalConfig`).
        spm: Step-aware preference model training (:class:`SPMTrainConfig`).
    """

    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    pools: PoolsConfig = field(default_factory=PoolsConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    objective: ObjectiveConfig = field(default_factory=default_objective)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    spm: SPMTrainConfig = field(default_factory=SPMTrainConfig)
