"""PickScore, the LAION aesthetic predictor v2 and HPSv2/HPSv2.1 on tiny offline models, each against
an independent computation: the tiny CLIPModel's own forward, a float64 MLP, and a float64 forward of
an open_clip-layout state dict written here with plain torch ops."""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from spo.errors import ModelLoadError
from spo.evaluation.scorers import ScorerSpec, available_scorers, scorer_class
from spo.evaluation.scorers.hpsv2 import convert_open_clip_state_dict, resize_longest_and_pad
from spo.preference.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess

PROMPTS = ["a red cube", "two green dogs on a blue sofa", "a red cube"]
LONG_PROMPT = "a very long prompt " * 6  # over 75 byte tokens: truncated
MEAN = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)


def _images(n: int, h: int, w: int, seed: int = 0) -> Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _garbage(path: Path) -> Path:
    path.write_bytes(b"\x80\x02this is not a checkpoint" * 10)
    return path


def test_registry_lists_the_scorers() -> None:
    assert {"pickscore", "aesthetic", "hpsv2", "hpsv21"} <= set(available_scorers())
    for name in ("pickscore", "aesthetic", "hpsv2", "hpsv21"):
        klass = scorer_class(name)
        assert klass.name == name and klass.expected_range and klass.weights_help


# --- PickScore ---------------------------------------------------------------------------------


def test_pickscore_is_the_clip_models_own_logits(tiny_clip_path: Path) -> None:
    from transformers import AutoTokenizer, CLIPModel

    scorer = ScorerSpec.parse(f"pickscore={tiny_clip_path}").load()
    images = _images(3, 40, 56)
    got = scorer(images, PROMPTS).float()

    model = CLIPModel.from_pretrained(tiny_clip_path).eval()
    tokens = AutoTokenizer.from_pretrained(tiny_clip_path)(PROMPTS, padding="max_length", max_length=77,
                                                           truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                    pixel_values=clip_preprocess(images, 32))
    assert got.shape == (3,)
    torch.testing.assert_close(got, out.logits_per_image.diagonal(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scorer(images[1:2], PROMPTS[1:2]).float(), got[1:2], atol=1e-5, rtol=1e-5)


def test_pickscore_load_errors(tiny_clip_path: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-pickscore"
    with pytest.raises(ModelLoadError, match="no-such-pickscore"):
        ScorerSpec.parse(f"pickscore={missing}").load()
    garbage = _garbage(tmp_path / "pickscore.bin")
    with pytest.raises(ModelLoadError, match="pickscore.bin") as err:
        ScorerSpec.parse(f"pickscore={garbage}").load()
    assert "weights_only" not in str(err.value)
    corrupt = shutil.copytree(tiny_clip_path, tmp_path / "corrupt")  # a CLIPModel directory, weights garbage
    for weights in corrupt.glob("*.safetensors"):
        weights.unlink()
    _garbage(corrupt / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="corrupt") as err:
        ScorerSpec.parse(f"pickscore={corrupt}").load()
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)


# --- LAION aesthetic v2 ------------------------------------------------------------------------

MLP_WIDTHS = (16, 24, 12, 8, 4, 1)  # the tiny CLIP's 16-d projection in; real: 768, 1024, 128, 64, 16, 1


def _mlp_state_dict(seed: int = 1) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Tensor] = {}
    for index, (n_in, n_out) in zip((0, 2, 4, 6, 7), zip(MLP_WIDTHS, MLP_WIDTHS[1:])):
        sd[f"layers.{index}.weight"] = torch.randn(n_out, n_in, generator=g) / math.sqrt(n_in)
        sd[f"layers.{index}.bias"] = torch.randn(n_out, generator=g) * 0.1
    return sd


@contextmanager
def _saved_as_cuda() -> Iterator[None]:
    """Make torch.save record CPU tensors as stored on cuda:0, as the released MLP file is."""
    import torch.serialization as serialization

    entry = (1, lambda obj: "cuda:0" if obj.device.type == "cpu" else None, lambda obj, location: None)
    serialization._package_registry.insert(0, entry)  # ahead of the CPU tagger
    try:
        yield
    finally:
        serialization._package_registry.remove(entry)


def test_aesthetic_is_the_affine_mlp_of_the_normalised_embedding(tiny_clip_path: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from transformers import CLIPModel

    sd = _mlp_state_dict()
    pth = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    with _saved_as_cuda():
        torch.save(sd, pth)
    if not torch.cuda.is_available():  # the file really names cuda: loading it needs map_location
        with pytest.raises(RuntimeError):
            torch.load(pth, weights_only=True)
    scorer = ScorerSpec.parse(f"aesthetic={pth},clip={tiny_clip_path}").load()
    images = _images(3, 48, 32, seed=2)
    got = scorer(images, PROMPTS).float()

    model = CLIPModel.from_pretrained(tiny_clip_path).eval()
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=clip_preprocess(images, 32)).pooler_output
        emb = model.visual_projection(pooled).double()
    x = emb / emb.norm(dim=-1, keepdim=True)
    for index in (0, 2, 4, 6, 7):
        x = x @ sd[f"layers.{index}.weight"].double().T + sd[f"layers.{index}.bias"].double()
    torch.testing.assert_close(got, x.squeeze(-1).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scorer(images[2:], PROMPTS[2:]).float(), got[2:], atol=1e-5, rtol=1e-5)

    save_file(sd, str(tmp_path / "mlp.safetensors"))
    by_safetensors = ScorerSpec.parse(f"aesthetic={tmp_path / 'mlp.safetensors'},clip={tiny_clip_path}").load()
    torch.testing.assert_close(by_safetensors(images, PROMPTS).float(), got)
    by_directory = ScorerSpec.parse(f"aesthetic={tmp_path},clip={tiny_clip_path}").load()  # holds the .pth
    torch.testing.assert_close(by_directory(images, PROMPTS).float(), got)


def test_aesthetic_load_errors(tiny_clip_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no-such-mlp.pth"):
        ScorerSpec.parse(f"aesthetic={tmp_path / 'no-such-mlp.pth'},clip={tiny_clip_path}").load()
    garbage = _garbage(tmp_path / "garbage.pth")
    with pytest.raises(ModelLoadError, match="garbage.pth") as err:
        ScorerSpec.parse(f"aesthetic={garbage},clip={tiny_clip_path}").load()
    assert "weights_only" not in str(err.value)
    mlp = tmp_path / "mlp.pth"
    torch.save(_mlp_state_dict(), mlp)
    with pytest.raises(ModelLoadError, match="no-such-clip"):
        ScorerSpec.parse(f"aesthetic={mlp},clip={tmp_path / 'no-such-clip'}").load()
    wrong = {k: v for k, v in _mlp_state_dict().items() if not k.startswith("layers.0.")}  # 24-d input
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ModelLoadError, match="24-d"):
        ScorerSpec.parse(f"aesthetic={tmp_path / 'wrong.pth'},clip={tiny_clip_path}").load()


# --- HPSv2 / HPSv2.1 ---------------------------------------------------------------------------

V_WIDTH, T_WIDTH, EMBED, HEADS, LAYERS, PATCH, IMAGE, CONTEXT = 24, 32, 16, 2, 2, 8, 32, 77


def _open_clip_state_dict(vocab: int, seed: int = 3, *, v_width: int = V_WIDTH, t_width: int = T_WIDTH,
                          embed: int = EMBED, v_layers: int = LAYERS, t_layers: int = LAYERS, patch: int = PATCH,
                          image: int = IMAGE, meta: bool = False) -> dict[str, Tensor]:
    """A ViT CLIP in open_clip's key layout and shapes (random weights; ``meta``: shapes only)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.1) -> Tensor:
        return torch.empty(shape, device="meta") if meta else torch.randn(shape, generator=g) * scale

    def norm(prefix: str, width: int) -> dict[str, Tensor]:
        return {f"{prefix}.weight": 1 + rand(width), f"{prefix}.bias": rand(width)}

    def blocks(prefix: str, w: int, layers: int) -> dict[str, Tensor]:
        sd: dict[str, Tensor] = {}
        for i in range(layers):
            p = f"{prefix}.resblocks.{i}."
            sd |= norm(p + "ln_1", w) | norm(p + "ln_2", w)
            sd |= {p + "attn.in_proj_weight": rand(3 * w, w, scale=w**-0.5), p + "attn.in_proj_bias": rand(3 * w),
                   p + "attn.out_proj.weight": rand(w, w, scale=w**-0.5), p + "attn.out_proj.bias": rand(w),
                   p + "mlp.c_fc.weight": rand(4 * w, w, scale=w**-0.5), p + "mlp.c_fc.bias": rand(4 * w),
                   p + "mlp.c_proj.weight": rand(w, 4 * w, scale=(4 * w) ** -0.5), p + "mlp.c_proj.bias": rand(w)}
        return sd

    grid = (image // patch) ** 2
    return {
        "visual.conv1.weight": rand(v_width, 3, patch, patch, scale=0.05),
        "visual.class_embedding": rand(v_width, scale=0.5),
        "visual.positional_embedding": rand(grid + 1, v_width, scale=0.5),
        **norm("visual.ln_pre", v_width), **blocks("visual.transformer", v_width, v_layers),
        **norm("visual.ln_post", v_width), "visual.proj": rand(v_width, embed, scale=v_width**-0.5),
        "token_embedding.weight": rand(vocab, t_width, scale=0.5),
        "positional_embedding": rand(CONTEXT, t_width, scale=0.5),
        **blocks("transformer", t_width, t_layers), **norm("ln_final", t_width),
        "text_projection": rand(t_width, embed, scale=t_width**-0.5),
        "logit_scale": rand() if meta else torch.tensor(math.log(1 / 0.07)),
    }


def _reference_block(x: Tensor, sd: dict[str, Tensor], p: str, mask: Tensor | None) -> Tensor:
    """open_clip's ResidualAttentionBlock (pre-norm, fused in_proj multi-head attention, GELU MLP)."""
    def ln(t: Tensor, name: str) -> Tensor:
        return F.layer_norm(t, t.shape[-1:], sd[f"{p}{name}.weight"], sd[f"{p}{name}.bias"], 1e-5)

    b, n, d = x.shape
    q, k, v = (ln(x, "ln_1") @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, HEADS, d // HEADS).transpose(1, 2) for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) / math.sqrt(d // HEADS)
    if mask is not None:
        logits = logits + mask
    attended = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, d)
    x = x + attended @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
    hidden = F.gelu(ln(x, "ln_2") @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
    return x + hidden @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]


def _reference_hps(sd: dict[str, Tensor], pixels: Tensor, tokens: Tensor) -> Tensor:
    """100 * cos(encode_image, encode_text) of open_clip's CLIP, in float64."""
    sd = {k: v.double() for k, v in sd.items()}

    def ln(t: Tensor, name: str) -> Tensor:
        return F.layer_norm(t, t.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-5)

    x = F.conv2d(pixels.double(), sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
    x = ln(x + sd["visual.positional_embedding"], "visual.ln_pre")
    for i in range(LAYERS):
        x = _reference_block(x, sd, f"visual.transformer.resblocks.{i}.", None)
    image = ln(x[:, 0], "visual.ln_post") @ sd["visual.proj"]

    causal = torch.full((CONTEXT, CONTEXT), float("-inf"), dtype=torch.float64).triu(1)
    t = sd["token_embedding.weight"][tokens] + sd["positional_embedding"]
    for i in range(LAYERS):
        t = _reference_block(t, sd, f"transformer.resblocks.{i}.", causal)
    t = ln(t, "ln_final")
    text = t[torch.arange(t.shape[0]), tokens.argmax(dim=-1)] @ sd["text_projection"]
    return 100 * F.cosine_similarity(image, text, dim=-1)


def _open_clip_tokens(tokenizer, prompts: list[str]) -> Tensor:  # noqa: ANN001
    """open_clip's tokenize(): <start> BPE <end>, truncated to 77 keeping <end> last, padded with 0."""
    rows = []
    for prompt in prompts:
        ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        if len(ids) > CONTEXT:
            ids = ids[:CONTEXT]
            ids[-1] = tokenizer.eos_token_id
        rows.append(ids + [0] * (CONTEXT - len(ids)))
    return torch.tensor(rows)


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny HPS checkpoint ({'state_dict': ...}), a `module.`-prefixed one, its CLIPConfig JSON, a tokenizer."""
    from transformers import CLIPConfig

    from spo.backbones.tiny import build_tokenizer

    root = tmp_path_factory.mktemp("hps")
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    sd = _open_clip_state_dict(len(tokenizer))
    torch.save({"state_dict": sd}, root / "HPS_v2_compressed.pt")
    prefixed = {f"module.{k}": v.half() for k, v in sd.items()}  # as saved from DDP; fp16 as the compressed files
    prefixed["module.attn_mask"] = torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1)
    (root / "v21").mkdir()
    torch.save({"state_dict": prefixed, "epoch": 1}, root / "v21" / "HPS_v2.1_compressed.pt")
    text = dict(vocab_size=len(tokenizer), hidden_size=T_WIDTH, intermediate_size=4 * T_WIDTH, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, max_position_embeddings=CONTEXT, hidden_act="gelu", projection_dim=EMBED,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=V_WIDTH, intermediate_size=4 * V_WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  image_size=IMAGE, patch_size=PATCH, hidden_act="gelu", projection_dim=EMBED)
    CLIPConfig(text_config=text, vision_config=vision, projection_dim=EMBED).to_json_file(root / "config.json")
    return {"v2": root / "HPS_v2_compressed.pt", "v21_dir": root / "v21", "config": root / "config.json",
            "tokenizer": root / "tokenizer", "root": root}


def _hps_spec(name: str, weights: Path | str, files: dict[str, Path]) -> ScorerSpec:
    return ScorerSpec.parse(f"{name}={weights},config={files['config']},tokenizer={files['tokenizer']}")


def test_resize_longest_side_and_centred_black_padding() -> None:
    images = _images(2, 48, 32, seed=4)  # tall: 48x32 -> 32x21, 11 columns of padding (5 left, 6 right)
    got = resize_longest_and_pad(images, 32)
    resized = F.interpolate((images + 1) / 2, size=(32, 21), mode="bicubic", align_corners=False, antialias=True)
    canvas = torch.zeros(2, 3, 32, 32)
    canvas[..., 5:26] = resized.clamp(0, 1)
    torch.testing.assert_close(got, (canvas - MEAN) / STD)
    black = (-MEAN / STD).expand(2, 3, 32, 5)
    torch.testing.assert_close(got[..., :5], black)
    torch.testing.assert_close(got[..., 26:], (-MEAN / STD).expand(2, 3, 32, 6))
    wide = resize_longest_and_pad(_images(1, 10, 40), 32)  # 40 wide -> 8x32 rows centred: 12 above, 12 below
    torch.testing.assert_close(wide[..., :12, :], (-MEAN / STD).expand(1, 3, 12, 32))
    torch.testing.assert_close(wide[..., 20:, :], (-MEAN / STD).expand(1, 3, 12, 32))
    square = _images(1, 64, 64)  # square: a plain resize, no padding
    torch.testing.assert_close(resize_longest_and_pad(square, 32), clip_preprocess(square, 32))


def test_hpsv2_matches_an_open_clip_reference_forward(hps_files: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    scorer = _hps_spec("hpsv2", hps_files["v2"], hps_files).load()
    images = _images(3, 48, 32, seed=5)
    prompts = [PROMPTS[0], LONG_PROMPT, PROMPTS[0]]
    got = scorer(images, prompts).float()

    sd = torch.load(hps_files["v2"], weights_only=True)["state_dict"]
    tokens = _open_clip_tokens(AutoTokenizer.from_pretrained(hps_files["tokenizer"]), prompts)
    expected = _reference_hps(sd, resize_longest_and_pad(images, IMAGE), tokens)
    assert got.shape == (3,)
    torch.testing.assert_close(got, expected.float(), atol=1e-4, rtol=0)
    assert got.abs().max() > 1  # x100: not a bare cosine of random embeddings
    torch.testing.assert_close(scorer(images[1:2], prompts[1:2]).float(), got[1:2], atol=1e-4, rtol=0)


def test_hpsv21_reads_its_own_file_prefixed_fp16_checkpoint(hps_files: dict[str, Path]) -> None:
    images, prompts = _images(2, 32, 48, seed=6), PROMPTS[:2]
    scorer = _hps_spec("hpsv21", hps_files["v21_dir"], hps_files).load()
    assert scorer.label == "HPSv2.1"
    saved = torch.load(hps_files["v21_dir"] / "HPS_v2.1_compressed.pt", weights_only=True)
    sd = {k.removeprefix("module."): v for k, v in saved["state_dict"].items()}
    from transformers import AutoTokenizer

    tokens = _open_clip_tokens(AutoTokenizer.from_pretrained(hps_files["tokenizer"]), prompts)
    expected = _reference_hps(sd, resize_longest_and_pad(images, IMAGE), tokens)
    torch.testing.assert_close(scorer(images, prompts).float(), expected.float(), atol=1e-4, rtol=0)
    with pytest.raises(ModelLoadError, match="HPS_v2_compressed.pt"):  # v2 wants its own file name
        _hps_spec("hpsv2", hps_files["v21_dir"], hps_files).load()


def test_convert_open_clip_state_dict() -> None:
    sd = _open_clip_state_dict(vocab=10)
    out = convert_open_clip_state_dict({f"module.{k}": v for k, v in sd.items()} | {"attn_mask": torch.zeros(2, 2)})
    w = sd["visual.transformer.resblocks.1.attn.in_proj_weight"]
    torch.testing.assert_close(out["vision_model.encoder.layers.1.self_attn.k_proj.weight"], w[V_WIDTH : 2 * V_WIDTH])
    torch.testing.assert_close(out["text_projection.weight"], sd["text_projection"].T)
    assert out["visual_projection.weight"].shape == (EMBED, V_WIDTH)
    assert not any("attn_mask" in k for k in out)
    with pytest.raises(ValueError, match="visual.attn_pool.query"):
        convert_open_clip_state_dict(sd | {"visual.attn_pool.query": torch.zeros(1)})


def test_open_clip_vit_h_14_layout_fits_the_default_config() -> None:
    """Every key and shape of open_clip's ViT-H-14 (shapes only, on the meta device) loads strictly."""
    from spo.evaluation.scorers.hpsv2 import _build_clip, vit_h_14_config

    sd = _open_clip_state_dict(49408, v_width=1280, t_width=1024, embed=1024, v_layers=32, t_layers=24, patch=14,
                               image=224, meta=True)
    model = _build_clip(vit_h_14_config(), convert_open_clip_state_dict(sd), torch.float32)
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in sd.values())
    assert model.text_model.embeddings.position_ids.tolist() == [list(range(CONTEXT))]


@pytest.mark.parametrize("name", ["hpsv2", "hpsv21"])
def test_hps_load_errors(name: str, hps_files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no-such-hps.pt"):
        _hps_spec(name, tmp_path / "no-such-hps.pt", hps_files).load()
    garbage = _garbage(tmp_path / "garbage.pt")
    with pytest.raises(ModelLoadError, match="garbage.pt") as err:
        _hps_spec(name, garbage, hps_files).load()
    assert "weights_only" not in str(err.value)
    with pytest.raises(ModelLoadError, match="no-such-tokenizer"):
        ScorerSpec.parse(f"{name}={hps_files['v2']},config={hps_files['config']},"
                         f"tokenizer={tmp_path / 'no-such-tokenizer'}").load()
    with pytest.raises(ModelLoadError, match="does not fit"):  # the tiny checkpoint against ViT-H-14
        ScorerSpec.parse(f"{name}={hps_files['v2']},tokenizer={hps_files['tokenizer']}").load()
    with pytest.raises(ModelLoadError, match="xswu/HPSv2"):  # offline in the tests: the download fails
        _hps_spec(name, "xswu/HPSv2", hps_files).load()


def test_hps_open_clip_backend_without_open_clip(hps_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """backend=open_clip where open_clip cannot be imported: one clear line naming the extra."""
    import sys

    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ModelLoadError, match=r"pip install 'spo-diffusion\[eval\]'"):
        ScorerSpec.parse(f"hpsv2={hps_files['v2']},backend=open_clip").load()
