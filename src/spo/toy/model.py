"""The toy world's text-to-image model: a pixel-space diffusers UNet with a tiny CLIP text encoder.

Same classes and schedule conventions as Stable Diffusion (UNet2DConditionModel, CLIPTextModel,
a CLIP BPE tokenizer; 1000 training steps, epsilon prediction), but in pixel space (32x32 RGB, no
VAE: "decode" is the identity) and with a word-level vocabulary learnt from the toy grammar, so
it needs no download. ``ToyBackbone`` plugs into everything that takes a
:class:`~spo.backbones.Backbone`.

A saved toy model is a directory with ``toy_model.json`` and the subfolders ``unet``,
``text_encoder``, ``tokenizer`` and ``scheduler`` (each written by its own ``save_pretrained``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..backbones.base import (
    Backbone,
    BackboneLoadError,
    Conditioning,
    check_device_request,
    resolve_device,
    resolve_dtype,
)
from ..backbones.tiny import bytes_to_unicode
from ..builtin import TOY_WEIGHTS
from ..config import ModelConfig
from ..weights import resolve_reference
from .grammar import vocabulary

MARKER = "toy_model.json"
#: the shipped, pretrained toy base model (``spo toy pretrain``, seed 0, 3600 steps) and snapshots
WEIGHTS_DIR = TOY_WEIGHTS
BASE_MODEL = WEIGHTS_DIR / "base"
MAX_LENGTH = 16
RESOLUTION = 32


TOKENIZER_DIR = Path(__file__).with_name("tokenizer")


def build_toy_tokenizer() -> Any:
    """The shipped toy tokenizer (``spo/toy/tokenizer``): a CLIPTokenizer in which every toy word
    is one token and any other text falls back to byte tokens. Shipped as files because the BPE
    trainer that made it (:func:`train_toy_tokenizer`) breaks frequency ties differently from
    one process to the next."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))


def train_toy_tokenizer() -> Any:
    """Learn BPE merges from the grammar's words (how the shipped tokenizer was made, once)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    alphabet = list(bytes_to_unicode().values())
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=4000, initial_alphabet=alphabet, end_of_word_suffix="</w>", min_frequency=1, show_progress=False
    )
    bpe.train_from_iterator(vocabulary() * 3, trainer)
    learnt = json.loads(bpe.to_str())["model"]
    vocab = dict(learnt["vocab"])
    for symbol in alphabet:
        vocab.setdefault(symbol + "</w>", len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    merges = [" ".join(m) if isinstance(m, list) else m for m in learnt["merges"]]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=MAX_LENGTH)


class ToyPipeline:
    """The toy model's components (the shape of a diffusers pipeline, without a VAE)."""

    def __init__(self, unet: Any, text_encoder: Any, tokenizer: Any, scheduler: Any) -> None:
        self.unet, self.text_encoder, self.tokenizer, self.scheduler = unet, text_encoder, tokenizer, scheduler
        self.vae = None

    @property
    def components(self) -> dict[str, Any]:
        return {"unet": self.unet, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer, "scheduler": self.scheduler}

    def to(self, device: Any = None) -> "ToyPipeline":
        for module in (self.unet, self.text_encoder):
            module.to(device)
        return self

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, component in self.components.items():
            component.save_pretrained(directory / name)
        (directory / MARKER).write_text(json.dumps({"kind": "toy", "resolution": RESOLUTION}, indent=2))
        return directory

    @staticmethod
    def save_lora_weights(**kwargs: Any) -> None:
        """The diffusers LoRA file (``unet.`` keys), as the SD pipelines write it."""
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.save_lora_weights(**kwargs)


#: what the toy base model learns to predict: the noise (DDPM, the default and the paper's
#: setting) or the velocity of rectified flow (the SD3 family's objective)
OBJECTIVES = ("epsilon", "flow")


def build_toy_pipeline(seed: int = 0, objective: str = "epsilon") -> ToyPipeline:
    """An untrained toy model (a 1.3 M-parameter UNet, a 0.1 M text encoder), weights from
    ``seed``; ``objective="flow"`` gives it a flow-matching scheduler (same networks)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_toy_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH, projection_dim=64, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 48, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    )
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown toy objective {objective!r}; expected one of {list(OBJECTIVES)}")
    if objective == "flow":  # SD3's scheduler class; no shift at 32x32 (SD3 shifts for 1024 px)
        scheduler: Any = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    else:
        # SD's conventions (1000 steps, epsilon, leading spacing + offset 1), with the linear beta
        # schedule that trains better in pixel space (environment notes)
        scheduler = DDIMScheduler(
            num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
            prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        )
    return ToyPipeline(unet, text_encoder, tokenizer, scheduler)


def _scheduler_class(directory: Path) -> Any:
    """The saved scheduler's class (the toy models ship a DDIM or a flow-matching one)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    try:
        name = json.loads((directory / "scheduler_config.json").read_text()).get("_class_name")
    except (OSError, ValueError):
        name = None
    return FlowMatchEulerDiscreteScheduler if name == "FlowMatchEulerDiscreteScheduler" else DDIMScheduler


def load_toy_pipeline(directory: str | Path, dtype: torch.dtype = torch.float32) -> ToyPipeline:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    directory = Path(directory)
    if not (directory / MARKER).exists():
        raise BackboneLoadError(f"model.pretrained: {str(directory)!r} is not a toy model directory (no {MARKER})")
    try:
        return ToyPipeline(
            UNet2DConditionModel.from_pretrained(directory / "unet", torch_dtype=dtype),
            CLIPTextModel.from_pretrained(directory / "text_encoder", dtype=dtype),
            CLIPTokenizer.from_pretrained(directory / "tokenizer"),
            _scheduler_class(directory / "scheduler").from_pretrained(directory / "scheduler"),
        )
    except (OSError, ValueError) as err:
        raise BackboneLoadError(f"model.pretrained: could not load the toy model in {str(directory)!r}: {err}") from err


class ToyBackbone(Backbone):
    """The toy model behind the backbone interface: pixel space, decode = identity."""

    kind = "toy"
    diffusers_format = False

    @classmethod
    def from_config(cls, model: ModelConfig, negative_prompt: str | None = None,
                    components: dict[str, Any] | None = None) -> "ToyBackbone":
        if components:
            raise BackboneLoadError("model.backbone=toy: the toy pipeline takes no replacement components")
        return cls.from_pretrained(model.pretrained, dtype=model.dtype, device=model.device,
                                   negative_prompt=negative_prompt, resolution=model.resolution)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained: str,
        *,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device | None = None,
        negative_prompt: str | None = None,
        resolution: int | None = None,
        **_: Any,
    ) -> "ToyBackbone":
        # a toy model directory: local (toy:NAME included), or a hub repo (or folder of one) fetched whole
        path = Path(resolve_reference(pretrained, "model.pretrained", "directory", download=True,
                                      error=BackboneLoadError))
        check_device_request(str(device) if device is not None else None, dtype)
        pipeline = load_toy_pipeline(path, resolve_dtype(dtype))
        return cls(pipeline, device=resolve_device(device), dtype=dtype, negative_prompt=negative_prompt,
                   resolution=resolution or RESOLUTION)

    def check_prompts(self, prompts: Any) -> None:
        """The toy world's vocabulary is its grammar: a prompt outside it would be conditioned on
        subword noise, silently. Raises :class:`~spo.toy.grammar.PromptGrammarError`."""
        from .grammar import parse_prompt

        for prompt in prompts:
            if prompt:  # "" is the unconditional prompt
                parse_prompt(prompt)

    @torch.no_grad()
    def _encode_prompts(self, prompts: Any, *, with_negative: bool = True) -> Conditioning:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        encoder = self.pipeline.text_encoder

        def embed(texts: list[str]) -> torch.Tensor:
            return encoder(self._tokenize(self.pipeline.tokenizer, texts))[0].to(self.dtype)

        negative = embed([self.negative_prompt or ""] * len(prompts)) if with_negative else None
        return Conditioning(prompt_embeds=embed(prompts), negative_prompt_embeds=negative)

    def _added_cond_kwargs(self, cond: Conditioning, negative: bool) -> None:
        return None
