"""Full-size SPO rounds on a GPU: seconds per round (sampling / training), peak memory per phase,
the work done, and each round against its floor, for SD-1.5 and SDXL with the memory/speed levers.

Builds on the device, with random weights of the real shapes (seconds on a GPU): SD-1.5 (UNet
860 M, CLIP ViT-L/14 text encoder, the SD VAE), SDXL base (UNet 2.6 B with its (1, 2, 10)
transformer layers, CLIP-L + OpenCLIP-bigG text encoders, the SDXL VAE with the fp16-fix's
``force_upcast: false``), a PickScore-sized CLIP (ViT-H/14) as the step-aware preference model
and a random diffusers ``AutoencoderTiny`` (TAESD's architecture); each is saved and loaded back
by the trainer through ``from_pretrained``. Offline byte-level tokenizers. Random weights: the
numbers are costs, not quality.

For each model, first a component profile on the baseline trainer's own models (median of a few
cuda-synchronised calls after a warm-up, peak memory of each): one UNet pass of the plain steps
(prompts x 2 rows for CFG) and of a pool (prompts x k x 2), the VAE decode of the prompts x k
x0-hats at once and in chunks, the same with the tiny decoder, SPM scoring of those images at
once and in chunks, and one training micro-batch (reference forward + policy forward/backward,
``train.batch_size`` pairs) without and with gradient checkpointing. Then ``SPOTrainer`` runs the
model's release preset (``sd15``: 10 prompts x k 4, 512 px; ``sdxl``: 2 prompts x k 2, MSPO j 4,
1024 px) in fp16 for each variant:

    baseline       decode + score a step's candidates at once (sampling.decode_batch_size=null)
    default        the preset as a user runs it (nothing pinned: decode in chunks of 8, ...)
    chunked        sampling.decode_batch_size = 8 (SD-1.5) / 1 (SDXL)
    checkpointing  model.gradient_checkpointing=true
    tiny_decoder   preference.decoder = the AutoencoderTiny (x0-hat decoded for scoring only)
    channels_last  model.channels_last=true (not in the defaults)
    pool_chunked   chunked + sampling.batch_size=10 (the denoiser on 10 images per call while sampling)
    all            chunked + checkpointing + tiny_decoder
    spm_fp16       preference.dtype=float16 (the SPM's weights in fp16; scores and normalisation in fp32)
    adamw8bit      optimizer.name=adamw8bit (bitsandbytes)
    lowmem         the PRESET-lowmem switch: decode one x0-hat at a time, checkpointing, text
                   encoders and the SPM in host memory outside their phase (the one switch)
    lowmem_pool    lowmem + sampling.batch_size=8 (the pool pass in calls of 8 images)
    lowmem_spm16   lowmem + preference.dtype=float16
    lowmem_all     lowmem + sampling.batch_size=8 + preference.dtype=float16
    lowmem_tiled   lowmem + sampling.decode_tile (SD-1.5 256 px, SDXL 512 px tiles: changes the scores)

with ``pools.threshold=0`` so that every pool trains (SD-1.5: 160 pairs a round, SDXL: 32), as
the measurements in shared/design/environment-notes.md. Per round: sampling and training seconds
(metrics.jsonl round lines), peak GiB of each phase (max_memory_allocated, reset when the phase
starts), the rollout's work counters (RolloutStats: UNet calls and rows, images decoded, scored)
and the round's *floor*: every UNet call, decode and scoring of the round (counted) times the
profile's single-pass time of that shape (scaled by rows), plus per micro-batch the profile's
training micro-batch; ratio = measured / floor. A variant whose config switch does not exist in
this checkout is skipped with a note; an error (OOM, ...) is recorded and the next variant runs.
The JSON is rewritten after the profile and after each variant, so a timeout leaves results.

Default plan, sized for ~6 minutes on one H100/H200 (about: builds 1 min; SD-1.5 profile 15 s and
five variants of one round ~25 s + ~10 s loading each; SDXL profile 30 s and baseline + all, one
round ~25-35 s + loading each): SD-1.5 all five variants, SDXL ``baseline`` and ``all`` only (the
levers one by one are measured on SD-1.5; on SDXL the question is what they buy together), one
round each (the profile runs first and warms the kernels up). ``--budget-seconds`` skips what
would start after that many seconds. Checkpoint and final-LoRA writes are patched out (they are
not part of a round).

    python benchmarks/fullsize.py --output benchmarks/results/fullsize.json                  # CUDA
    python benchmarks/fullsize.py --models sd15 --variants baseline,chunked --rounds 2 --output ...
    python benchmarks/fullsize.py --tiny --output /tmp/fullsize-tiny.json                    # CPU, tiny

``--tiny`` builds tiny models and runs every model x variant on the CPU (fp32, 2 prompts, 8 steps,
32 px) in well under a minute: it checks the script, it measures nothing.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is a local directory: no hub retries
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _report import write_partial  # noqa: E402 - after the path insert

VARIANTS = ("baseline", "default", "no_t5", "chunked", "checkpointing", "tiny_decoder", "channels_last", "compile", "memory", "all",
            "pool_chunked", "spm_fp16", "adamw8bit", "lowmem", "lowmem_pool", "lowmem_spm16", "lowmem_all",
            "lowmem_tiled")
#: variants run on the ``PRESET-lowmem`` form of the model's preset (its levers are not pinned off)
LOWMEM_VARIANTS = ("lowmem", "lowmem_pool", "lowmem_spm16", "lowmem_all", "lowmem_tiled")
#: tile side (pixels) of the ``lowmem_tiled`` variant: half the image side
TILE = {"sd15": 256, "sdxl": 512, "sd3": 256}
TINY_TILE = {"sd15": 16, "sdxl": 16, "sd3": 16}
DEFAULT_VARIANTS = {"sd15": ["baseline", "chunked", "checkpointing", "tiny_decoder", "memory", "all", "pool_chunked"],
                    "sdxl": ["baseline", "memory", "all"], "sd3": ["default", "no_t5", "lowmem"]}
TINY_VARIANTS = {"sd15": ["baseline", "chunked", "checkpointing", "tiny_decoder", "all", "lowmem", "lowmem_all",
                          "lowmem_tiled"],
                 "sdxl": ["baseline", "chunked", "checkpointing", "tiny_decoder", "all", "lowmem", "lowmem_all"],
                 "sd3": ["baseline", "default", "no_t5", "lowmem"]}
#: decode/score chunk of the ``chunked`` variant: SD-1.5 decodes 40 x0-hats a step (8: 20.5 -> 6.0
#: GiB for +5%), SDXL 4 at 1024 px (one by one: 22.6 -> 11.4 GiB for +3%)
CHUNK = {"sd15": 8, "sdxl": 1, "sd3": 8}
TINY_CHUNK = {"sd15": 2, "sdxl": 1, "sd3": 2}
GIB = 2**30


# ----------------------------------------------------------------------------- model builders
def build_sdxl(directory: Path, dtype: torch.dtype = torch.float16) -> Path:
    """A random SDXL-base-shaped pipeline (as spo.backbones.tiny.build_tiny_sdxl, at full size),
    saved in ``dtype`` (fp16 halves the 2.6 B UNet's 10 GB)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from spo.backbones.tiny import build_tokenizer

    def text_config(tokenizer: Any, hidden: int, layers: int, heads: int, projection: int, act: str) -> Any:
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=77, projection_dim=projection, hidden_act=act,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer()
    text_encoder = CLIPTextModel(text_config(tokenizer, 768, 12, 12, 768, "quick_gelu"))  # CLIP ViT-L/14
    text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer_2, 1280, 32, 20, 1280, "gelu"))  # bigG
    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + bigG's 1280 pooled
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        latent_channels=4, sample_size=1024, scaling_factor=0.13025, force_upcast=False)  # as sdxl-vae-fp16-fix
    with torch.device("cpu"):  # schedulers keep their tables on the CPU
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           steps_offset=1, timestep_spacing="leading")
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True)
    pipe.to(dtype=dtype)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def build_t5_tokenizer(directory: Path) -> Any:
    """An offline T5 tokenizer (transformers' Unigram ``T5Tokenizer`` from an in-memory vocabulary:
    the benchmark prompts' words, then single characters as the fallback)."""
    from transformers import T5Tokenizer

    words = "a photo of thing detailed high quality".split()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"\u2581{w}", -1.0 - i) for i, w in enumerate(words)]
    pieces += [(c, -20.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.\u2581"]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def build_sd3(directory: Path, dtype: torch.dtype = torch.float16, tiny: bool = False) -> Path:
    """A random Stable-Diffusion-3.5-medium-shaped pipeline with T5 (saved in ``dtype``): the MMDiT
    (24 layers of 24 x 64 heads, dual attention in layers 0-12, RMS q/k norm, 2x2 patches of 16
    latent channels, joint attention width 4096, pooled 2048), CLIP-L and OpenCLIP-bigG text
    encoders with projections, T5-XXL (4096 wide, 24 layers, 64 heads, gated GELU, 32128 tokens)
    and SD3's 16-channel VAE (scale 1.5305, shift 0.0609), with SD3's flow scheduler (shift 3.0).
    With ``tiny``: the same architecture, every width and depth cut down (CPU checks).
    Beside it, ``DIRECTORY-no-t5``: the same components linked, T5 left out (as diffusers allows)."""
    import shutil

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from spo.backbones.tiny import build_tokenizer

    def clip(tokenizer: Any, hidden: int, layers: int, heads: int, act: str) -> Any:
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=77, projection_dim=hidden, hidden_act=act,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))

    torch.manual_seed(0)
    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_3 = build_t5_tokenizer(Path(tmp))
    if tiny:
        text_encoder, text_encoder_2 = clip(tokenizer, 32, 2, 2, "quick_gelu"), clip(tokenizer_2, 32, 2, 2, "gelu")
        t5 = T5Config(vocab_size=len(tokenizer_3), d_model=64, d_ff=128, num_layers=2, num_heads=2, d_kv=32,
                      feed_forward_proj="gated-gelu")
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
            pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm")
        blocks = (16, 32)
    else:
        text_encoder = clip(tokenizer, 768, 12, 12, "quick_gelu")  # CLIP ViT-L/14
        text_encoder_2 = clip(tokenizer_2, 1280, 32, 20, "gelu")  # OpenCLIP bigG
        t5 = T5Config(vocab_size=32128, d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64,
                      feed_forward_proj="gated-gelu")  # T5 v1.1 XXL
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
            pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
        blocks = (128, 256, 512, 512)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks), block_out_channels=blocks, layers_per_block=1 if tiny else 2,
        latent_channels=16, norm_num_groups=16 if tiny else 32, sample_size=32 if tiny else 1024,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)
    with torch.device("cpu"):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=T5EncoderModel(t5),
        tokenizer_3=tokenizer_3)
    pipe.to(dtype=dtype)
    pipe.save_pretrained(directory, safe_serialization=True)
    del pipe
    # the same pipeline without T5: its components linked, model_index.json without text_encoder_3
    bare = directory.parent / f"{directory.name}-no-t5"
    bare.mkdir(exist_ok=True)
    for entry in directory.iterdir():
        if entry.name not in ("model_index.json", "text_encoder_3", "tokenizer_3"):
            (bare / entry.name).symlink_to(entry.resolve())
    index = json.loads((directory / "model_index.json").read_text())
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    (bare / "model_index.json").write_text(json.dumps(index, indent=2))
    shutil.copystat(directory / "model_index.json", bare / "model_index.json")
    return directory


def build_tiny_decoder(directory: Path, tiny: bool) -> Path:
    """A random AutoencoderTiny: diffusers' defaults (TAESD/TAESDXL's architecture, 8x) at full
    size; with ``tiny``, two 8-channel blocks (2x, as the tiny pipelines' VAE)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    if tiny:
        decoder = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                                  num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)
    else:
        decoder = AutoencoderTiny()
    decoder.save_pretrained(str(directory))
    return directory


def build_all(models: list[str], root: Path, tiny: bool, device: str) -> tuple[dict[str, Path], dict[str, float]]:
    """Every directory the runs need: {sd15, sdxl, sd3, pickscore, tiny_decoder} -> path; build
    seconds (0.0: reused from ``root``)."""
    paths: dict[str, Path] = {}
    seconds: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Path]) -> None:
        """Build ``name`` unless ``root`` holds it from an earlier run (``--build-dir``: its
        ``.built-NAME`` marker, written after the build, names the directory)."""
        marker = root / f".built-{name}{'-tiny' if tiny else ''}"
        if marker.exists():
            paths[name], seconds[name] = Path(marker.read_text()), 0.0
            return
        start = time.perf_counter()
        paths[name] = fn()
        seconds[name] = round(time.perf_counter() - start, 1)
        marker.write_text(str(paths[name]))
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    with torch.device(device):
        if tiny:
            from spo.backbones.tiny import save_tiny_clip, save_tiny_pipeline
            from spo.preference.preprocess import save_clip_image_config

            timed("pickscore", lambda: save_clip_image_config(save_tiny_clip(root / "pickscore"), 32).parent)
            for name in models:
                if name == "sd3":  # the SD3.5 architecture (dual attention, q/k norm) with T5, cut down
                    timed(name, lambda name=name: build_sd3(root / name, torch.float32, tiny=True))
                else:
                    timed(name, lambda name=name: save_tiny_pipeline(name, root / name))
        else:
            from real_size_methods import build_pickscore, build_sd15

            timed("pickscore", lambda: build_pickscore(root / "pickscore"))
            builders = {"sd15": build_sd15, "sdxl": build_sdxl, "sd3": build_sd3}
            for name in models:
                timed(name, lambda name=name: builders[name](root / name))
        timed("tiny_decoder", lambda: build_tiny_decoder(root / "tiny-decoder", tiny))
    return paths, seconds


# ----------------------------------------------------------------------------- config helpers
def config_knows(key: str) -> bool:
    """Does this checkout's config schema have ``section.name``?"""
    from spo.config.schema import SPOConfig

    section, _, name = key.partition(".")
    part = getattr(SPOConfig(), section, None)
    return dataclasses.is_dataclass(part) and name in {f.name for f in dataclasses.fields(part)}


def variant_overrides(variant: str, chunk: int, decoder: Path, model_dir: Path | None = None,
                      tile: int | None = None) -> dict[str, str]:
    """The switches of a variant (dotted key -> value); ``no_t5`` loads ``MODEL_DIR-no-t5``."""
    if variant == "no_t5":
        return {"model.pretrained": f"{model_dir}-no-t5"}
    switches = {
        "chunked": {"sampling.decode_batch_size": str(chunk)},
        "checkpointing": {"model.gradient_checkpointing": "true"},
        "tiny_decoder": {"preference.decoder": str(decoder)},
        "channels_last": {"model.channels_last": "true"},
        "compile": {"model.compile": "true"},
        # the pool pass (SD-1.5: 10 prompts x k 4 = 40 images, 80 rows under CFG) in calls of 10 images
        "pool_chunked": {"sampling.batch_size": "10", "sampling.decode_batch_size": str(chunk)},
        "spm_fp16": {"preference.dtype": "float16"},
        "adamw8bit": {"optimizer.name": "adamw8bit"},
        "lowmem": {},
        "lowmem_pool": {"sampling.batch_size": "8"},
        "lowmem_spm16": {"preference.dtype": "float16"},
        "lowmem_all": {"sampling.batch_size": "8", "preference.dtype": "float16"},
        "lowmem_tiled": {"sampling.decode_tile": str(tile)},
    }
    if variant in ("baseline", "default"):
        return {}
    if variant == "memory":  # the memory switches without the tiny decoder (what a 16 GB card needs)
        return {**switches["chunked"], **switches["checkpointing"]}
    if variant == "all":
        return {**switches["chunked"], **switches["checkpointing"], **switches["tiny_decoder"]}
    return dict(switches[variant])


#: pinned to the baseline's state in every variant (a variant's switch then overrides it); dropped
#: where the key does not exist, since that checkout then behaves this way already; a ``lowmem``
#: variant keeps the levers its preset suffix sets
PINS = {"sampling.decode_batch_size": "null", "sampling.batch_size": "null", "sampling.decode_tile": "null",
        "model.gradient_checkpointing": "false",
        "model.channels_last": "false", "model.compile": "false", "preference.decoder": "null",
        "model.offload_text_encoders": "false", "preference.offload": "false", "optimizer.name": "adamw"}


def variant_preset(model: str, variant: str) -> str:
    """The preset a variant loads: the model's, or its ``-lowmem`` form."""
    return f"{model}-lowmem" if variant in LOWMEM_VARIANTS else model


def variant_pins(pins: dict[str, str], variant: str) -> dict[str, str]:
    """``pins`` without the keys the variant's preset suffix sets (``default``: none at all)."""
    if variant == "default":
        return {}
    if variant not in LOWMEM_VARIANTS:
        return pins
    from spo.config.loading import LOW_MEMORY

    levers = {f"{section}.{key}" for section, values in LOW_MEMORY.items() for key in values}
    return {k: v for k, v in pins.items() if k not in levers}


def as_list(overrides: dict[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in overrides.items()]


# ----------------------------------------------------------------------------- measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gib(n: float | None) -> float | None:
    return None if n is None else round(n / GIB, 2)


def measure(fn: Callable[[], Any], device: torch.device, repeats: int, **info: Any) -> dict[str, Any]:
    """Median seconds of ``repeats`` calls after one warm-up; peak GiB over them (absolute, and above
    what was allocated before)."""
    fn()
    sync(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    out = {**info, "seconds": round(statistics.median(times), 5), "repeats": repeats}
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        out.update(peak_gib=gib(peak), extra_gib=gib(peak - before))
    return out


def count_parameters(module: Any) -> int | None:
    if module is None:
        return None
    return int(sum(p.numel() for n, p in module.named_parameters() if "lora_" not in n))


@torch.no_grad()
def _decode_tiny(decoder: Any, x0: torch.Tensor) -> torch.Tensor:
    """As Backbone.decode_for_scoring does with a tiny decoder."""
    latents = x0.to(decoder.dtype) / decoder.config.scaling_factor
    return decoder.decode(latents, return_dict=False)[0].clamp(-1, 1)


def profile_components(trainer: Any, chunk: int, decoder_dir: Path, repeats: int) -> dict[str, Any]:
    """Single passes of every component of a round, on the trainer's own models."""
    from diffusers import AutoencoderTiny

    bb, acc, scorer, cfg = trainer.backbone, trainer.accelerator, trainer.scorer, trainer.config
    device = acc.device
    B, k, gs = cfg.train.prompts_per_round, cfg.pools.k, cfg.sampling.guidance_scale
    n, pairs = B * k, cfg.train.batch_size
    prompts = [f"a photo of thing {i}, detailed, high quality" for i in range(B)]
    prompts_k = [p for p in prompts for _ in range(k)]
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = bb.latent_shape
    randn = lambda rows: torch.randn(rows, *shape, generator=gen).to(device, bb.dtype)  # noqa: E731
    out: dict[str, Any] = {
        "prompts": B, "k": k, "pairs_per_micro_batch": pairs, "latent_shape": list(shape),
        "resolution": bb.resolution, "decode_chunk": chunk, "repeats": repeats,
        "parameters": {
            "unet": count_parameters(bb.unet), "vae": count_parameters(bb.vae),
            "text_encoder": count_parameters(getattr(bb.pipeline, "text_encoder", None)),
            "text_encoder_2": count_parameters(getattr(bb.pipeline, "text_encoder_2", None)),
            "text_encoder_3": count_parameters(getattr(bb.pipeline, "text_encoder_3", None)),
            "spm": count_parameters(scorer), "lora": int(sum(p.numel() for p in trainer.params)),
        },
    }
    trainer.policy.eval()
    with torch.no_grad(), acc.autocast():
        cond = bb.encode_prompts(prompts, with_negative=gs > 1.0)
        cond_k = cond.repeat_interleave(k)
        x_b, x_k = randn(B), randn(n)
        out["unet_plain_pass"] = measure(lambda: bb.predict(x_b, 501, cond, gs), device, repeats,
                                         latents=B, unet_rows=B * (2 if gs > 1 else 1))
        out["unet_pool_pass"] = measure(lambda: bb.predict(x_k, 501, cond_k, gs), device, repeats,
                                        latents=n, unet_rows=n * (2 if gs > 1 else 1))
        images = bb.decode(x_k)
        out["decode_full"] = measure(lambda: bb.decode(x_k), device, repeats, images=n, chunk=n)
        out["decode_chunked"] = measure(lambda: [bb.decode(c) for c in x_k.split(chunk)], device, repeats,
                                        images=n, chunk=chunk)
        tiny = AutoencoderTiny.from_pretrained(str(decoder_dir), torch_dtype=bb.dtype).to(device).eval()
        if tiny.config.latent_channels == shape[0]:  # TAESD's 4 channels: not SD3's 16
            out["parameters"]["tiny_decoder"] = count_parameters(tiny)
            out["tiny_decode_full"] = measure(lambda: _decode_tiny(tiny, x_k), device, repeats, images=n, chunk=n)
            out["tiny_decode_chunked"] = measure(lambda: [_decode_tiny(tiny, c) for c in x_k.split(chunk)], device,
                                                 repeats, images=n, chunk=chunk)
        del tiny
        ts = torch.full((n,), 501, dtype=torch.long, device=device)
        if hasattr(scorer, "clear_cache"):
            scorer.clear_cache()
        out["score_full"] = measure(lambda: scorer(images, prompts_k, ts), device, repeats, images=n, chunk=n)
        out["score_chunked"] = measure(
            lambda: [scorer(images[i : i + chunk], prompts_k[i : i + chunk], ts[i : i + chunk])
                     for i in range(0, n, chunk)], device, repeats, images=n, chunk=chunk)
        if hasattr(scorer, "clear_cache"):
            scorer.clear_cache()
        del images
    # one training micro-batch: reference forward (no grad) + policy forward and backward, SPO's
    # shared x_t (train.batch_size rows, x2 for CFG)
    x = randn(pairs)
    t = torch.randint(0, 1000, (pairs,), generator=gen).to(device)
    cond_p = cond.index(torch.arange(pairs, device=device) % B)
    trainer.policy.train()

    def micro() -> None:
        with acc.autocast():
            with torch.no_grad():
                bb.predict(x, t, cond_p, gs, reference=True)
            loss = bb.predict(x, t, cond_p, gs).float().square().mean()
        acc.backward(loss)

    rows = pairs * (2 if gs > 1 else 1)
    was_checkpointing = bool(getattr(bb.unet, "is_gradient_checkpointing", False))
    try:
        if was_checkpointing:
            bb.unet.disable_gradient_checkpointing()
        out["train_micro_batch"] = measure(micro, device, repeats, pairs=pairs, unet_rows=rows)
        bb.enable_gradient_checkpointing()
        out["train_micro_batch_checkpointing"] = measure(micro, device, repeats, pairs=pairs, unet_rows=rows)
    finally:
        if not was_checkpointing:
            bb.unet.disable_gradient_checkpointing()
        trainer.optimizer.zero_grad(set_to_none=True)
        for p in trainer.params:
            p.grad = None
        trainer.policy.eval()
    ratio = lambda a, b: round(out[a]["seconds"] / out[b]["seconds"], 3) if out[b]["seconds"] else None  # noqa: E731
    out["ratios"] = {
        "decode_chunked_to_full": ratio("decode_chunked", "decode_full"),
        "tiny_decode_to_decode": ratio("tiny_decode_full", "decode_full") if "tiny_decode_full" in out else None,
        "checkpointing_to_plain": ratio("train_micro_batch_checkpointing", "train_micro_batch"),
    }
    return out


# ----------------------------------------------------------------------------- one variant
class RoundSpy:
    """Patches a trainer instance (never its class, nothing in src): per-phase peak memory around
    ``sample_round`` / ``train_on``, UNet calls by phase around ``backbone.predict``, the rollout's
    RolloutStats around ``method.sampler.rollout``; checkpoint writes become no-ops."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.device = trainer.accelerator.device
        self.phase = "other"
        self.rounds: list[dict[str, Any]] = []
        self.current: dict[str, Any] = {}
        sample_round, train_on, predict = trainer.sample_round, trainer.train_on, trainer.backbone.predict

        def phase(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
            def wrapped(*args: Any, **kwargs: Any) -> Any:
                if name == "sampling":
                    self.current = {"unet_calls": {"sampling": [], "training_policy": [], "training_reference": []}}
                    self.rounds.append(self.current)
                cuda = self.device.type == "cuda"
                scorer = getattr(trainer, "scorer", None)
                if isinstance(scorer, torch.nn.Module):  # preference.offload: where the SPM sits as the phase starts
                    place = next(iter(scorer.parameters()), None)
                    self.current.setdefault("scorer_device", {})[name] = None if place is None else str(place.device)
                if cuda:
                    torch.cuda.synchronize(self.device)
                    torch.cuda.reset_peak_memory_stats(self.device)
                    self.current.setdefault("resident_gib", {})[name] = gib(torch.cuda.memory_allocated(self.device))
                self.phase = name
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.phase = "other"
                    if cuda:
                        torch.cuda.synchronize(self.device)
                        self.current.setdefault("peak_gib", {})[name] = gib(torch.cuda.max_memory_allocated(self.device))
                        self.current.setdefault("reserved_gib", {})[name] = gib(torch.cuda.max_memory_reserved(self.device))

            return wrapped

        def counted_predict(x_t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            rows = int(x_t.shape[0])
            if self.phase == "sampling":
                self.current["unet_calls"]["sampling"].append(rows)
            elif self.phase == "training":
                kind = "training_reference" if kwargs.get("reference") else "training_policy"
                self.current["unet_calls"][kind].append(rows)
            return predict(x_t, *args, **kwargs)

        trainer.sample_round = phase("sampling", sample_round)
        trainer.train_on = phase("training", train_on)
        trainer.backbone.predict = counted_predict
        sampler = getattr(trainer.method, "sampler", None)
        if sampler is not None:
            rollout = sampler.rollout

            def spied_rollout(*args: Any, **kwargs: Any) -> Any:
                scorer = getattr(trainer, "scorer", None)
                if isinstance(scorer, torch.nn.Module):  # during the rollout: on the device, offloaded or not
                    place = next(iter(scorer.parameters()), None)
                    self.current.setdefault("scorer_device", {})["rollout"] = None if place is None else str(place.device)
                result = rollout(*args, **kwargs)
                s = result.stats
                self.current["work"] = {
                    "pools": s.pools, "valid_pairs": s.valid_pairs, "unet_calls": s.unet_calls,
                    "unet_rows": s.unet_rows, "decoded": s.decoded, "scored": s.scored, "records": len(result.records)}
                return result

            sampler.rollout = spied_rollout
        trainer.checkpoint = lambda: None  # rounds are measured, not saving (SDXL rank 64: ~1 GB a write)
        trainer.save_final = lambda: None


def per_item(entry: dict[str, Any] | None, key: str) -> float | None:
    """Seconds per unit (image or row) of a profile entry."""
    if not entry or not entry.get(key):
        return None
    return entry["seconds"] / entry[key]


def round_floor(spy_round: dict[str, Any], profile: dict[str, Any] | None, settings: dict[str, Any],
                gs: float) -> dict[str, Any] | None:
    """The floor of one round: counted passes x the profile's single-pass time of that shape."""
    if not profile or "train_micro_batch" not in profile:
        return None
    cfg_factor = 2 if gs > 1 else 1
    unet = 0.0
    for rows in spy_round["unet_calls"]["sampling"]:  # nearest measured batch, scaled by rows
        ref = min((profile["unet_plain_pass"], profile["unet_pool_pass"]), key=lambda e: abs(e["latents"] - rows))
        unet += ref["seconds"] * rows / ref["latents"]
    work = spy_round.get("work", {})
    chunk = settings["decode_batch_size"]
    full = chunk is None or chunk >= profile["k"] * profile["prompts"]
    suffix = "full" if full else ("chunked" if chunk == profile["decode_chunk"] else None)
    if suffix is None:  # a chunk the profile did not measure: the nearest measured
        suffix = "chunked"
    decode_key = ("tiny_decode_" if settings["tiny_decoder"] else "decode_") + suffix
    decode = (per_item(profile.get(decode_key), "images") or 0.0) * work.get("decoded", 0)
    score = (per_item(profile.get("score_" + suffix), "images") or 0.0) * work.get("scored", 0)
    micro = profile["train_micro_batch_checkpointing" if settings["gradient_checkpointing"] else "train_micro_batch"]
    per_row = micro["seconds"] / micro["unet_rows"]
    training = sum(per_row * rows * cfg_factor for rows in spy_round["unet_calls"]["training_policy"])
    sampling = unet + decode + score
    return {"unet_seconds": round(unet, 4), "decode_seconds": round(decode, 4), "score_seconds": round(score, 4),
            "sampling_seconds": round(sampling, 4), "training_seconds": round(training, 4),
            "round_seconds": round(sampling + training, 4), "decode_profile": decode_key}


def run_variant(trainer: Any, run_dir: Path, profile: dict[str, Any] | None) -> dict[str, Any]:
    """Run the trainer's rounds; per round the metrics.jsonl line, peaks, work and floor."""
    from spo.training import read_metrics

    spy = RoundSpy(trainer)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    cfg = trainer.config
    settings = {"decode_batch_size": getattr(cfg.sampling, "decode_batch_size", None),
                "tiny_decoder": getattr(cfg.preference, "decoder", None) is not None,
                "gradient_checkpointing": bool(cfg.model.gradient_checkpointing),
                "channels_last": bool(getattr(cfg.model, "channels_last", False)),
                "sampling_batch_size": getattr(cfg.sampling, "batch_size", None),
                "decode_tile": getattr(cfg.sampling, "decode_tile", None),
                "offload_text_encoders": bool(getattr(cfg.model, "offload_text_encoders", False)),
                "preference_offload": bool(getattr(cfg.preference, "offload", False)),
                "preference_dtype": cfg.preference.dtype, "optimizer": cfg.optimizer.name,
                "text_encoders": len(trainer.backbone.text_encoders())}
    lines = [m for m in read_metrics(run_dir / "metrics.jsonl") if m["type"] == "round"]
    rounds = []
    for line, spied in zip(lines, spy.rounds):
        entry = {"round": line["round"], "sampling_seconds": line["sampling_seconds"],
                 "training_seconds": line["training_seconds"],
                 "round_seconds": round(line["sampling_seconds"] + line["training_seconds"], 3),
                 "valid_records": line["valid_records"], "optimizer_steps": line["optimizer_steps"],
                 "skipped": line.get("skipped", False),
                 "peak_gib": spied.get("peak_gib"), "resident_gib": spied.get("resident_gib"),
                 "reserved_gib": spied.get("reserved_gib"), "scorer_device": spied.get("scorer_device"),
                 "work": {**spied.get("work", {}),
                          "sampling_unet_calls_by_rows": _histogram(spied["unet_calls"]["sampling"]),
                          "training_policy_calls": len(spied["unet_calls"]["training_policy"]),
                          "training_reference_calls": len(spied["unet_calls"]["training_reference"]),
                          "training_unet_rows": sum(spied["unet_calls"]["training_policy"])}}
        floor = round_floor(spied, profile, settings, cfg.sampling.guidance_scale)
        if floor:
            entry["floor"] = floor
            entry["ratio_to_floor"] = {
                p: round(entry[f"{p}_seconds"] / floor[f"{p}_seconds"], 3) if floor[f"{p}_seconds"] else None
                for p in ("sampling", "training", "round")}
        rounds.append(entry)
    mean = lambda key, rs=rounds: round(statistics.fmean(r[key] for r in rs), 3) if rs else None  # noqa: E731
    peaks = [r["peak_gib"] for r in rounds if r["peak_gib"]]
    later = {}
    if len(rounds) > 1:  # without the first round's one-off costs
        later = {"after_first": {p: mean(f"{p}_seconds", rounds[1:]) for p in ("sampling", "training", "round")}}
    return {
        "status": "ok", "settings": settings, "wall_seconds": round(wall, 1), "rounds": rounds,
        "sampling_seconds": mean("sampling_seconds"), "training_seconds": mean("training_seconds"),
        "round_seconds": mean("round_seconds"), **later,
        "peak_gib": {phase: max(p.get(phase, 0.0) for p in peaks) for phase in ("sampling", "training")} if peaks else None,
        "reserved_gib": {phase: max((r["reserved_gib"] or {}).get(phase, 0.0) for r in rounds)
                         for phase in ("sampling", "training")} if any(r["reserved_gib"] for r in rounds) else None,
        "ratio_to_floor": {p: round(statistics.fmean(r["ratio_to_floor"][p] for r in rounds), 3)
                           for p in ("sampling", "training", "round")
                           if rounds and all("ratio_to_floor" in r and r["ratio_to_floor"][p] for r in rounds)},
    }


def _histogram(rows: list[int]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[str(r)] = counts.get(str(r), 0) + 1
    return counts


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def release(trainer: Any) -> None:
    """Drop what accelerate keeps of a trainer (prepared model, optimizer)."""
    if trainer is not None:
        trainer.accelerator.free_memory()


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--models", nargs="+", choices=["sd15", "sdxl", "sd3"], default=["sd15", "sdxl"],
                        help="sd3: SD3.5-medium-sized with T5-XXL (variant no_t5 without it); not in the default")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated, of {', '.join(VARIANTS)} (default: per model, see above)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds per variant (default 1: see the plan above)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per profile entry (default 3; tiny 2)")
    parser.add_argument("--budget-seconds", type=float, default=None,
                        help="do not start a profile or variant after this many seconds (default 330; tiny: none)")
    parser.add_argument("--no-profile", action="store_true", help="skip the component profile (no floors; the first variant then also pays the CUDA warm-up: its round time is not comparable)")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU: checks the script, measures nothing")
    parser.add_argument("--cap-gib", type=float, default=None,
                        help="run the lowmem variants with the process's GPU memory capped at this many GiB "
                             "(torch.cuda.set_per_process_memory_fraction): the card size they are to fit, made "
                             "a hard limit (7.5 for an 8 GB card: its CUDA context takes the rest)")
    parser.add_argument("--build-dir", type=Path, default=None,
                        help="build the random models here and reuse what an earlier run built there (default: a "
                             "temporary directory, removed at the end)")
    parser.add_argument("--preference-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                        help="the SPM's dtype outside the spm_fp16 / lowmem_spm16 variants (default float32, the "
                             "presets'; results before 2026-12 ran float16)")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU (--tiny checks it on the CPU with tiny models)")
    if args.variants:
        chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in chosen if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"error: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
        plan = {m: chosen for m in args.models}
    else:
        plan = {m: TINY_VARIANTS[m] if args.tiny else DEFAULT_VARIANTS[m] for m in args.models}
    if "baseline" not in sum(plan.values(), []):
        print("note: no baseline variant: ratios to the baseline are left out", flush=True)
    repeats = args.repeats or (2 if args.tiny else 3)
    budget = args.budget_seconds if args.budget_seconds is not None else (None if args.tiny else 330.0)
    device = "cpu" if args.tiny else "cuda"
    chunks = TINY_CHUNK if args.tiny else CHUNK

    import accelerate
    import diffusers
    import peft
    import transformers

    from spo.config import load_config
    from spo.training import SPOTrainer

    diffusers.utils.logging.disable_progress_bar()  # one bar per loaded component otherwise
    transformers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="fullsize-"))
    atexit.register(shutil.rmtree, root, True)  # the built models (~15 GB at full size)
    result: dict[str, Any] = {
        "benchmark": "fullsize",
        "mode": "tiny (cpu, tiny models: checks the script, not a measure)" if args.tiny else "full size (cuda, fp16)",
        "device": "cpu" if args.tiny else torch.cuda.get_device_name(),
        "gpu_memory_gib": None if args.tiny else gib(torch.cuda.get_device_properties(0).total_memory),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "accelerate": accelerate.__version__, "python": platform.python_version(),
        "argv": sys.argv[1:], "rounds_per_variant": args.rounds, "plan": plan,
        "notes": ["random weights of the real shapes: costs, not quality",
                  "pools.threshold=0: every pool trains (SD-1.5 160 pairs a round, SDXL 32)",
                  "peak_gib: torch.cuda.max_memory_allocated, reset when the phase starts (resident_gib: allocated "
                  "then; reserved_gib: max_memory_reserved, what the caching allocator held: a card must fit this "
                  "plus the CUDA context)",
                  "floor: counted UNet calls, decodes, scorings and micro-batches x the profile's single-pass "
                  "time of that shape, scaled by rows; ratio_to_floor = measured / floor",
                  "checkpoint and final-LoRA writes are patched out (not part of a round)"],
        "models": {},
    }

    def write() -> None:
        write_partial(result, args.output, t0)

    if args.build_dir:
        args.build_dir.mkdir(parents=True, exist_ok=True)
    paths, build_seconds = build_all(args.models, args.build_dir or root, args.tiny, device)
    result["build_seconds"] = build_seconds
    write()
    prompts_file = root / "prompts.txt"
    prompts_file.write_text("\n".join(f"a photo of thing {i}, detailed, high quality" for i in range(64)) + "\n")

    for model in args.models:
        common = {"model.pretrained": str(paths[model]), "preference.pretrained": str(paths["pickscore"]),
                  "preference.processor": "null", "data.prompts": str(prompts_file), "logging.tensorboard": "false",
                  "pools.threshold": "0.0", "train.rounds": str(args.rounds),
                  # a random PickScore, no released SPM to fetch: its time modules at identity, run as a
                  # trained SPM's would be (step_agnostic feeds t = 0 through the same adaLN tower)
                  "preference.checkpoint": "null", "preference.variant": "step_agnostic"}
        if model == "sdxl":
            common["model.vae"] = "null"  # the random pipeline's own VAE (fp16-safe: force_upcast false)
        if args.tiny:
            common.update({"model.device": "cpu", "model.dtype": "float32", "train.mixed_precision": "no",
                           "preference.dtype": "float32", "model.resolution": "32", "train.prompts_per_round": "2",
                           "sampling.num_inference_steps": "8"})
        else:
            common.update({"model.device": "cuda", "model.dtype": "float16", "train.mixed_precision": "fp16",
                           "preference.dtype": args.preference_dtype})
        pins = {k: v for k, v in PINS.items() if config_knows(k)}
        entry: dict[str, Any] = {"preset": model, "decode_chunk": chunks[model], "common_overrides": as_list(common),
                                 "pinned": as_list(pins), "profile": None, "variants": {}}
        result["models"][model] = entry
        base_cfg = load_config(model, as_list({**common, **pins}))
        entry.update(prompts=base_cfg.train.prompts_per_round, k=base_cfg.pools.k, inner_steps=base_cfg.pools.inner_steps,
                     steps=base_cfg.sampling.num_inference_steps, batch_size=base_cfg.train.batch_size,
                     gradient_accumulation_steps=base_cfg.train.gradient_accumulation_steps)

        def make_trainer(variant: str, cfg: Any) -> tuple[Any, Path, float]:
            run_dir = root / "runs" / model / variant
            start = time.perf_counter()
            trainer = SPOTrainer(cfg, run_dir, progress=False)
            return trainer, run_dir, time.perf_counter() - start

        baseline_trainer = None
        baseline_dir = None
        needs_baseline_trainer = not args.no_profile or "baseline" in plan[model]
        if budget is not None and time.perf_counter() - t0 > budget:
            needs_baseline_trainer = False
            entry["profile"] = {"status": "skipped", "note": f"time budget ({budget:.0f} s) spent"}
        if needs_baseline_trainer:
            try:
                baseline_trainer, baseline_dir, load_s = make_trainer("baseline", base_cfg)
                entry["load_seconds"] = round(load_s, 1)
                if not args.no_profile:
                    start = time.perf_counter()
                    entry["profile"] = profile_components(baseline_trainer, chunks[model], paths["tiny_decoder"], repeats)
                    entry["profile"]["wall_seconds"] = round(time.perf_counter() - start, 1)
            except Exception as err:  # noqa: BLE001 - e.g. OOM: record it, go on
                entry["profile"] = {"status": "error", "error": f"{type(err).__name__}: {err}",
                                    "traceback": traceback.format_exc(limit=6)}
                print(f"{model} profile: {type(err).__name__}: {err}", flush=True)
            free(device)
            print(f"{model} profile: {json.dumps(entry['profile'])[:400]}", flush=True)
            write()
        profile = entry["profile"] if entry["profile"] and "train_micro_batch" in entry["profile"] else None

        for variant in plan[model]:
            switches = variant_overrides(variant, chunks[model], paths["tiny_decoder"], paths[model],
                                         (TINY_TILE if args.tiny else TILE)[model])
            missing = [k for k in switches if not config_knows(k)]
            if variant == "no_t5" and not Path(f"{paths[model]}-no-t5").is_dir():
                missing.append(f"a pipeline without T5 beside {model}")
            if variant in LOWMEM_VARIANTS:
                from spo.config import available_presets

                if model not in available_presets() or not _has_lowmem(model):
                    missing.append(f"preset {model}-lowmem")
            record: dict[str, Any] = {"overrides": as_list(switches)}
            if missing:
                record.update(status="skipped", note=f"unknown config key(s) in this checkout: {', '.join(missing)}")
            elif budget is not None and time.perf_counter() - t0 > budget:
                record.update(status="skipped", note=f"time budget ({budget:.0f} s) spent")
            else:
                trainer = None
                start = time.perf_counter()
                capped = args.cap_gib is not None and variant in LOWMEM_VARIANTS and device == "cuda"
                if capped:  # the card's size, made a hard limit: an out-of-memory error means it does not fit
                    total = torch.cuda.get_device_properties(0).total_memory
                    torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GIB / total))
                    record["memory_cap_gib"] = args.cap_gib
                try:
                    if variant == "baseline" and baseline_trainer is not None:
                        trainer, run_dir = baseline_trainer, baseline_dir
                        baseline_trainer = None
                        record["load_seconds"] = entry.get("load_seconds")
                    else:
                        if baseline_trainer is not None:  # not to be run: free its memory first
                            release(baseline_trainer)
                            baseline_trainer = None
                            free(device)
                        cfg = load_config(variant_preset(model, variant),
                                          as_list({**common, **variant_pins(pins, variant), **switches}))
                        trainer, run_dir, load_s = make_trainer(variant, cfg)
                        record["load_seconds"] = round(load_s, 1)
                    record.update(run_variant(trainer, run_dir, profile))
                except Exception as err:  # noqa: BLE001 - OOM or anything else: record it and go on
                    record.update(status="error", error=f"{type(err).__name__}: {err}",
                                  traceback=traceback.format_exc(limit=6))
                record["variant_wall_seconds"] = round(time.perf_counter() - start, 1)
                release(trainer)
                trainer = None
                if capped:
                    torch.cuda.set_per_process_memory_fraction(1.0)
                free(device)
            entry["variants"][variant] = record
            _ratios_to_baseline(entry["variants"])
            print(f"{model} {variant}: " + json.dumps({k: record.get(k) for k in (
                "status", "note", "error", "sampling_seconds", "training_seconds", "round_seconds", "peak_gib",
                "ratio_to_baseline", "ratio_to_floor")}), flush=True)
            write()
        release(baseline_trainer)
        baseline_trainer = None
        free(device)
    write()
    print(f"wrote {args.output} ({result['wall_seconds']} s)", flush=True)


def _has_lowmem(model: str) -> bool:
    try:
        from spo.config import load_config

        load_config(f"{model}-lowmem")
    except Exception:  # noqa: BLE001 - an older checkout without the suffix
        return False
    return True


def _ratios_to_baseline(variants: dict[str, dict[str, Any]]) -> None:
    """``ratio_to_baseline`` of every variant, against ``baseline`` or, without it, ``default``
    (named in ``ratio_base``)."""
    name = "baseline" if variants.get("baseline", {}).get("status") == "ok" else "default"
    base = variants.get(name)
    if not base or base.get("status") != "ok":
        return
    for record in variants.values():
        if record.get("status") != "ok":
            continue
        ratios = {}
        for key in ("round_seconds", "sampling_seconds", "training_seconds"):
            if base.get(key):
                ratios[key.removesuffix("_seconds")] = round(record[key] / base[key], 3)
        if base.get("peak_gib") and record.get("peak_gib"):
            for phase in ("sampling", "training"):
                if base["peak_gib"].get(phase):
                    ratios[f"peak_{phase}"] = round(record["peak_gib"][phase] / base["peak_gib"][phase], 3)
        record["ratio_to_baseline"] = ratios
        record["ratio_base"] = name


if __name__ == "__main__":
    main()
