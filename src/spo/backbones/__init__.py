"""Diffusion backbones behind one interface (encode, predict with CFG, decode, LoRA).

A backbone is one module of this package named after it whose ``BACKBONE`` is a :class:`Backbone`
subclass with that ``kind``; :data:`spo.registry.BACKBONES` finds it by ``model.backbone``. A
backbone from elsewhere (the toy world's, a user's) registers through the ``spo.backbones``
entry-point group or ``BACKBONES.register``.
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from ..registry import BACKBONES
from .base import (
    Backbone,
    BackboneLoadError,
    Conditioning,
    check_device_request,
    check_model_path,
    resolve_device,
    resolve_dtype,
)
from .lora import DEFAULT_TARGETS, attach_lora, lora_state_dict
from .sd3 import SD3Backbone
from .sd15 import SD15Backbone
from .sdxl import SDXLBackbone


def load_backbone(model_config: ModelConfig, negative_prompt: str | None = None,
                  components: dict[str, Any] | None = None) -> Backbone:
    """Build the backbone a ``ModelConfig`` names (``model.backbone``), without setting up
    fine-tuning; ``components`` replace the pipeline's own (e.g. ``{"unet": a fine-tuned UNet}``)."""
    cls: type[Backbone] = BACKBONES.get(model_config.backbone)
    return cls.from_config(model_config, negative_prompt, components)


__all__ = [
    "BACKBONES",
    "DEFAULT_TARGETS",
    "Backbone",
    "BackboneLoadError",
    "Conditioning",
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
