"""A CLIP preference scorer: score = exp(logit_scale) * cos(image embedding, text embedding).

With a PickScore checkpoint this is PickScore; the step-aware preference model extends it with
a time-conditioned vision tower. Any CLIPModel directory or hub id loads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import ModelLoadError
from ..weights import resolve_reference
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess, spm_preprocess

Preprocessing = Literal["release", "processor"]
PREPROCESSING: tuple[str, ...] = ("release", "processor")

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


def load_clip_parts(pretrained: str, processor: str | None = None, *, what: str = "preference.pretrained",
                    processor_what: str = "preference.processor") -> tuple[Any, Any, dict[str, Any]]:
    """(CLIPModel, tokenizer, image settings) from a CLIPModel directory, hub id or folder of a hub
    repo (``owner/name/FOLDER``; :func:`spo.weights.resolve_reference`).

    The tokenizer and image settings come from ``pretrained`` when it holds them, else from
    ``processor`` (PickScore ships none: the release takes laion's CLIP-ViT-H-14 processor).
    """
    from transformers import AutoTokenizer, CLIPModel

    pretrained = resolve_reference(pretrained, what, "directory")
    processor = resolve_reference(processor, processor_what, "directory") if processor else processor
    try:
        model = CLIPModel.from_pretrained(pretrained)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{what}: could not load a CLIPModel from {pretrained!r}: {err}") from err
    local = Path(pretrained).expanduser()
    has_tokenizer = local.is_dir() and any((local / f).exists() for f in _TOKENIZER_FILES)
    source = pretrained if has_tokenizer or processor is None else processor
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"{processor_what}: could not load a CLIP tokenizer from {source!r}: {err}"
        ) from err
    settings: dict[str, Any] = {
        "size": int(model.config.vision_config.image_size),
        "mean": OPENAI_CLIP_MEAN,
        "std": OPENAI_CLIP_STD,
    }
    local_dir = Path(source).expanduser()
    try:
        if local_dir.is_dir():  # read the file directly: the processor class itself wants torchvision
            image_config = json.loads((local_dir / "preprocessor_config.json").read_text())
        else:  # a hub id: let transformers fetch and parse it
            from transformers import CLIPImageProcessor

            image_config = CLIPImageProcessor.from_pretrained(source).to_dict()
        crop = image_config["crop_size"]
        settings["size"] = int(crop["height"] if isinstance(crop, dict) else crop)
        settings["mean"], settings["std"] = tuple(image_config["image_mean"]), tuple(image_config["image_std"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no preprocessor_config.json: CLIP defaults at the model's image size
    return model, tokenizer, settings


def normalized(emb: Tensor) -> Tensor:
    """Unit-length rows, computed in fp32 whatever the tower's dtype: a 16-bit norm overflows
    past 65504, and the cosine keeps fp32's precision."""
    emb = emb.float()
    return emb / emb.norm(dim=-1, keepdim=True)


class CLIPScorer(nn.Module):
    """Scores (images, prompts, timesteps) -> exp(logit_scale) * cosine; ignores the timesteps.

    Text embeddings are cached per prompt until :meth:`clear_cache` (the trainer clears it each
    round), so the k candidates of a pool cost one text encoding.

    ``preprocessing``: ``"processor"`` (the default here) clamps to [-1, 1] and then does what
    CLIP's image processor does to a PIL image (:func:`~spo.preference.preprocess.clip_preprocess`,
    antialiased): PickScore as an evaluation metric or a relabeller. ``"release"`` is the authors'
    SPM path (:func:`~spo.preference.preprocess.spm_preprocess`: no antialiasing, resize THEN
    clamp), the default of :class:`~spo.preference.spm.StepAwarePreferenceModel`. Either way the
    scorer accepts unclamped decoded images (``takes_unclamped_images``).
    """

    #: the pool sampler may hand this scorer decoded images before any clamp (the release scores
    #: the unclamped decoded x0-hat and clamps after the resize)
    takes_unclamped_images: bool = True
    #: the image path used when the constructor is given none
    default_preprocessing: Preprocessing = "processor"

    def __init__(
        self, model: Any, tokenizer: Any, *, size: int, mean: Sequence[float], std: Sequence[float],
        preprocessing: Preprocessing | None = None,
    ) -> None:
        super().__init__()
        preprocessing = preprocessing or self.default_preprocessing
        if preprocessing not in PREPROCESSING:
            raise ValueError(f"unknown CLIP preprocessing {preprocessing!r}; expected one of {PREPROCESSING}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.preprocessing: Preprocessing = preprocessing
        self._text_cache: dict[str, Tensor] = {}

    @classmethod
    def from_pretrained(
        cls, pretrained: str, processor: str | None = None, *, device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32, preprocessing: Preprocessing | None = None,
        what: str = "preference.pretrained",
    ) -> "CLIPScorer":
        """``what``: the option ``pretrained`` came from (it leads the error messages)."""
        model, tokenizer, settings = load_clip_parts(pretrained, processor, what=what)
        scorer = cls(model, tokenizer, preprocessing=preprocessing, **settings)
        return scorer.to(device=device or "cpu", dtype=dtype)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def clear_cache(self) -> None:
        self._text_cache.clear()

    def _encode_text(self, prompts: Sequence[str]) -> Tensor:
        max_length = self.tokenizer.model_max_length
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True,
            max_length=max_length if max_length < 10_000 else 77, return_tensors="pt",
        ).to(self.device)
        emb = self.model.get_text_features(**tokens)
        return normalized(getattr(emb, "pooler_output", emb))

    def text_embeddings(self, prompts: Sequence[str], cache: bool = True) -> Tensor:
        """Normalised text embeddings, one row per prompt. With ``cache`` (sampling) each distinct
        prompt is encoded once until :meth:`clear_cache`, without gradients; without it
        (training) the text tower runs with gradients."""
        if not cache:
            return self._encode_text(prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            with torch.no_grad():
                for p, e in zip(missing, self._encode_text(missing)):
                    self._text_cache[p] = e
        return torch.stack([self._text_cache[p] for p in prompts])

    def preprocess(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] (unclamped allowed) -> CLIP pixel values, by ``self.preprocessing``."""
        images = images.to(self.device)
        if self.preprocessing == "release":
            return spm_preprocess(images, self.size, self.mean, self.std)
        return clip_preprocess(images.clamp(-1, 1), self.size, self.mean, self.std)

    def image_embeddings(self, images: Tensor, timesteps: Tensor | None = None) -> Tensor:
        pixels = self.preprocess(images)
        emb = self.model.get_image_features(pixel_values=pixels.to(self.model.dtype))
        return normalized(getattr(emb, "pooler_output", emb))

    def score(self, images: Tensor, prompts: Sequence[str], timesteps: Tensor | None = None, *, cache: bool = False) -> Tensor:
        """exp(logit_scale) * cos(image, text) with gradients (for training)."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        img = self.image_embeddings(images, timesteps)
        txt = self.text_embeddings(prompts, cache=cache)
        return self._logit_scale().exp() * (img * txt).sum(dim=-1)

    def _logit_scale(self) -> Tensor:
        """CLIP's logit scale in fp32. Cast to 16 bits it rounds (bfloat16: exp(ln 100) gives
        98.9, 1.1% off every score), so scoring without gradients uses the fp32 value it had
        before the cast, while the model still holds that cast value (training uses the held one)."""
        held = self.model.logit_scale
        exact = getattr(self, "_exact_logit_scale", None)
        if (exact is not None and held.dtype != torch.float32 and not torch.is_grad_enabled()
                and exact[1].shape == held.shape and torch.equal(held.detach(), exact[1].to(held.device))):
            return exact[0].to(held.device)
        return held.float()

    def to(self, *args: Any, **kwargs: Any) -> "CLIPScorer":  # type: ignore[override]
        """``nn.Module.to``, remembering the fp32 logit scale when it casts the model below fp32."""
        before = self.model.logit_scale.detach()
        moved = super().to(*args, **kwargs)
        after = moved.model.logit_scale.detach()
        if before.dtype == torch.float32 and after.dtype != torch.float32:
            moved._exact_logit_scale = (before.to(after.device).clone(), after.clone())
        return moved

    def forward(
        self, images: Tensor, prompts: Sequence[str], timesteps: Tensor | None = None, *, grad: bool = False
    ) -> Tensor:
        """The sampler's scorer interface: scores without gradients, text embeddings cached.
        ``grad=True`` (training, e.g. through a DDP wrapper) is :meth:`score` with gradients."""
        if grad:
            return self.score(images, prompts, timesteps, cache=False)
        with torch.no_grad():
            return self.score(images, prompts, timesteps, cache=True)
