"""ImageReward scorer: a tiny random checkpoint in the authors' key layout, scored through
``ImageRewardScorer.load`` and checked against an independent float64 forward written here with
plain torch ops (timm ViT, BLIP's BERT with cross-attention, MLP without activations)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from spo.errors import ModelLoadError
from spo.evaluation.scorers import ScorerSpec, scorer_class
from spo.preference.preprocess import clip_preprocess
from spo.evaluation.scorers.image_reward import (
    MAX_TEXT_LENGTH, REWARD_MEAN, REWARD_STD, UNUSED_KEYS, ImageRewardScorer, convert_image_reward_state_dict,
    load_image_reward_model,
)

WORDS = ["a", "an", "the", "of", "on", "in", "photo", "painting", "cat", "dog", "red", "blue", "green",
         "sitting", "grass", "sky", "big", "small", ",", "."]
VISION = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 16}
V_WIDTH, V_LAYERS, V_HEADS, IMAGE, PATCH = 32, 2, 2, 32, 16
T_WIDTH, T_LAYERS, T_HEADS, T_INTER, T_POSITIONS = 32, 2, 2, 48, 40
MLP = (T_WIDTH, 1024, 128, 64, 16, 1)
PROMPTS = [
    "a photo of a red cat sitting on the grass",
    "A Blue DOG in the sky , zebra",  # upper case and an unknown word
    " ".join(["a big green painting of the small blue sky ."] * 5),  # 50 words: truncated to 35 tokens
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bert-tokenizer")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return folder


def vocab_size() -> int:
    return 5 + len(WORDS) + 2  # bert's specials, the words, BLIP's [DEC] and [ENC]


def med_config() -> dict:
    return {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "hidden_size": T_WIDTH, "initializer_range": 0.02,
            "intermediate_size": T_INTER, "layer_norm_eps": 1e-12, "max_position_embeddings": T_POSITIONS,
            "model_type": "bert", "num_attention_heads": T_HEADS, "num_hidden_layers": T_LAYERS, "pad_token_id": 0,
            "type_vocab_size": 2, "vocab_size": vocab_size(), "encoder_width": 768, "add_cross_attention": True}


def original_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the keys of the authors' ``ImageReward`` module's ``state_dict()``."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def linear(prefix: str, n_in: int, n_out: int) -> None:
        sd[f"{prefix}.weight"] = rand(n_out, n_in, scale=1.2 / math.sqrt(n_in))
        sd[f"{prefix}.bias"] = rand(n_out, scale=0.1)

    def norm(prefix: str, width: int) -> None:
        sd[f"{prefix}.weight"] = 1 + rand(width, scale=0.2)
        sd[f"{prefix}.bias"] = rand(width, scale=0.2)

    sd: dict[str, torch.Tensor] = {}
    v = "blip.visual_encoder"
    sd[f"{v}.cls_token"] = rand(1, 1, V_WIDTH)
    sd[f"{v}.pos_embed"] = rand(1, (IMAGE // PATCH) ** 2 + 1, V_WIDTH, scale=0.5)
    sd[f"{v}.patch_embed.proj.weight"] = rand(V_WIDTH, 3, PATCH, PATCH, scale=1 / math.sqrt(3 * PATCH * PATCH))
    sd[f"{v}.patch_embed.proj.bias"] = rand(V_WIDTH, scale=0.1)
    for i in range(V_LAYERS):
        b = f"{v}.blocks.{i}"
        norm(f"{b}.norm1", V_WIDTH)
        linear(f"{b}.attn.qkv", V_WIDTH, 3 * V_WIDTH)
        linear(f"{b}.attn.proj", V_WIDTH, V_WIDTH)
        norm(f"{b}.norm2", V_WIDTH)
        linear(f"{b}.mlp.fc1", V_WIDTH, 4 * V_WIDTH)
        linear(f"{b}.mlp.fc2", 4 * V_WIDTH, V_WIDTH)
    norm(f"{v}.norm", V_WIDTH)
    t = "blip.text_encoder"
    sd[f"{t}.embeddings.position_ids"] = torch.arange(T_POSITIONS).expand(1, -1).contiguous()
    sd[f"{t}.embeddings.word_embeddings.weight"] = rand(vocab_size(), T_WIDTH)
    sd[f"{t}.embeddings.position_embeddings.weight"] = rand(T_POSITIONS, T_WIDTH, scale=0.5)
    norm(f"{t}.embeddings.LayerNorm", T_WIDTH)
    for i in range(T_LAYERS):
        b = f"{t}.encoder.layer.{i}"
        for block, kv_width in (("attention", T_WIDTH), ("crossattention", V_WIDTH)):
            linear(f"{b}.{block}.self.query", T_WIDTH, T_WIDTH)
            linear(f"{b}.{block}.self.key", kv_width, T_WIDTH)
            linear(f"{b}.{block}.self.value", kv_width, T_WIDTH)
            linear(f"{b}.{block}.output.dense", T_WIDTH, T_WIDTH)
            norm(f"{b}.{block}.output.LayerNorm", T_WIDTH)
        linear(f"{b}.intermediate.dense", T_WIDTH, T_INTER)
        linear(f"{b}.output.dense", T_INTER, T_WIDTH)
        norm(f"{b}.output.LayerNorm", T_WIDTH)
    linear("blip.vision_proj", V_WIDTH, 8)  # BLIP_Pretrain's ITC projections: saved, unused
    linear("blip.text_proj", T_WIDTH, 8)
    for j, (n_in, n_out) in zip((0, 2, 4, 6, 7), zip(MLP[:-1], MLP[1:])):
        linear(f"mlp.layers.{j}", n_in, n_out)
    return sd


# --- the reference forward, float64, original layout ---------------------------------------------

def ref_pixels(images: torch.Tensor) -> torch.Tensor:
    """Resize the short side to IMAGE (bicubic, antialiased), centre crop, OpenAI CLIP normalisation."""
    x = images.double()
    h, w = x.shape[-2:]
    s = IMAGE / min(h, w)
    nh, nw = max(IMAGE, round(h * s)), max(IMAGE, round(w * s))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - IMAGE) // 2, (nw - IMAGE) // 2
    x = ((x[..., top:top + IMAGE, left:left + IMAGE] + 1) / 2).clamp(0, 1)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    b, n, c = q.shape
    split = lambda x: x.reshape(b, x.shape[1], heads, c // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(c // heads)
    if bias is not None:
        scores = scores + bias
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, c)


def ref_reward(sd: dict[str, torch.Tensor], pixels: torch.Tensor, ids: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
    """The MLP output for preprocessed ``pixels`` (B, 3, IMAGE, IMAGE) and token ids / mask."""
    p = {k: v.double() for k, v in sd.items()}
    lin = lambda x, name: F.linear(x, p[f"{name}.weight"], p[f"{name}.bias"])  # noqa: E731
    ln = lambda x, name, eps: F.layer_norm(x, x.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"], eps)  # noqa: E731
    # timm ViT (BLIP vit.py): pre-norm blocks, fused qkv, exact GELU, final norm, eps 1e-6
    v = "blip.visual_encoder"
    x = F.conv2d(pixels.double(), p[f"{v}.patch_embed.proj.weight"], p[f"{v}.patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([p[f"{v}.cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + p[f"{v}.pos_embed"]
    for i in range(V_LAYERS):
        b = f"{v}.blocks.{i}"
        q, k, val = lin(ln(x, f"{b}.norm1", 1e-6), f"{b}.attn.qkv").chunk(3, dim=-1)
        x = x + lin(attention(q, k, val, V_HEADS), f"{b}.attn.proj")
        x = x + lin(F.gelu(lin(ln(x, f"{b}.norm2", 1e-6), f"{b}.mlp.fc1")), f"{b}.mlp.fc2")
    image_tokens = ln(x, f"{v}.norm", 1e-6)
    # BLIP med.py BERT: embeddings + LayerNorm, post-norm self-attention (padding masked with
    # -10000), cross-attention to every image token, GELU feed-forward; eps 1e-12
    t = "blip.text_encoder"
    h = p[f"{t}.embeddings.word_embeddings.weight"][ids] + p[f"{t}.embeddings.position_embeddings.weight"][:ids.shape[1]]
    h = ln(h, f"{t}.embeddings.LayerNorm", 1e-12)
    pad_bias = (1.0 - mask.double())[:, None, None, :] * -10000.0
    for i in range(T_LAYERS):
        b = f"{t}.encoder.layer.{i}"
        a = f"{b}.attention"
        h = ln(lin(attention(lin(h, f"{a}.self.query"), lin(h, f"{a}.self.key"), lin(h, f"{a}.self.value"), T_HEADS,
                             pad_bias), f"{a}.output.dense") + h, f"{a}.output.LayerNorm", 1e-12)
        c = f"{b}.crossattention"
        h = ln(lin(attention(lin(h, f"{c}.self.query"), lin(image_tokens, f"{c}.self.key"),
                             lin(image_tokens, f"{c}.self.value"), T_HEADS), f"{c}.output.dense") + h,
               f"{c}.output.LayerNorm", 1e-12)
        h = ln(lin(F.gelu(lin(h, f"{b}.intermediate.dense")), f"{b}.output.dense") + h, f"{b}.output.LayerNorm", 1e-12)
    r = h[:, 0]
    for j in (0, 2, 4, 6, 7):  # no activations between the linear layers
        r = lin(r, f"mlp.layers.{j}")
    return r.squeeze(-1)


def ref_score(sd, images, prompts, tokenizer) -> torch.Tensor:
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH, return_tensors="pt")
    return (ref_reward(sd, ref_pixels(images), tokens["input_ids"], tokens["attention_mask"]) - REWARD_MEAN) / REWARD_STD


class Opaque:
    """Pickled as code: torch.load(weights_only=True) refuses it."""


# --- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return original_state_dict()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, state) -> dict[str, Path]:
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("image-reward")
    torch.save(state, folder / "ImageReward.pt")
    safe = folder / "safe"
    safe.mkdir()
    save_file(state, str(safe / "ImageReward.safetensors"))
    (folder / "med_config.json").write_text(json.dumps(med_config()))
    (folder / "vision.json").write_text(json.dumps(VISION))
    return {"dir": folder, "pt": folder / "ImageReward.pt", "safetensors": safe / "ImageReward.safetensors",
            "med": folder / "med_config.json", "vision": folder / "vision.json"}


@pytest.fixture(scope="module")
def scorer(files, tokenizer_dir) -> ImageRewardScorer:
    return ImageRewardScorer.load(str(files["pt"]), tokenizer=str(tokenizer_dir), vision_config=str(files["vision"]))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, 40, 56, generator=torch.Generator().manual_seed(1)) * 2 - 1


# --- tests ----------------------------------------------------------------------------------------

def test_registered() -> None:
    klass = scorer_class("image_reward")
    assert klass is ImageRewardScorer and klass.label == "ImageReward"
    assert set(klass.options) == {"tokenizer", "med_config", "vision_config"}
    assert "tokenizer=" in klass.weights_help


def test_tokenizer_adds_blip_tokens_and_truncates(scorer) -> None:
    tok = scorer.tokenizer
    assert len(tok) == vocab_size()
    assert tok.bos_token == "[DEC]" and tok.convert_tokens_to_ids("[ENC]") == vocab_size() - 1
    ids, mask = scorer.tokenize(PROMPTS)
    assert ids.shape == mask.shape == (3, MAX_TEXT_LENGTH)
    assert (ids[:, 0] == tok.cls_token_id).all()  # [CLS] leads: no [ENC] substitution at scoring
    assert mask[2].all() and ids[2, -1] == tok.sep_token_id  # the long prompt fills all 35 positions
    assert not mask[0].all() and not mask[1].all()
    assert (ids[1] == tok.unk_token_id).any()


@pytest.mark.parametrize("source", ["pt", "safetensors"])
def test_matches_float64_reference(source, files, tokenizer_dir, state, images) -> None:
    scorer = ImageRewardScorer.load(str(files[source]), tokenizer=str(tokenizer_dir), med_config=str(files["med"]),
                                    vision_config=str(files["vision"]))
    got = scorer(images, PROMPTS)
    want = ref_score(state, images, PROMPTS, scorer.tokenizer)
    assert got.dtype == torch.float64 and got.shape == (3,)
    assert torch.allclose(got.double(), want, atol=2e-5, rtol=1e-5), (got, want)
    assert want.std() > 0.05  # the scores differ: the check is not on a degenerate model


def test_float64_is_exact_and_images_and_prompts_matter(files, tokenizer_dir, state, images) -> None:
    scorer = ImageRewardScorer.load(str(files["pt"]), tokenizer=str(tokenizer_dir), med_config=str(files["med"]),
                                    vision_config=str(files["vision"]), dtype=torch.float64)
    with torch.no_grad():
        raw = scorer.raw_reward(images, PROMPTS)
        tokens = scorer.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH,
                                  return_tensors="pt")
        # the house preprocessing runs in float32 whatever the dtype: feed the reference its pixels
        pixels = clip_preprocess(images, IMAGE)
        want = ref_reward(state, pixels, tokens["input_ids"], tokens["attention_mask"])
        assert torch.allclose(raw, want, atol=1e-10, rtol=1e-10)
        assert torch.allclose(pixels.double(), ref_pixels(images), atol=1e-5)
        same_prompt = scorer.raw_reward(images, [PROMPTS[0]] * 3)
        same_image = scorer.raw_reward(images[:1].expand(3, -1, -1, -1), PROMPTS)
    assert same_prompt.std() > 1e-3 and same_image.std() > 1e-3  # cross-attention and text both count


def test_batch_composition_invariant(scorer, images) -> None:
    batch = scorer(images, PROMPTS)
    for i in range(3):
        alone = scorer(images[i:i + 1], PROMPTS[i:i + 1])
        assert torch.allclose(alone, batch[i:i + 1], atol=1e-5, rtol=1e-5)
    flipped = scorer(images.flip(0), PROMPTS[::-1])
    assert torch.allclose(flipped.flip(0), batch, atol=1e-5, rtol=1e-5)


def test_bfloat16_runs(files, tokenizer_dir, images) -> None:
    low = ImageRewardScorer.load(str(files["pt"]), tokenizer=str(tokenizer_dir), vision_config=str(files["vision"]),
                                 dtype=torch.bfloat16)
    assert low.model.vision.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert low.model.mlp[0].weight.dtype == torch.float32
    got = low(images, PROMPTS)
    assert torch.isfinite(got).all()


def test_scorer_spec_and_directory(files, tokenizer_dir, images, scorer, tmp_path) -> None:
    spec = ScorerSpec.parse(f"image_reward={files['pt']},tokenizer={tokenizer_dir},vision_config={files['vision']}")
    loaded = spec.load()
    assert isinstance(loaded, ImageRewardScorer)
    assert torch.allclose(loaded(images, PROMPTS), scorer(images, PROMPTS))
    # a directory with the checkpoint, med_config.json, vision_config.json and the tokenizer's vocab.txt
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "ImageReward.pt").symlink_to(files["pt"])
    (folder / "med_config.json").write_text(json.dumps(med_config()))
    (folder / "vision_config.json").write_text(json.dumps(VISION))
    (folder / "vocab.txt").write_text((tokenizer_dir / "vocab.txt").read_text())
    from_dir = ScorerSpec.parse(f"image_reward={folder}").load()
    assert torch.allclose(from_dir(images, PROMPTS), scorer(images, PROMPTS))


def test_hub_id_downloads_checkpoint_and_med_config(files, tokenizer_dir, monkeypatch, images, scorer) -> None:
    import huggingface_hub

    calls: list[tuple[str, str]] = []

    def fake_download(repo_id: str, filename: str, **kwargs) -> str:
        calls.append((repo_id, filename))
        return str(files["pt"] if filename == "ImageReward.pt" else files["med"])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    hub = ImageRewardScorer.load("THUDM/ImageReward", tokenizer=str(tokenizer_dir), vision_config=str(files["vision"]))
    assert calls == [("THUDM/ImageReward", "ImageReward.pt"), ("THUDM/ImageReward", "med_config.json")]
    assert torch.allclose(hub(images, PROMPTS), scorer(images, PROMPTS))


def test_key_map_covers_every_key(state) -> None:
    converted = convert_image_reward_state_dict(state)
    assert len(converted) == len(state) - len(UNUSED_KEYS)
    model = load_image_reward_model(state, med_config(), VISION)
    assert set(converted) == set(model.state_dict())
    assert "vision.encoder.layers.1.self_attn.qkv.weight" in converted  # the fused qkv stays fused
    prefixed = convert_image_reward_state_dict({f"module.{k}": v for k, v in state.items()})
    assert prefixed.keys() == converted.keys()


@pytest.mark.parametrize("key", ["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight",
                                 "blip.visual_encoder.blocks.0.attn.qkv.bias", "blip.visual_encoder.pos_embed",
                                 "mlp.layers.7.bias"])
def test_missing_key_fails_naming_it(state, key) -> None:
    broken = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ModelLoadError, match=f"missing key.*{key.replace('.', '[.]')}"):
        load_image_reward_model(broken, med_config(), VISION)


def test_unknown_keys_fail(state) -> None:
    with pytest.raises(ModelLoadError, match="unexpected key.*blip.visual_encoder.head.weight"):
        load_image_reward_model({**state, "blip.visual_encoder.head.weight": torch.zeros(2, 2)}, med_config(), VISION)
    with pytest.raises(ModelLoadError, match="unexpected key.*blip.text_encoder.pooler.dense.weight"):
        load_image_reward_model({**state, "blip.text_encoder.pooler.dense.weight": torch.zeros(2, 2)}, med_config(),
                                VISION)


def test_shape_mismatch_fails(state) -> None:
    with pytest.raises(ModelLoadError, match="shape mismatch.*check med_config"):
        load_image_reward_model(state, {**med_config(), "intermediate_size": 64}, VISION)


def test_unreadable_files(tmp_path, tokenizer_dir, files) -> None:
    opts = {"tokenizer": str(tokenizer_dir), "med_config": str(files["med"])}
    missing = tmp_path / "nowhere" / "ImageReward.pt"
    with pytest.raises(ModelLoadError, match="no such file or directory.*nowhere"):
        ImageRewardScorer.load(str(missing), **opts)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 20)
    with pytest.raises(ModelLoadError, match="garbage.pt.*not a safetensors file nor a torch checkpoint") as err:
        ImageRewardScorer.load(str(garbage), **opts)
    assert "weights_only=False" not in str(err.value) and "set to `False`" not in str(err.value)

    pickled = tmp_path / "code.pt"
    torch.save({"blip.visual_encoder.cls_token": Opaque()}, pickled)
    with pytest.raises(ModelLoadError, match="code.pt.*never pickled code") as err:
        ImageRewardScorer.load(str(pickled), **opts)
    assert "weights_only=False" not in str(err.value) and "set to `False`" not in str(err.value)

    not_a_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], not_a_dict)
    with pytest.raises(ModelLoadError, match="list.pt.*holds no tensors"):
        ImageRewardScorer.load(str(not_a_dict), **opts)

    bad_safetensors = tmp_path / "bad.safetensors"
    bad_safetensors.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="bad.safetensors.*not a safetensors file"):
        ImageRewardScorer.load(str(bad_safetensors), **opts)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no ImageReward.pt"):
        ImageRewardScorer.load(str(empty), **opts)


def test_tokenizer_required(files, tokenizer_dir) -> None:
    with pytest.raises(ModelLoadError, match="tokenizer=DIR_OR_HUB_ID"):
        ImageRewardScorer.load(str(files["pt"]), vision_config=str(files["vision"]))
    with pytest.raises(ModelLoadError, match="tokenizer.*could not load"):
        ImageRewardScorer.load(str(files["pt"]), vision_config=str(files["vision"]),
                               tokenizer=str(files["dir"] / "no-tokenizer-here"))
    wrong_vocab = files["dir"] / "med_wrong_vocab.json"
    wrong_vocab.write_text(json.dumps({**med_config(), "vocab_size": vocab_size() + 3}))
    with pytest.raises(ModelLoadError, match="tokenizer.*expected bert-base-uncased"):
        ImageRewardScorer.load(str(files["pt"]), vision_config=str(files["vision"]), tokenizer=str(tokenizer_dir),
                               med_config=str(wrong_vocab))
