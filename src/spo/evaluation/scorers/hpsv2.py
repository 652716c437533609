"""HPSv2 (Human Preference Score v2): score = 100 * cos(image embedding, text embedding).

An open_clip ViT-H-14 fine-tuned on human preferences (hub ``xswu/HPSv2``), run here as a
transformers ``CLIPModel`` after converting its state dict (:func:`convert_open_clip_state_dict`),
so neither open_clip nor the hpsv2 package is needed. As HPSv2's ``preprocess_val``
(open_clip's ``ResizeMaxSize``): the longest side is resized to 224 (bicubic), the image is padded
to 224x224 with black, centred, then OpenAI mean/std. Prompts: CLIP BPE, 77 tokens; the text
feature is taken at the end-of-text token (the largest id, as open_clip's ``argmax``). The score
is the cosine without the logit scale, printed x100 as the HPSv2 benchmark and the SPO paper do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ModelLoadError, local_path
from ...preference.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from ._checkpoint import error_line, read_state_dict, resolve_file
from .base import Scorer

HUB_REPO = "xswu/HPSv2"
DEFAULT_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

_BLOCK_PARTS = {  # open_clip residual block -> transformers CLIPEncoderLayer (in_proj is split apart)
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
_TOP_LEVEL = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_TOWERS = {"visual.transformer.resblocks.": "vision_model.encoder.layers.", "transformer.resblocks.": "text_model.encoder.layers."}


def convert_open_clip_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An open_clip CLIP state dict (ViT vision tower, built-in text tower; keys optionally
    prefixed ``module.``) -> the state dict of the equivalent transformers ``CLIPModel``.

    Fused ``attn.in_proj_{weight,bias}`` split into q/k/v, ``visual.proj`` / ``text_projection``
    (x @ P) transposed into Linear weights, ``attn_mask`` (a constant buffer) dropped. Raises
    ``ValueError`` naming any key it does not know.
    """
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        key = key.removeprefix("module.")
        if key == "attn_mask":
            continue
        if key in _TOP_LEVEL:
            out[_TOP_LEVEL[key]] = value
            continue
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
            continue
        tower = next((t for t in _TOWERS if key.startswith(t)), None)
        if tower is None:
            unknown.append(key)
            continue
        index, _, rest = key[len(tower):].partition(".")
        prefix = f"{_TOWERS[tower]}{index}."
        part, _, kind = rest.rpartition(".")
        if part == "attn" and kind in ("in_proj_weight", "in_proj_bias"):
            suffix = "weight" if kind == "in_proj_weight" else "bias"
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{prefix}self_attn.{name}.{suffix}"] = chunk.contiguous()
        elif part in _BLOCK_PARTS and kind in ("weight", "bias"):
            out[f"{prefix}{_BLOCK_PARTS[part]}.{kind}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not an open_clip ViT CLIP state dict: unknown keys {unknown[:5]}"
                         + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    return out


def vit_h_14_config() -> Any:
    """open_clip's ViT-H-14 (as laion/CLIP-ViT-H-14-laion2B-s32B-b79K in transformers form)."""
    from transformers import CLIPConfig

    text = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=1024,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    vision = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                  image_size=224, patch_size=14, hidden_act="gelu", projection_dim=1024)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=1024)


def resize_longest_and_pad(images: Tensor, size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                           std: Sequence[float] = OPENAI_CLIP_STD) -> Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> (B, 3, size, size): the longest side resized to ``size``
    (bicubic, antialiased), centred on black (0 before normalisation; the extra pixel of an odd
    margin goes right/bottom), then (x - mean) / std."""
    x = ((images.float() + 1) / 2).clamp(0, 1)
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    new_h, new_w = min(size, max(1, round(h * scale))), min(size, max(1, round(w * scale)))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    pad_h, pad_w = size - new_h, size - new_w
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def _build_clip(config: Any, sd: dict[str, Tensor], dtype: torch.dtype) -> Any:
    """A CLIPModel holding ``sd`` exactly (strict), built without random initialisation."""
    from transformers import CLIPModel

    with torch.device("meta"):
        model = CLIPModel(config)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    for module in model.modules():  # non-persistent buffers stayed on meta: rebuild them
        for name, buf in list(module.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if name != "position_ids":
                raise RuntimeError(f"unexpected buffer {name!r} left uninitialised")
            module.register_buffer(name, torch.arange(buf.shape[-1]).expand(buf.shape).clone(), persistent=False)
    return model.eval().requires_grad_(False)


class HPSv2Scorer(Scorer):
    name = "hpsv2"
    label = "HPSv2"
    hub_filename = "HPS_v2_compressed.pt"
    expected_range = ("100 x cosine (no logit scale), about 20-33; HPSv2 README benchmark: SD1.4 26.95; SPO "
                      "paper (HPS version not stated): SD-1.5 23.79-26.45, SDXL 26.95-31.80; not comparable "
                      "with HPSv2.1")
    weights_help = ("HPS_v2_compressed.pt (a torch checkpoint of tensors, {'state_dict': ...}, or safetensors), "
                    f"a directory holding it, or the hub id {HUB_REPO}")
    options = {
        "tokenizer": (DEFAULT_TOKENIZER, "CLIP BPE tokenizer (directory or hub id), as open_clip's ViT-H-14's"),
        "config": (None, "a transformers CLIPConfig JSON for the architecture (default: open_clip ViT-H-14)"),
    }

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.size = int(model.config.vision_config.image_size)
        self.context = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def load(cls, weights: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             **options: str) -> "HPSv2Scorer":
        from transformers import AutoTokenizer, CLIPConfig

        config_path = options.get("config")
        if config_path:
            local_path(config_path, f"{cls.name}: config", noun="file")
            try:
                config = CLIPConfig.from_json_file(config_path)
            except (OSError, ValueError, TypeError) as err:
                raise ModelLoadError(f"{cls.name}: config: {config_path!r} is not a CLIPConfig JSON: "
                                     f"{error_line(err)}") from None
        else:
            config = vit_h_14_config()
        tokenizer_id = options.get("tokenizer") or DEFAULT_TOKENIZER
        local_path(tokenizer_id, f"{cls.name}: tokenizer")
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_id)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"{cls.name}: could not load a CLIP tokenizer from {tokenizer_id!r}: "
                                 f"{error_line(err)}") from None
        path = resolve_file(weights, cls.name, cls.hub_filename)
        state = read_state_dict(path, cls.name)
        try:
            model = _build_clip(config, convert_open_clip_state_dict(state), dtype)
        except (ValueError, RuntimeError) as err:
            raise ModelLoadError(f"{cls.name}: {str(path)!r} does not fit the architecture: {error_line(err)}") from None
        return cls(model.to(device), tokenizer)

    def _text_embeddings(self, prompts: Sequence[str], device: torch.device) -> Tensor:
        unique = list(dict.fromkeys(prompts))
        ids = self.tokenizer(unique, padding="max_length", truncation=True, max_length=self.context,
                             return_tensors="pt")["input_ids"].to(device)
        hidden = self.model.text_model(input_ids=ids).last_hidden_state  # causal mask; after ln_final
        emb = self.model.text_projection(hidden[torch.arange(ids.shape[0], device=device), ids.argmax(dim=-1)])
        emb = F.normalize(emb.float(), dim=-1)
        return emb[[unique.index(p) for p in prompts]]

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        device = next(self.model.parameters()).device
        pixels = resize_longest_and_pad(images.to(device), self.size)
        pooled = self.model.vision_model(pixel_values=pixels.to(self.model.dtype)).pooler_output  # ln_post(CLS)
        img = F.normalize(self.model.visual_projection(pooled).float(), dim=-1)
        return (100 * (img * self._text_embeddings(prompts, device)).sum(dim=-1)).cpu()


SCORER = HPSv2Scorer
