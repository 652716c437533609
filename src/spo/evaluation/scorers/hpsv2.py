"""HPSv2 (Human Preference Score v2): score = 100 * cos(image embedding, text embedding).

An open_clip ViT-H-14 fine-tuned on human preferences (hub ``xswu/HPSv2``), run here as a
transformers ``CLIPModel`` after converting its state dict (:func:`convert_open_clip_state_dict`),
so neither open_clip nor the hpsv2 package is needed. As HPSv2's ``preprocess_val``
(open_clip's ``ResizeMaxSize``): the longest side is resized to 224 (bicubic), the image is padded
to 224x224 with black, centred, then OpenAI mean/std. Prompts: CLIP BPE, 77 tokens; the text
feature is taken at the end-of-text token (the largest id, as open_clip's ``argmax``). The score
is the cosine without the logit scale, printed x100 as the HPSv2 benchmark and the SPO paper do.

Option ``backend=open_clip`` instead runs open_clip itself (``pip install 'spo-diffusion[eval]'``;
open_clip needs a torchvision built for the installed torch): ``open_clip.create_model_and_transforms(
model, pretrained=<the checkpoint file>, image_resize_mode='longest')`` (open_clip's own loader:
``torch.load(weights_only=True)``, or safetensors for a ``*.safetensors`` name; ``'state_dict'``
unwrapped, ``module.`` stripped, strict), ``open_clip.get_tokenizer(model)``, and open_clip's
validation transform on PIL images: each image in [-1, 1] is quantised to uint8 as diffusers'
``numpy_to_pil`` does (``round(255 * clamp(x / 2 + 0.5, 0, 1))``), then resized (PIL bicubic, the
longest side to the model's size), padded with black (centred), converted to a tensor and
normalised. That is what the hpsv2 package does with image files; the transformers backend skips
the uint8 round trip and resizes float tensors, so the two differ slightly (up to 0.03 on the
x100 scale for the tests' tiny 32-px model; the networks themselves agree to ~1e-5).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ModelLoadError
from ...preference.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from ...weights import error_line, read_state_dict, resolve_reference
from .base import Scorer

HUB_REPO = "xswu/HPSv2"
DEFAULT_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
DEFAULT_OPEN_CLIP_MODEL = "ViT-H-14"
BACKENDS = ("transformers", "open_clip")
_OPEN_CLIP_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

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
                    f"a directory holding it, the hub id {HUB_REPO}, or REPO_ID/FILE of a hub repo")
    options = {
        "backend": ("transformers", "transformers (the checkpoint converted to a transformers CLIPModel; no open_clip "
                                    "needed) or open_clip (open_clip's own loader, tokenizer and PIL preprocessing; "
                                    "pip install 'spo-diffusion[eval]')"),
        "tokenizer": (DEFAULT_TOKENIZER, "transformers backend: CLIP BPE tokenizer (directory or hub id), as open_clip's "
                                         "ViT-H-14's"),
        "config": (None, "transformers backend: a transformers CLIPConfig JSON for the architecture (default: open_clip "
                         "ViT-H-14)"),
        "model": (None, f"open_clip backend: the open_clip model name (default {DEFAULT_OPEN_CLIP_MODEL}, or the file "
                        "stem of open_clip_config)"),
        "open_clip_config": (None, "open_clip backend: an open_clip model-config JSON (embed_dim, vision_cfg, text_cfg), "
                                   "registered with open_clip.add_model_config under its file stem"),
    }

    def __init__(self, model: Any, tokenizer: Any, preprocess: Any = None) -> None:
        """``preprocess`` None: ``model`` is a transformers CLIPModel and ``tokenizer`` a transformers
        tokenizer; otherwise ``model`` is an open_clip CLIP, ``tokenizer`` open_clip's and
        ``preprocess`` open_clip's validation transform (PIL image -> normalised tensor)."""
        self.model, self.tokenizer, self.preprocess = model, tokenizer, preprocess
        self.backend = "transformers" if preprocess is None else "open_clip"
        if preprocess is None:
            self.size = int(model.config.vision_config.image_size)
            self.context = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def load(cls, weights: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             **options: str) -> "HPSv2Scorer":
        backend = options.get("backend") or "transformers"
        if backend not in BACKENDS:
            raise ModelLoadError(f"{cls.name}: backend {backend!r} is not one of {list(BACKENDS)}")
        if backend == "open_clip":
            return cls._load_open_clip(weights, device=device, dtype=dtype, **options)
        misplaced = [k for k in ("model", "open_clip_config") if options.get(k)]
        if misplaced:
            raise ModelLoadError(f"{cls.name}: option(s) {misplaced} only apply to backend=open_clip")

        from transformers import AutoTokenizer, CLIPConfig

        config_path = options.get("config")
        if config_path:
            config_path = resolve_reference(config_path, f"{cls.name}: config", "file")
            try:
                config = CLIPConfig.from_json_file(config_path)
            except (OSError, ValueError, TypeError) as err:
                raise ModelLoadError(f"{cls.name}: config: {config_path!r} is not a CLIPConfig JSON: "
                                     f"{error_line(err)}") from None
        else:
            config = vit_h_14_config()
        tokenizer_id = options.get("tokenizer") or DEFAULT_TOKENIZER
        tokenizer_id = resolve_reference(tokenizer_id, f"{cls.name}: tokenizer", "directory")
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_id)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"{cls.name}: could not load a CLIP tokenizer from {tokenizer_id!r}: "
                                 f"{error_line(err)}") from None
        path = Path(resolve_reference(weights, cls.name, "file", filename=cls.hub_filename))
        state = read_state_dict(path, cls.name)
        try:
            model = _build_clip(config, convert_open_clip_state_dict(state), dtype)
        except (ValueError, RuntimeError) as err:
            raise ModelLoadError(f"{cls.name}: {str(path)!r} does not fit the architecture: {error_line(err)}") from None
        return cls(model.to(device), tokenizer)

    @classmethod
    def _load_open_clip(cls, weights: str, *, device: str | torch.device, dtype: torch.dtype,
                        **options: str) -> "HPSv2Scorer":
        what = f"{cls.name} (backend=open_clip)"
        if options.get("config"):
            raise ModelLoadError(f"{what}: config is a transformers CLIPConfig; give open_clip's model config as "
                                 "open_clip_config")
        if (options.get("tokenizer") or DEFAULT_TOKENIZER) != DEFAULT_TOKENIZER:
            raise ModelLoadError(f"{what}: the tokenizer option applies to the transformers backend; open_clip's "
                                 "backend uses open_clip.get_tokenizer(model)")
        if dtype not in _OPEN_CLIP_PRECISION:
            raise ModelLoadError(f"{what}: dtype {dtype} has no open_clip precision (float32, float16, bfloat16)")
        open_clip = _import_open_clip(what)
        model_name = options.get("model")
        config_path = options.get("open_clip_config")
        if config_path:
            path = Path(resolve_reference(config_path, f"{what}: open_clip_config", "file"))
            try:
                cfg = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise ModelLoadError(f"{what}: open_clip_config: {config_path!r} is not JSON: {error_line(err)}") from None
            if not (isinstance(cfg, dict) and all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg"))):
                raise ModelLoadError(f"{what}: open_clip_config: {config_path!r} is not an open_clip model config "
                                     "(needs embed_dim, vision_cfg and text_cfg)")
            if model_name and model_name != path.stem:
                raise ModelLoadError(f"{what}: open_clip_config {config_path!r} registers the model {path.stem!r}, "
                                     f"not model={model_name!r}")
            open_clip.add_model_config(path)  # open_clip's registry: the file stem names the model
            model_name = path.stem
        model_name = model_name or DEFAULT_OPEN_CLIP_MODEL
        checkpoint = Path(resolve_reference(weights, cls.name, "file", filename=cls.hub_filename))
        if "image_resize_mode" not in inspect.signature(open_clip.create_model_and_transforms).parameters:
            raise ModelLoadError(f"{what}: open_clip {getattr(open_clip, '__version__', '?')} has no image_resize_mode "
                                 "(HPS's longest-side resize); pip install 'spo-diffusion[eval]'")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=str(checkpoint), precision=_OPEN_CLIP_PRECISION[dtype], device=device,
                image_resize_mode="longest", output_dict=True)
            tokenizer = open_clip.get_tokenizer(model_name)
        except Exception as err:  # noqa: BLE001 - open_clip raises RuntimeError, KeyError, UnpicklingError, ...
            raise ModelLoadError(f"{what}: open_clip could not load {str(checkpoint)!r} as {model_name!r}: "
                                 f"{error_line(err)}") from None
        return cls(model.eval().requires_grad_(False), tokenizer, preprocess)

    def _text_embeddings(self, prompts: Sequence[str], device: torch.device) -> Tensor:
        unique = list(dict.fromkeys(prompts))
        if self.backend == "open_clip":
            emb = self.model.encode_text(self.tokenizer(unique).to(device))
        else:
            ids = self.tokenizer(unique, padding="max_length", truncation=True, max_length=self.context,
                                 return_tensors="pt")["input_ids"].to(device)
            hidden = self.model.text_model(input_ids=ids).last_hidden_state  # causal mask; after ln_final
            emb = self.model.text_projection(hidden[torch.arange(ids.shape[0], device=device), ids.argmax(dim=-1)])
        emb = F.normalize(emb.float(), dim=-1)
        return emb[[unique.index(p) for p in prompts]]

    def _image_embeddings(self, images: Tensor, device: torch.device) -> Tensor:
        if self.backend == "open_clip":
            pixels = torch.stack([self.preprocess(image) for image in to_pil(images)])
            dtype = next(self.model.parameters()).dtype
            emb = self.model.encode_image(pixels.to(device=device, dtype=dtype))
        else:
            pixels = resize_longest_and_pad(images.to(device), self.size)
            pooled = self.model.vision_model(pixel_values=pixels.to(self.model.dtype)).pooler_output  # ln_post(CLS)
            emb = self.model.visual_projection(pooled)
        return F.normalize(emb.float(), dim=-1)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        device = next(self.model.parameters()).device
        img = self._image_embeddings(images, device)
        return (100 * (img * self._text_embeddings(prompts, device)).sum(dim=-1)).cpu()


def to_pil(images: Tensor) -> list[Any]:
    """Images in [-1, 1] (B, 3, H, W) -> RGB PIL images, quantised as diffusers' ``numpy_to_pil``:
    ``round(255 * clamp(x / 2 + 0.5, 0, 1))``."""
    from PIL import Image

    x = (images.detach().float().cpu() / 2 + 0.5).clamp(0, 1)
    arrays = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arrays]


def _import_open_clip(what: str) -> Any:
    try:
        import open_clip
    except Exception as err:  # noqa: BLE001 - missing, or a torchvision that does not match torch
        raise ModelLoadError(f"{what}: open_clip is not importable ({type(err).__name__}: {error_line(err)}); "
                             "pip install 'spo-diffusion[eval]' (open_clip_torch; it needs a torchvision built "
                             "for the installed torch)") from None
    return open_clip


SCORER = HPSv2Scorer
