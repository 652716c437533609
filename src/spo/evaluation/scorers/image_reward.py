"""ImageReward (Xu et al., 2023): a BLIP reward model fine-tuned on human preference rankings.

The image goes through BLIP's ViT-L/16; the prompt goes through BLIP's BERT-base text encoder,
which cross-attends to every image token; the encoder's first token ([CLS]) feeds a five-layer
MLP without activations. With ``r`` the MLP's output, the published score is::

    ImageReward = (r - 0.16717362830052426) / 1.0333394966054072

(the mean and standard deviation of ``r`` that the authors measured, so scores are roughly
standard normal). The prompt is tokenised by bert-base-uncased's tokenizer with BLIP's two added
tokens (``[DEC]`` as bos, ``[ENC]``), padded and truncated to 35 tokens; the image is resized
(bicubic) and centre-cropped to 224 px and normalised with OpenAI CLIP's mean and std.

The towers are transformers' :class:`~transformers.BlipVisionModel` and
:class:`~transformers.BlipTextModel` (cross-attention on, no pooler);
:func:`convert_image_reward_state_dict` maps the released ``ImageReward.pt`` (a plain
``state_dict()`` of the authors' ``ImageReward`` module) onto them. The checkpoint is read with
``torch.load(weights_only=True)`` or as safetensors (:mod:`._checkpoint`), never as pickled code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ...errors import ModelLoadError
from ...preference.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess
from ...weights import check_reference, parse_reference, read_state_dict, resolve_reference
from .base import Scorer

#: the published normalisation of the MLP output (ImageReward.py: ``self.mean``, ``self.std``)
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
#: the prompt length the authors tokenise to (padding="max_length", truncation=True)
MAX_TEXT_LENGTH = 35
#: the reward head: text hidden size -> 1024 -> 128 -> 64 -> 16 -> 1, no activations
MLP_WIDTHS = (1024, 128, 64, 16, 1)
#: dropout after the first three linear layers (inactive at scoring; kept so indices match)
MLP_DROPOUT = (0.2, 0.2, 0.1)
CHECKPOINT_NAME = "ImageReward.pt"
MED_CONFIG_NAME = "med_config.json"
VISION_CONFIG_NAME = "vision_config.json"

#: med_config.json as published with the weights (BERT-base; ``encoder_width`` is replaced by the
#: vision width, 1024, when BLIP builds the text encoder)
MED_CONFIG: dict[str, Any] = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30524,
    "encoder_width": 768,
    "add_cross_attention": True,
}

#: BLIP's ViT-L/16 at 224 px, in BlipVisionConfig's field names (timm blocks: LayerNorm eps 1e-6,
#: qkv bias, exact GELU, MLP ratio 4)
VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 16,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu",
}

# --- the key map: the authors' ImageReward module -> ImageRewardModel ---------------------------
# "{n}" is a layer index, "{p}" a parameter name (weight / bias), "{rest}" any dotted tail. The text
# encoder keeps BLIP/BERT's names, so it is a prefix swap; the ViT is renamed timm -> transformers.
_KEY_MAP: tuple[tuple[str, str], ...] = (
    ("blip.visual_encoder.cls_token", "vision.embeddings.class_embedding"),
    ("blip.visual_encoder.pos_embed", "vision.embeddings.position_embedding"),
    ("blip.visual_encoder.patch_embed.proj.{p}", "vision.embeddings.patch_embedding.{p}"),
    ("blip.visual_encoder.blocks.{n}.norm1.{p}", "vision.encoder.layers.{n}.layer_norm1.{p}"),
    ("blip.visual_encoder.blocks.{n}.attn.qkv.{p}", "vision.encoder.layers.{n}.self_attn.qkv.{p}"),
    ("blip.visual_encoder.blocks.{n}.attn.proj.{p}", "vision.encoder.layers.{n}.self_attn.projection.{p}"),
    ("blip.visual_encoder.blocks.{n}.norm2.{p}", "vision.encoder.layers.{n}.layer_norm2.{p}"),
    ("blip.visual_encoder.blocks.{n}.mlp.fc1.{p}", "vision.encoder.layers.{n}.mlp.fc1.{p}"),
    ("blip.visual_encoder.blocks.{n}.mlp.fc2.{p}", "vision.encoder.layers.{n}.mlp.fc2.{p}"),
    ("blip.visual_encoder.norm.{p}", "vision.post_layernorm.{p}"),
    ("blip.text_encoder.{rest}", "text.{rest}"),
    ("mlp.layers.{n}.{p}", "mlp.{n}.{p}"),
)
#: keys of the released module that scoring does not use: BLIP's ITC projections (the
#: authors' BLIP_Pretrain keeps them) and the text position-id buffer older BERT code saved
UNUSED_KEYS: tuple[str, ...] = (
    "blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight", "blip.text_proj.bias",
    "blip.text_encoder.embeddings.position_ids",
)
_PLACEHOLDERS = {"n": r"(?P<n>\d+)", "p": r"(?P<p>weight|bias)", "rest": r"(?P<rest>.+)"}


def _pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{\w+\})", template)
    return re.compile("".join(_PLACEHOLDERS[s[1:-1]] if s.startswith("{") else re.escape(s) for s in parts) + "$")


_FORWARD = tuple((_pattern(src), dst) for src, dst in _KEY_MAP)
_BACKWARD = tuple((_pattern(dst), src) for src, dst in _KEY_MAP)


def _rename(key: str, rules: tuple[tuple[re.Pattern[str], str], ...]) -> str | None:
    for pattern, template in rules:
        match = pattern.match(key)
        if match:
            return template.format(**match.groupdict())
    return None


def original_key(key: str) -> str:
    """The released checkpoint's name for a key of :class:`ImageRewardModel` (for messages)."""
    return _rename(key, _BACKWARD) or key


def convert_image_reward_state_dict(original: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The released ImageReward state dict (keys ``blip.visual_encoder.*``, ``blip.text_encoder.*``,
    ``mlp.layers.*``) -> :class:`ImageRewardModel`'s keys, tensors unchanged (the fused ``qkv`` of
    the ViT stays fused: transformers' BLIP attention keeps the same layout).

    A uniform ``module.`` prefix (a DistributedDataParallel save) is stripped; :data:`UNUSED_KEYS`
    are dropped; any other key the map does not know raises :class:`ModelLoadError`.
    """
    keys = list(original)
    strip = "module." if keys and all(k.startswith("module.") for k in keys) else ""
    converted: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in original.items():
        key = key[len(strip):]
        if key in UNUSED_KEYS:
            continue
        new = _rename(key, _FORWARD)
        if new is None:
            unknown.append(key)
        else:
            converted[new] = value
    if unknown:
        raise ModelLoadError(f"image_reward: {len(unknown)} unexpected key(s) in the checkpoint, not part of "
                             f"ImageReward: {sorted(unknown)[:6]}")
    return converted


# --- configs --------------------------------------------------------------------------------------

def vision_config(overrides: Mapping[str, Any] | None = None) -> Any:
    """The BlipVisionConfig of BLIP's ViT-L/16, with ``overrides`` (BlipVisionConfig field names;
    ``intermediate_size`` defaults to 4 x ``hidden_size``, the timm MLP ratio)."""
    from transformers import BlipVisionConfig

    values = dict(VISION_CONFIG)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(VISION_CONFIG))
    if unknown:
        raise ModelLoadError(f"image_reward: vision_config: unknown field(s) {unknown}; known: {sorted(VISION_CONFIG)}")
    if "hidden_size" in overrides and "intermediate_size" not in overrides:
        overrides["intermediate_size"] = 4 * int(overrides["hidden_size"])
    values.update(overrides)
    return BlipVisionConfig(**values)


def text_config(med: Mapping[str, Any], encoder_width: int) -> Any:
    """The BlipTextConfig for BLIP's text encoder from a med_config (BertConfig fields), with
    cross-attention to ``encoder_width``-wide image tokens (BLIP overrides ``encoder_width``)."""
    from transformers import BlipTextConfig

    if med.get("position_embedding_type", "absolute") != "absolute":
        raise ModelLoadError(f"image_reward: med_config: position_embedding_type "
                             f"{med['position_embedding_type']!r} is not supported (ImageReward uses 'absolute')")
    if not med.get("add_cross_attention", True):
        raise ModelLoadError("image_reward: med_config: add_cross_attention is false; ImageReward's text encoder "
                             "cross-attends to the image")
    try:
        return BlipTextConfig(
            vocab_size=int(med["vocab_size"]), hidden_size=int(med["hidden_size"]),
            encoder_hidden_size=int(encoder_width), intermediate_size=int(med["intermediate_size"]),
            num_hidden_layers=int(med["num_hidden_layers"]), num_attention_heads=int(med["num_attention_heads"]),
            max_position_embeddings=int(med["max_position_embeddings"]), hidden_act=med.get("hidden_act", "gelu"),
            layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)), pad_token_id=int(med.get("pad_token_id", 0)),
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            is_decoder=True,  # builds the cross-attention blocks; forward runs bidirectionally (is_decoder=False)
            use_cache=False,
        )
    except KeyError as err:
        raise ModelLoadError(f"image_reward: med_config lacks the field {err.args[0]!r}") from err


# --- the model ------------------------------------------------------------------------------------

class ImageRewardModel(nn.Module):
    """BLIP ViT + cross-attending BLIP text encoder + reward MLP; ``forward`` returns the raw MLP
    output ``r`` per (image, prompt) pair, before the published normalisation."""

    def __init__(self, vision: Any, text: Any) -> None:
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision)
        self.text = BlipTextModel(text, add_pooling_layer=False)
        widths = (text.hidden_size, *MLP_WIDTHS)
        layers: list[nn.Module] = []
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(w_in, w_out))
            if i < len(MLP_DROPOUT):
                layers.append(nn.Dropout(MLP_DROPOUT[i]))
        self.mlp = nn.Sequential(*layers)  # indices 0, 2, 4, 6, 7 are the linear layers, as released

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        image_tokens = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=image_tokens.device)
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_tokens,
                         encoder_attention_mask=image_mask, is_decoder=False).last_hidden_state
        first = text[:, 0, :]
        return self.mlp(first.to(self.mlp[0].weight.dtype)).squeeze(-1)


# --- loading --------------------------------------------------------------------------------------

_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json")


def _config_file(ref: str, what: str) -> str:
    """A JSON option's file: local as it is (:func:`_read_json` says what is wrong with it), or a
    file of a hub repo (``REPO_ID/FILE``) fetched."""
    return ref if parse_reference(ref).local is not None else resolve_reference(ref, f"image_reward: {what}", "file")


def _checkpoint_in(directory: Path) -> Path:
    for name in (CHECKPOINT_NAME, "ImageReward.safetensors"):
        if (directory / name).is_file():
            return directory / name
    found = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in _CHECKPOINT_SUFFIXES)
    if len(found) == 1:
        return found[0]
    if not found:
        raise ModelLoadError(f"image_reward: no {CHECKPOINT_NAME} or .safetensors checkpoint in {str(directory)!r}")
    raise ModelLoadError(f"image_reward: several checkpoints in {str(directory)!r} ({[p.name for p in found]}); "
                         "name the file")


def _read_json(path: str | Path, what: str) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelLoadError(f"image_reward: {what}: no such file {str(p)!r}")
    try:
        value = json.loads(p.read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"image_reward: {what}: could not read {str(p)!r} as JSON: {err}") from err
    if not isinstance(value, dict):
        raise ModelLoadError(f"image_reward: {what}: {str(p)!r} is not a JSON object")
    return value


def load_tokenizer(source: str, vocab_size: int) -> Any:
    """bert-base-uncased's tokenizer from a directory or hub id, with BLIP's added tokens ``[DEC]``
    (bos) and ``[ENC]`` (as BLIP's ``init_tokenizer``), checked to give exactly the text encoder's
    ``vocab_size`` ids (30522 + 2 for the released model)."""
    from transformers import BertTokenizer

    if parse_reference(source).local is None:  # a hub id as it is; a folder of a hub repo fetched
        source = resolve_reference(source, "image_reward: tokenizer", "directory")
    try:
        tokenizer = BertTokenizer.from_pretrained(source)
    except Exception as err:  # noqa: BLE001 - missing files, no network, wrong format: one message
        raise ModelLoadError(f"image_reward: tokenizer: could not load a BERT tokenizer from {source!r}: "
                             f"{type(err).__name__}: {str(err).strip()[:200]}") from err
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) != vocab_size:
        raise ModelLoadError(f"image_reward: tokenizer {source!r} has {len(tokenizer)} tokens with [DEC] and [ENC], "
                             f"the text encoder {vocab_size}; expected bert-base-uncased's tokenizer")
    return tokenizer


def load_image_reward_model(state: Mapping[str, Tensor], med: Mapping[str, Any],
                            vision_overrides: Mapping[str, Any] | None = None) -> ImageRewardModel:
    """An :class:`ImageRewardModel` (float32, eval) holding the released state dict ``state``;
    every key it needs must be there and nothing else but :data:`UNUSED_KEYS`."""
    vision = vision_config(vision_overrides)
    model = ImageRewardModel(vision, text_config(med, vision.hidden_size))
    converted = convert_image_reward_state_dict(state)
    expected = model.state_dict()
    missing = sorted(original_key(k) for k in set(expected) - set(converted))
    unexpected = sorted(original_key(k) for k in set(converted) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(
            f"image_reward: the checkpoint does not fit ImageReward (vision {vision.hidden_size} wide x "
            f"{vision.num_hidden_layers}, text {med.get('hidden_size')} wide x {med.get('num_hidden_layers')}): "
            f"{len(missing)} missing key(s) {missing[:6]}, {len(unexpected)} unexpected key(s) {unexpected[:6]}"
        )
    wrong = [f"{original_key(k)} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
             for k, v in converted.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise ModelLoadError(f"image_reward: shape mismatch (checkpoint vs config) for {wrong[:4]}; "
                             "check med_config / vision_config")
    model.load_state_dict(converted, strict=True)
    return model.eval().requires_grad_(False)


class ImageRewardScorer(Scorer):
    """ImageReward of (image, prompt) pairs: ``(MLP(text_encoder(prompt, ViT(image))[CLS]) - mean) / std``."""

    name: ClassVar[str] = "image_reward"
    label: ClassVar[str] = "ImageReward"
    expected_range: ClassVar[str] = (
        "roughly standard normal by construction (normalised by the published mean/std); "
        "SPO paper Table 1-2: SD-1.5 -0.163...0.171, SDXL 0.538...1.080"
    )
    weights_help: ClassVar[str] = (
        "ImageReward.pt (or a .safetensors with the same keys), a directory holding one (optionally with "
        "med_config.json and bert-base-uncased's tokenizer files), a hub id (THUDM/ImageReward: fetches "
        "ImageReward.pt and med_config.json) or REPO_ID/FILE (that file, and med_config.json beside it); needs tokenizer=DIR_OR_HUB_ID (bert-base-uncased's tokenizer) "
        "unless the weights directory holds one"
    )
    options: ClassVar[dict[str, tuple[str | None, str]]] = {
        "tokenizer": (None, "bert-base-uncased's tokenizer: a local directory (vocab.txt / tokenizer.json) or a hub "
                            "id (bert-base-uncased); required unless the weights directory holds one; BLIP's [DEC] "
                            "and [ENC] tokens are added"),
        "med_config": (None, "path to the text encoder's med_config.json; default: med_config.json beside the "
                             "weights (or fetched with a hub id), else the published values built in"),
        "vision_config": (None, "path to a JSON of BlipVisionConfig fields overriding BLIP's ViT-L/16 at 224 px "
                                "(default; vision_config.json beside the weights is read too); for tests and "
                                "variants"),
    }

    def __init__(self, model: ImageRewardModel, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = int(model.vision.config.image_size)

    @classmethod
    def load(cls, weights: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             **options: str) -> "ImageRewardScorer":
        unknown = sorted(set(options) - set(cls.options))
        if unknown:
            raise ModelLoadError(f"image_reward: unknown option(s) {unknown}; known: {sorted(cls.options)}")
        tokenizer_source = options.get("tokenizer") or None
        med_path = options.get("med_config") or None
        vision_path = options.get("vision_config") or None

        reference = check_reference(weights, "image_reward")
        local = reference.local
        folder: Path | None = None
        if local is None:  # a hub id: ImageReward.pt; REPO_ID/FILE: that file; med_config.json beside, unless given
            checkpoint = Path(resolve_reference(weights, "image_reward", "file", filename=CHECKPOINT_NAME))
            if med_path is None:
                inside = reference.path_in_repo.rpartition("/")[0] if reference.path_in_repo else ""
                try:
                    med_path = resolve_reference(f"{reference.repo_id}/{inside + '/' if inside else ''}{MED_CONFIG_NAME}",
                                                 "image_reward", "file")
                except ModelLoadError:
                    med_path = None  # the built-in values are the published med_config.json
        elif local.is_dir():
            folder = local
            checkpoint = _checkpoint_in(local)
        else:
            checkpoint = local
            folder = local.parent
        if folder is not None:
            if med_path is None and (folder / MED_CONFIG_NAME).is_file():
                med_path = str(folder / MED_CONFIG_NAME)
            if vision_path is None and (folder / VISION_CONFIG_NAME).is_file():
                vision_path = str(folder / VISION_CONFIG_NAME)
            if tokenizer_source is None and any((folder / f).is_file() for f in _TOKENIZER_FILES):
                tokenizer_source = str(folder)
        if tokenizer_source is None:
            raise ModelLoadError(f"image_reward: no tokenizer for {weights!r}: pass tokenizer=DIR_OR_HUB_ID "
                                 "(bert-base-uncased's tokenizer), or put its files beside the weights")

        med = _read_json(_config_file(med_path, "med_config"), "med_config") if med_path else dict(MED_CONFIG)
        vision_overrides = _read_json(_config_file(vision_path, "vision_config"), "vision_config") if vision_path else None
        tokenizer = load_tokenizer(tokenizer_source, int(med.get("vocab_size", MED_CONFIG["vocab_size"])))
        state = read_state_dict(checkpoint, "image_reward")
        model = load_image_reward_model(state, med, vision_overrides)
        del state
        model = model.to(device=device, dtype=dtype)
        # the authors score the [CLS] feature in float32 (``.float()`` before the MLP)
        model.mlp.to(torch.float64 if dtype == torch.float64 else torch.float32)
        return cls(model, tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.vision.embeddings.patch_embedding.weight.dtype

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(input ids, attention mask), each (B, 35): [CLS] prompt [SEP], padded / truncated."""
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH,
                                return_tensors="pt")
        return tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)

    def raw_reward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """The MLP output ``r`` before the published normalisation, (B,)."""
        pixels = clip_preprocess(images.to(self.device), self.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        input_ids, attention_mask = self.tokenize(prompts)
        return self.model(pixels.to(self.dtype), input_ids, attention_mask)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """The published ImageReward, (B,) float64 on the CPU."""
        with torch.no_grad():
            raw = self.raw_reward(images, prompts)
        return (raw.double().cpu() - REWARD_MEAN) / REWARD_STD


SCORER = ImageRewardScorer

__all__ = ["MED_CONFIG", "REWARD_MEAN", "REWARD_STD", "SCORER", "UNUSED_KEYS", "VISION_CONFIG", "ImageRewardModel",
           "ImageRewardScorer", "convert_image_reward_state_dict", "load_image_reward_model", "original_key"]
