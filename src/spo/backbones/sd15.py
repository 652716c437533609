"""Stable Diffusion 1.x / 2.x style backbone: one CLIP text encoder, UNet2DConditionModel, VAE."""

from __future__ import annotations

from collections.abc import Sequence
import torch

from .base import Backbone, Conditioning
from .tiny import build_tiny_sd15


class SD15Backbone(Backbone):
    """SD-1.5 style: prompt embeddings = last hidden state of the CLIP text encoder."""

    kind = "sd15"
    build_tiny = staticmethod(build_tiny_sd15)

    pipeline_class = "StableDiffusionPipeline"
    pipeline_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    @torch.no_grad()
    def _encode_prompts(self, prompts: Sequence[str], *, with_negative: bool = True) -> Conditioning:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        text_encoder = self.pipeline.text_encoder
        tokenizer = self.pipeline.tokenizer
        use_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))

        def embed(texts: list[str], max_length: int | None = None) -> torch.Tensor:
            tokens = tokenizer(
                texts,
                padding="max_length",
                max_length=max_length or tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            mask = tokens.attention_mask.to(self.device) if use_mask else None
            return text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0].to(self.dtype)

        embeds = embed(prompts)
        negative = None
        if with_negative:
            negative = embed([self.negative_prompt or ""] * len(prompts), max_length=embeds.shape[1])
        return Conditioning(prompt_embeds=embeds, negative_prompt_embeds=negative)

    def _added_cond_kwargs(self, cond: Conditioning, negative: bool) -> None:
        return None


BACKBONE = SD15Backbone
