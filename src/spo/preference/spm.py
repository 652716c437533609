"""The step-aware preference model (SPM): a CLIP whose vision tower is conditioned on t.

Paper Sec. 4.2 and supplementary Sec. 2. A sinusoidal embedding of the timestep t (256
frequencies) goes through Linear-SiLU-Linear (``t_embedder``, shared by all blocks) to a vector
c. Each vision transformer block gets ``adaLN_modulation`` = SiLU -> Linear(c) -> six vectors:
(shift, scale, gate) for attention and for the MLP; a LayerNorm output x becomes
x * (1 + scale) + shift and a branch output is multiplied by gate before the residual add. The
pooled output gets one more (shift, scale) after the post-LayerNorm. Identity initialisation
(weights 0, shift/scale biases 0, gate biases 1) makes the SPM equal to the base CLIP for every t.

The modules are attached to the ``CLIPModel`` itself, so the state dict of
:class:`StepAwarePreferenceModel` has exactly the key layout of the authors' released SPMs:
``model.t_embedder.mlp.{0,2}``, ``model.vision_model.encoder.layers.{i}.adaLN_modulation.1``,
``model.vision_model.adaLN_modulation.1`` beside the usual ``model.text_model...`` keys.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import ModelLoadError
from ..weights import parse_reference, read_state_dict, resolve_reference
from .clip_scorer import CLIPScorer, Preprocessing, load_clip_parts, normalized
from .preprocess import save_clip_image_config

if TYPE_CHECKING:
    from ..config import SPOConfig

Variant = Literal["step_aware", "step_agnostic", "clean"]
VARIANTS: tuple[str, ...] = ("step_aware", "step_agnostic", "clean")
SPM_CONFIG = "spm_config.json"
SPM_WEIGHTS = "spm.safetensors"


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding (cos, sin) of timesteps ``t`` (B,) with ``dim`` features (DiT's)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t -> sinusoidal features -> Linear -> SiLU -> Linear (``mlp.0``, ``mlp.2``)."""

    def __init__(self, width: int, frequencies: int = 256) -> None:
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, t: Tensor) -> Tensor:
        emb = timestep_embedding(t, self.frequencies)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def _modulation(width: int, chunks: int) -> nn.Sequential:
    return nn.Sequential(nn.SiLU(), nn.Linear(width, chunks * width))


def add_time_modules(clip: Any, frequencies: int = 256) -> None:
    """Attach the time embedder and the adaLN modulations to a ``CLIPModel`` (in place)."""
    vision = clip.vision_model
    width = clip.config.vision_config.hidden_size
    clip.t_embedder = TimestepEmbedder(width, frequencies)
    for layer in vision.encoder.layers:
        layer.adaLN_modulation = _modulation(width, 6)
    vision.adaLN_modulation = _modulation(width, 2)
    reset_time_modules(clip)


@torch.no_grad()
def reset_time_modules(clip: Any) -> None:
    """Identity initialisation: modulation weights 0, shift/scale biases 0, gate biases 1."""
    vision = clip.vision_model
    width = clip.config.vision_config.hidden_size
    for layer in vision.encoder.layers:
        linear = layer.adaLN_modulation[1]
        linear.weight.zero_()
        linear.bias.zero_()
        linear.bias[2 * width : 3 * width] = 1.0  # gate of the attention branch
        linear.bias[5 * width : 6 * width] = 1.0  # gate of the MLP branch
    vision.adaLN_modulation[1].weight.zero_()
    vision.adaLN_modulation[1].bias.zero_()


class StepAwarePreferenceModel(CLIPScorer):
    """Scores (images in [-1, 1], prompts, timesteps) with a time-conditioned CLIP.

    ``variant``: ``"step_aware"`` (default; conditioned on t), ``"step_agnostic"`` (the same
    architecture fed t = 0 always, i.e. no time input; trained on noised data) or ``"clean"``
    (the base CLIP, no time modules used: the paper's Table 5 rows).

    Images go through the release's SPM path by default (``preprocessing="release"``: bicubic
    resize without antialiasing of the unclamped image, torchvision's centre crop, then the clamp;
    :func:`~spo.preference.preprocess.spm_preprocess`).
    """

    default_preprocessing: Preprocessing = "release"
    #: the blocks FSDP shards one by one (accelerate's TRANSFORMER_BASED_WRAP reads this list): a
    #: block's weights are gathered when its ``forward`` runs, and :meth:`pixel_embeddings` runs
    #: the vision layers' parts itself, so the vision encoder layers stay with the whole model
    _no_split_modules: ClassVar[list[str]] = ["CLIPTextTransformer", "CLIPVisionEmbeddings"]

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        variant: Variant = "step_aware",
        frequencies: int = 256,
        preprocessing: Preprocessing | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown SPM variant {variant!r}; expected one of {VARIANTS}")
        super().__init__(model, tokenizer, size=size, mean=mean, std=std, preprocessing=preprocessing)
        self.variant = variant
        self.frequencies = frequencies
        if not hasattr(model, "t_embedder"):
            add_time_modules(model, frequencies)
        self.model.requires_grad_(False)

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained: str,
        processor: str | None = None,
        *,
        checkpoint: str | None = None,
        variant: Variant = "step_aware",
        frequencies: int = 256,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> "StepAwarePreferenceModel":
        """From a CLIPModel directory or hub id (time modules at identity), from this project's
        saved SPM directory (local, or a hub repo or repo folder holding ``spm_config.json``),
        and/or with the authors' released state dict (``checkpoint``); each reference as
        :func:`spo.weights.resolve_reference` reads it."""
        pretrained = resolve_reference(pretrained, "preference.pretrained", "directory")
        if parse_reference(pretrained).repo_id is not None and _hub_spm(pretrained):  # a saved SPM on the hub
            pretrained = resolve_reference(pretrained, "preference.pretrained", "directory", download=True)
        local = Path(pretrained).expanduser()
        if (local / SPM_CONFIG).exists():
            spm = cls.load(local, variant=None if variant == "step_aware" else variant)
        else:
            model, tokenizer, settings = load_clip_parts(pretrained, processor)
            spm = cls(model, tokenizer, variant=variant, frequencies=frequencies, **settings)
        if checkpoint is not None:
            spm.load_release_checkpoint(checkpoint)
        return spm.to(device=device or "cpu", dtype=dtype)

    def load_release_checkpoint(self, path: str | Path) -> None:
        """Load the authors' released SPM state dict (.bin / .pt via ``torch.load(weights_only=True)``,
        or .safetensors), keys ``model.`` + CLIPModel keys + time modules: a local file or a hub
        file reference ``REPO_ID/FILE`` (the presets name
        ``SPO-Diffusion-Models/Step-Aware_Preference_Models/sd-v1-5_step-aware_preference_model.bin``)."""
        path = Path(resolve_reference(str(path), "preference.checkpoint", "file"))
        state = read_state_dict(path, "preference.checkpoint")  # tensors only, 'state_dict' unwrapped
        # buffers that older transformers saved and newer ones recompute
        state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
        expected = {k for k in self.state_dict() if not k.endswith("position_ids")}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ModelLoadError(
                f"preference.checkpoint: {str(path)!r} does not fit this SPM (base: the CLIP of "
                f"preference.pretrained): {len(missing)} missing keys {missing[:6]}, "
                f"{len(unexpected)} unexpected keys {unexpected[:6]}"
            )
        wrong = [k for k, v in state.items() if v.shape != self.state_dict()[k].shape]
        if wrong:
            raise ModelLoadError(f"preference.checkpoint: shape mismatch for {wrong[:6]}")
        self.load_state_dict(state, strict=False)

    def save(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write this SPM as a directory: CLIP config, tokenizer, ``spm.safetensors`` (release
        key layout) and ``spm_config.json``; ``preference.pretrained=DIR`` loads it.
        ``state_dict``: the weights gathered whole (a sharded SPM holds only its shard)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.config.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        source = self.state_dict() if state_dict is None else state_dict
        state = {k: v.detach().contiguous().cpu() for k, v in source.items() if not k.endswith("position_ids")}
        save_file(state, str(directory / SPM_WEIGHTS))
        meta = {"variant": self.variant, "frequencies": self.frequencies, "size": self.size,
                "mean": list(self.mean), "std": list(self.std)}
        (directory / SPM_CONFIG).write_text(json.dumps(meta, indent=2))
        return directory

    def time_modules(self) -> list[nn.Module]:
        """The modules the SPM adds to CLIP (time embedder, adaLN modulations)."""
        vision = self.model.vision_model
        return [self.model.t_embedder, *(layer.adaLN_modulation for layer in vision.encoder.layers), vision.adaLN_modulation]

    def save_clip(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write the plain CLIP (without the time modules) as a CLIPModel directory with its
        tokenizer and image processor, the layout PickScore ships in: a clean reward model that
        ``preference.pretrained=DIR`` turns into a fresh SPM (time modules at identity).
        ``state_dict``: as for :meth:`save`."""
        directory = Path(directory)
        added = {id(p) for m in self.time_modules() for p in m.parameters()}
        kept = [k for k, v in self.model.named_parameters() if id(v) not in added]
        kept += [k for k, _ in self.model.named_buffers() if not k.endswith("position_ids")]
        source = self.model.state_dict() if state_dict is None else {
            k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
        state = {k: source[k].detach().contiguous().cpu() for k in kept}
        self.model.save_pretrained(directory, state_dict=state)
        self.tokenizer.save_pretrained(directory)
        save_clip_image_config(directory, self.size, self.mean, self.std)
        return directory

    @classmethod
    def load(cls, directory: str | Path, variant: Variant | None = None) -> "StepAwarePreferenceModel":
        from transformers import AutoTokenizer, CLIPConfig, CLIPModel

        directory = Path(directory)
        meta = json.loads((directory / SPM_CONFIG).read_text())
        model = CLIPModel(CLIPConfig.from_pretrained(directory))
        tokenizer = AutoTokenizer.from_pretrained(directory)
        spm = cls(model, tokenizer, size=meta["size"], mean=meta["mean"], std=meta["std"],
                  variant=variant or meta["variant"], frequencies=meta["frequencies"])
        state = load_file(str(directory / SPM_WEIGHTS))
        missing, unexpected = spm.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ModelLoadError(f"{directory}: SPM weights do not fit: missing {missing[:6]}, unexpected {unexpected[:6]}")
        return spm

    # ------------------------------------------------------------------ the time-conditioned vision tower
    def image_embeddings(self, images: Tensor, timesteps: Tensor | None = None) -> Tensor:
        if self.variant == "clean":
            return super().image_embeddings(images, timesteps)
        return self.pixel_embeddings(self.preprocess(images), timesteps)

    def pixel_embeddings(self, pixels: Tensor, timesteps: Tensor | None = None) -> Tensor:
        """Normalised image embeddings of CLIP pixel values (already preprocessed) at ``timesteps``."""
        clip = self.model
        vision = clip.vision_model
        pixels = pixels.to(self.device, clip.dtype)
        batch = pixels.shape[0]
        if self.variant == "step_agnostic" or timesteps is None:
            t = torch.zeros(batch, device=pixels.device)
        else:
            t = torch.as_tensor(timesteps, device=pixels.device).reshape(-1).expand(batch)
        c = clip.t_embedder(t)
        h = vision.pre_layrnorm(vision.embeddings(pixels))
        for layer in vision.encoder.layers:
            shift1, scale1, gate1, shift2, scale2, gate2 = layer.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
            x = layer.layer_norm1(h) * (1 + scale1) + shift1
            h = h + gate1 * layer.self_attn(hidden_states=x)[0]
            x = layer.layer_norm2(h) * (1 + scale2) + shift2
            h = h + gate2 * layer.mlp(x)
        pooled = vision.post_layernorm(h[:, 0])
        shift, scale = vision.adaLN_modulation(c).chunk(2, dim=-1)
        return normalized(clip.visual_projection(pooled * (1 + scale) + shift))


def _hub_spm(repo_id: str) -> bool:
    """Whether the hub repo ``repo_id`` holds a saved SPM (``spm_config.json``); a repo that
    cannot be asked (offline and not cached) is read as a CLIPModel, whose loading says why."""
    try:
        resolve_reference(f"{repo_id}/{SPM_CONFIG}", "preference.pretrained", "file")
    except ModelLoadError:
        return False
    return True


def load_preference_model(config: "SPOConfig", device: torch.device | str | None = None, *,
                          with_checkpoint: bool = True, dtype: torch.dtype | None = None) -> StepAwarePreferenceModel:
    """The SPM the ``preference`` section names (also the sampler's scorer in ``spo train``), in
    ``preference.dtype`` unless ``dtype`` is given; ``with_checkpoint=False`` leaves
    ``preference.checkpoint`` out (SPM training starts from the base at identity, as the release)."""
    from ..backbones import resolve_dtype  # here: the SPM alone does not need diffusers imported

    p = config.preference
    return StepAwarePreferenceModel.from_pretrained(
        p.pretrained, p.processor, checkpoint=p.checkpoint if with_checkpoint else None, variant=p.variant,
        frequencies=p.time_frequencies, device=device, dtype=dtype or resolve_dtype(p.dtype),
    )
