"""SDXL backbone: two CLIP text encoders, pooled text embeddings and size/crop micro-conditioning."""

from __future__ import annotations

from collections.abc import Sequence
import torch

from .base import Backbone, Conditioning
from .tiny import build_tiny_sdxl


class SDXLBackbone(Backbone):
    """SDXL: prompt embeddings = penultimate hidden states of both text encoders, concatenated;
    pooled embedding from the second encoder; ``add_time_ids`` = (H, W, 0, 0, H, W).

    With ``negative_prompt=None`` the unconditional branch follows the pipeline's
    ``force_zeros_for_empty_prompt`` (zeros, as SDXL-base ships), otherwise it encodes the text.
    """

    kind = "sdxl"
    build_tiny = staticmethod(build_tiny_sdxl)

    pipeline_class = "StableDiffusionXLPipeline"
    upcast_vae_in_fp16 = True

    def _encode_texts(self, texts: list[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        pipe = self.pipeline
        hidden, pooled = [], None
        for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            ids = self._tokenize(tokenizer, texts, max_length)
            out = encoder(ids, output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        if pooled is None:
            raise ValueError("SDXL needs a text encoder with projection (text_encoder_2) for pooled embeddings")
        return torch.cat(hidden, dim=-1).to(self.dtype), pooled.to(self.dtype)

    def time_ids(self, batch_size: int) -> torch.Tensor:
        """(original size, crop top-left, target size) per row, all at ``resolution``."""
        side = self.resolution
        ids = [side, side, 0, 0, side, side]
        expected = self.unet.add_embedding.linear_1.in_features
        given = self.unet.config.addition_time_embed_dim * len(ids) + self.pipeline.text_encoder_2.config.projection_dim
        if expected != given:
            raise ValueError(f"UNet expects an added embedding of length {expected}, the config gives {given}")
        return torch.tensor([ids] * batch_size, dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def _encode_prompts(self, prompts: Sequence[str], *, with_negative: bool = True) -> Conditioning:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        embeds, pooled = self._encode_texts(prompts)
        time_ids = self.time_ids(len(prompts))
        neg = neg_pooled = None
        if with_negative:
            zeros = self.negative_prompt is None and bool(
                self.pipeline.config.get("force_zeros_for_empty_prompt", False)
            )
            if zeros:
                neg, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
            else:
                neg, neg_pooled = self._encode_texts(
                    [self.negative_prompt or ""] * len(prompts), max_length=embeds.shape[1]
                )
        return Conditioning(
            prompt_embeds=embeds,
            negative_prompt_embeds=neg,
            pooled=pooled,
            negative_pooled=neg_pooled,
            time_ids=time_ids,
            negative_time_ids=time_ids.clone() if with_negative else None,
        )

    def _added_cond_kwargs(self, cond: Conditioning, negative: bool) -> dict[str, torch.Tensor]:
        if negative:
            return {"text_embeds": cond.negative_pooled, "time_ids": cond.negative_time_ids}
        return {"text_embeds": cond.pooled, "time_ids": cond.time_ids}


BACKBONE = SDXLBackbone
