"""Diffusion backbones behind one interface (encode, predict with CFG, decode, LoRA)."""

from __future__ import annotations

from typing import Any

from .base import (
    Backbone,
    BackboneLoadError,
    Conditioning,
    check_device_request,
    check_model_path,
    resolve_device,
    resolve_dtype,
)
from .lora import DEFAULT_TARGETS, LoRASettings, attach_lora, lora_state_dict
from .sd3 import SD3Backbone
from .sd15 import SD15Backbone
from .sdxl import SDXLBackbone

BACKBONES: dict[str, type[Backbone]] = {"sd15": SD15Backbone, "sdxl": SDXLBackbone, "sd3": SD3Backbone}


def load_backbone(model_config: Any, negative_prompt: str | None = None,
                  components: dict[str, Any] | None = None) -> Backbone:
    """Build the backbone a ``ModelConfig`` names, without setting up fine-tuning; ``components``
    replace the pipeline's own (e.g. ``{"unet": a fine-tuned UNet}``; not for the toy model)."""
    if model_config.backbone == "toy":
        from ..toy.model import ToyBackbone  # the toy world depends on backbones, not the reverse

        return ToyBackbone.from_pretrained(
            model_config.pretrained, dtype=model_config.dtype, device=model_config.device,
            negative_prompt=negative_prompt, resolution=model_config.resolution,
        )
    try:
        cls = BACKBONES[model_config.backbone]
    except KeyError:
        raise ValueError(
            f"model.backbone: unknown backbone {model_config.backbone!r}; expected one of {sorted(BACKBONES)}"
        ) from None
    return cls.from_pretrained(  # type: ignore[attr-defined]
        model_config.pretrained,
        dtype=model_config.dtype,
        device=model_config.device,
        revision=model_config.revision,
        variant=model_config.variant,
        vae=model_config.vae,
        negative_prompt=negative_prompt,
        resolution=model_config.resolution,
        components=components,
    )


__all__ = [
    "BACKBONES",
    "DEFAULT_TARGETS",
    "Backbone",
    "BackboneLoadError",
    "Conditioning",
    "LoRASettings",
    "SD15Backbone",
    "SD3Backbone",
    "SDXLBackbone",
    "attach_lora",
    "check_device_request",
    "check_model_path",
    "load_backbone",
    "lora_state_dict",
    "resolve_device",
    "resolve_dtype",
]
