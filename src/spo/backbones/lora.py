"""LoRA adapters on the UNet through peft, in the diffusers LoRA format."""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import LoRAConfig

DEFAULT_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


def attach_lora(
    unet: torch.nn.Module, settings: LoRAConfig, adapter_name: str = "spo"
) -> list[torch.nn.Parameter]:
    """Inject a LoRA adapter (the ``lora`` section: rank r, scale alpha (None = r), target module
    names, initialisation, dropout) into ``unet``; only its weights are trainable, kept in fp32.

    ``init="gaussian"`` draws A ~ N(0, 1/r) and sets B = 0 (the release's choice), so the adapted
    UNet equals the base UNet at the start; ``"default"`` is peft's Kaiming-uniform A, zero B.
    """
    from peft import LoraConfig

    init: bool | str = True if settings.init == "default" else settings.init
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha if settings.alpha is not None else settings.rank,
        target_modules=list(settings.target_modules),
        init_lora_weights=init,
        lora_dropout=settings.dropout,
    )
    unet.requires_grad_(False)
    try:
        unet.add_adapter(config, adapter_name=adapter_name)  # type: ignore[operator]
    except ValueError as err:
        raise ValueError(
            f"LoRA targets {list(settings.target_modules)} matched no module of this UNet: {err}"
        ) from err
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    if not params:
        raise ValueError(f"LoRA targets {list(settings.target_modules)} matched no module of this UNet")
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_state_dict(unet: torch.nn.Module, adapter_name: str = "spo",
                    state_dict: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Adapter weights with peft keys (``...lora_A.weight``), as ``save_lora_weights(unet_lora_layers=...)``
    takes them and ``load_lora_weights`` reads them back. Not converted to the older
    ``lora.down``/``lora.up`` naming: that conversion renames attention layers only, and a file
    mixing both namings silently loses the attention adapters when targets include convolutions.
    Tensors come back contiguous (a UNet held channels-last has strided conv weights, which
    safetensors refuses). ``state_dict``: the UNet's weights (at least the adapter's) to read them
    from instead of the module (gathered whole from a sharded UNet)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, state_dict=state_dict, adapter_name=adapter_name)
    return {k: v.contiguous() for k, v in state.items()}
