"""Tiny random-initialised SD-1.5- and SDXL-shaped pipelines, built offline.

The same diffusers/transformers classes as the real models, a few hundred thousand parameters
each, saved with ``save_pretrained`` so that tests and the demo load them through the real
``from_pretrained`` path. The tokenizer is a byte-level CLIP BPE with no merges: every word is
spelt in byte tokens, so any text tokenizes without a download.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..registry import BACKBONES, RegistryError

MAX_LENGTH = 77


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, (chr(c) for c in chars)))


def build_tokenizer(max_length: int = MAX_LENGTH) -> Any:
    """A CLIPTokenizer over the 256 byte symbols (plus their end-of-word forms)."""
    from transformers import CLIPTokenizer

    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab_file.write_text(json.dumps(vocab))
        merges_file.write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=max_length)
    return tokenizer


def _text_config(tokenizer: Any, hidden: int, projection: int) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=projection,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def _sd15_scheduler(kind: str = "pndm") -> Any:
    """The SD-1.5 noise schedule; SD-1.5 on the hub ships a PNDM config, which DDIM reads."""
    from diffusers import DDIMScheduler, PNDMScheduler

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if kind == "ddim":
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **common)
    scheduler = PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **common)
    scheduler.register_to_config(clip_sample=False)  # as SD-1.5's hub config
    return scheduler


def build_tiny_sd15(seed: int = 0, prediction_type: str = "epsilon") -> Any:
    """A StableDiffusionPipeline with tiny random weights (32x32 images, 16x16x4 latents)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden=32, projection=32))
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    scheduler = _sd15_scheduler()
    scheduler.register_to_config(prediction_type=prediction_type)
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl(seed: int = 0, force_zeros_for_empty_prompt: bool = True) -> Any:
    """A StableDiffusionXLPipeline with tiny random weights (two text encoders, text_time UNet)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    tokenizer_2 = build_tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden=32, projection=32))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, hidden=32, projection=32))
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=64,  # 32 + 32: both encoders' hidden states concatenated
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * time_embed_dim + 32,
        norm_num_groups=16,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False)
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
    )


def build_tiny_sd3(seed: int = 0) -> Any:
    """A StableDiffusion3Pipeline with tiny random weights and no T5 (as diffusers allows): the
    transformer and VAE of diffusers' own SD3 pipeline tests (MMDiT, 1 layer, 32x32 latents of 4
    channels, VAE shift 0.0609 / scale 1.5035), two projected CLIP text encoders (hidden 32,
    pooled 32 + 32 = the transformer's 64), byte-level tokenizers built offline, and SD3's
    ``FlowMatchEulerDiscreteScheduler`` (shift 3.0, SD3-medium's)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=CLIPTextModelWithProjection(_text_config(tokenizer, hidden=32, projection=32)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2, hidden=32, projection=32)),
        tokenizer_2=tokenizer_2, text_encoder_3=None, tokenizer_3=None,
    )


def tiny_kinds() -> list[str]:
    """The registered backbones that can build a tiny pipeline."""
    return [name for name in BACKBONES.names() if BACKBONES.get(name).build_tiny is not None]


def save_tiny_pipeline(
    kind: str, directory: str | Path, seed: int = 0, fit_vae_steps: int = 0, **kwargs: Any
) -> Path:
    """Build a tiny pipeline of the backbone ``kind`` (its ``build_tiny``: ``sd15``, ``sdxl``,
    ``sd3``, or a plugin's) and ``save_pretrained`` it to ``directory`` (``fit_vae_steps`` > 0:
    first teach its VAE to reconstruct, see :func:`fit_tiny_vae`)."""
    builders = tiny_kinds()
    if kind not in builders:
        raise RegistryError(f"unknown tiny pipeline {kind!r}; expected one of {builders}")
    directory = Path(directory)
    pipeline = BACKBONES.get(kind).build_tiny(seed=seed, **kwargs)
    if fit_vae_steps:
        fit_tiny_vae(pipeline.vae, steps=fit_vae_steps, seed=seed)
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory


def build_tiny_clip(seed: int = 0, image_size: int = 32) -> tuple[Any, Any]:
    """(CLIPModel, tokenizer) with tiny random weights: a stand-in for PickScore in tests."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text = _text_config(tokenizer, hidden=32, projection=16)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=8, projection_dim=16,
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    return CLIPModel(config), tokenizer


def save_tiny_clip(directory: str | Path, seed: int = 0) -> Path:
    """Save a tiny CLIPModel and its tokenizer to ``directory`` (loadable as preference.pretrained)."""
    directory = Path(directory)
    model, tokenizer = build_tiny_clip(seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def fit_tiny_vae(vae: Any, steps: int = 150, seed: int = 0, lr: float = 2e-3) -> Any:
    """Train a tiny VAE for a few steps to reconstruct blocky 32x32 images, so that layout survives
    encode -> decode (a random VAE scrambles it). For tests of the SPM's noising path."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    size = int(vae.config.sample_size)
    vae.train()
    for _ in range(steps):
        x = torch.rand(16, 3, 1, 1, generator=generator) * 0.3 + torch.randn(16, 3, size, size, generator=generator) * 0.05
        side = size // 3
        for i in range(16):
            top, left = torch.randint(0, size - side, (2,), generator=generator).tolist()
            x[i, :, top : top + side, left : left + side] = torch.rand(3, 1, 1, generator=generator) * 0.5 + 0.5
        x = x * 2 - 1
        latents = vae.encode(x).latent_dist.sample(generator)
        loss = (vae.decode(latents).sample - x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return vae.eval().requires_grad_(False)
