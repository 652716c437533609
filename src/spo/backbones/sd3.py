"""Stable Diffusion 3 / 3.5 backbone: an MMDiT transformer trained with rectified flow.

SPO needs a stochastic transition with a log-probability; a flow model's sampler has none. Its
schedule is therefore the flow SDE of :class:`~spo.diffusion.FlowSDESchedule` (Flow-GRPO's step,
noise level ``sampling.eta``), picked from the pipeline's ``FlowMatchEulerDiscreteScheduler``:
nothing in sampling, objectives or training knows the model is a flow model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import Backbone, Conditioning
from .tiny import build_tiny_sd3


class SD3Backbone(Backbone):
    """SD3 through diffusers' ``StableDiffusion3Pipeline``: text conditioning is the pipeline's own
    ``encode_prompt`` (CLIP-L and CLIP-G penultimate states and pooled embeddings, and T5 when the
    pipeline has it; without T5, diffusers' zeros in its place), the negative prompt "" unless one
    is given, CFG in one batched transformer call, LoRA on the transformer (``to_q``, ``to_k``,
    ``to_v``, ``to_out.0`` of its joint attention by default), saved with ``transformer.`` keys
    for ``StableDiffusion3Pipeline.load_lora_weights``.
    """

    kind = "sd3"
    build_tiny = staticmethod(build_tiny_sd3)
    pipeline_class = "StableDiffusion3Pipeline"
    lora_prefix = "transformer"
    #: T5 tokens (diffusers' default); the CLIP tokens come first, 77 of them
    max_sequence_length: int = 256

    def _denoiser(self, pipeline: Any) -> torch.nn.Module:
        return pipeline.transformer

    @torch.no_grad()
    def _encode_prompts(self, prompts: Sequence[str], *, with_negative: bool = True) -> Conditioning:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        embeds, negative, pooled, negative_pooled = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=with_negative,
            negative_prompt=[self.negative_prompt or ""] * len(prompts) if with_negative else None,
            max_sequence_length=self.max_sequence_length,
        )
        return Conditioning(
            prompt_embeds=embeds.to(self.dtype),
            negative_prompt_embeds=negative.to(self.dtype) if with_negative else None,
            pooled=pooled.to(self.dtype),
            negative_pooled=negative_pooled.to(self.dtype) if with_negative else None,
        )

    def _added_cond_kwargs(self, cond: Conditioning, negative: bool) -> dict[str, torch.Tensor]:
        return {"pooled_projections": cond.negative_pooled if negative else cond.pooled}

    def _forward(self, net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor,
                 added: dict[str, torch.Tensor] | None) -> torch.Tensor:
        assert added is not None
        return net(hidden_states=x, timestep=t, encoder_hidden_states=hidden,
                   pooled_projections=added["pooled_projections"], return_dict=False)[0]

    def _unet_dtype(self, unet: torch.nn.Module) -> torch.dtype:
        module = getattr(unet, "module", unet)  # through a DDP wrapper
        return module.pos_embed.proj.weight.dtype


BACKBONE = SD3Backbone
