"""HPSv2 against open_clip itself, on a tiny open_clip model built by open_clip's own factory.

Needs open_clip (``pip install 'spo-diffusion[eval]'``), which needs a torchvision built for the
installed torch; skipped without it. Checks (1) our open_clip -> transformers conversion against
open_clip's forward on identical pixels and token ids, (2) the default (transformers) backend end to
end against open_clip's own PIL preprocessing, (3) that a transformers CLIPTokenizer built offline
from open_clip's bundled BPE file gives open_clip's token ids, and (4) ``backend=open_clip``.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

open_clip = pytest.importorskip(
    "open_clip", reason="open_clip is not installed (pip install 'spo-diffusion[eval]'; it needs a torchvision "
                        "built for the installed torch)")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from spo.errors import ModelLoadError  # noqa: E402
from spo.evaluation.scorers import ScorerSpec  # noqa: E402

MODEL = "spo-tiny-hps-vit"  # registered with open_clip.add_model_config under this file stem
WIDTH, HEADS, LAYERS, PATCH, IMAGE, EMBED, CONTEXT, VOCAB = 32, 2, 2, 8, 32, 16, 77, 49408
OPEN_CLIP_CONFIG = {  # as ViT-H-14's JSON (GELU, not quick_gelu), scaled down
    "embed_dim": EMBED,
    "vision_cfg": {"image_size": IMAGE, "layers": LAYERS, "width": WIDTH, "head_width": WIDTH // HEADS,
                   "patch_size": PATCH},
    "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": WIDTH, "heads": HEADS, "layers": LAYERS},
}
PROMPTS = [
    "a red cube",
    "Two GREEN dogs, on a blue sofa!!",
    "an astronaut riding a horse on mars, 4k, trending on artstation",
    "a very long prompt " * 20,  # 100 words: truncated to 77 tokens, <end_of_text> kept last
    "café naïve résumé, don't 'quote' 123456",
]
SIZES = [(48, 32), (40, 64), (32, 32), (90, 30), (20, 26)]  # (H, W): tall, wide, no resize, thin, upscaled
CONVERSION_ATOL = 1e-4  # x100 scores, identical pixels and ids: float32 rounding only
OPEN_CLIP_ATOL = 2e-5  # x100 scores, backend=open_clip vs open_clip's forward: float32 ulps (scores ~30-45)
END_TO_END_ATOL = 0.1  # x100 scores: PIL uint8 bicubic resize vs our float bicubic resize (see the test)


def _uint8_images(seed: int = 0) -> list[Tensor]:
    """Smooth random images with some noise, (3, H, W) uint8, one per size of SIZES."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in SIZES:
        coarse = torch.rand(1, 3, h // 6 + 2, w // 6 + 2, generator=g)
        x = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
        x = x + 0.05 * torch.randn(3, h, w, generator=g)
        out.append((x.clamp(0, 1) * 255).round().to(torch.uint8))
    return out


def _pil(image: Tensor):  # noqa: ANN202
    from PIL import Image

    return Image.fromarray(image.permute(1, 2, 0).numpy())


def _as_scorer_input(image: Tensor) -> Tensor:
    """(3, H, W) uint8 -> (1, 3, H, W) in [-1, 1]; the open_clip backend's uint8 round trip gives it back."""
    return (image.float() / 127.5 - 1).unsqueeze(0)


def _hf_clip_tokenizer():  # noqa: ANN202
    """transformers' CLIPTokenizer from open_clip's bundled BPE file, offline: the vocabulary as
    open_clip's SimpleTokenizer builds it (bytes, bytes + '</w>', merges, then the two specials under
    OpenAI's names), merges from the file. Pads with <|endoftext|> (the default): a pad token "!"
    would become an added token and split "!!" apart from open_clip's tokenizer."""
    from open_clip.tokenizer import SimpleTokenizer, default_bpe
    from transformers import CLIPTokenizer

    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(k, k): v for k, v in SimpleTokenizer().encoder.items()}
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]  # as SimpleTokenizer
    assert len(vocab) == VOCAB and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CONTEXT)


def _hf_ids(tokenizer, prompts: list[str]) -> Tensor:  # noqa: ANN001
    """Our transformers path's token ids, with open_clip's padding (0 after <end_of_text>) for comparison."""
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=CONTEXT, return_tensors="pt")["input_ids"]
    after_eot = (ids == 49407).int().cumsum(dim=-1) - (ids == 49407).int() > 0
    return ids.masked_fill(after_eot, 0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny open_clip CLIP (open_clip's factory, random weights, LayerNorms and biases perturbed),
    saved as an HPS checkpoint ({'state_dict': ...}); its open_clip and transformers configs; the
    offline CLIPTokenizer."""
    from transformers import CLIPConfig

    root = tmp_path_factory.mktemp("open-clip-hps")
    config_path = root / f"{MODEL}.json"
    config_path.write_text(json.dumps(OPEN_CLIP_CONFIG))
    open_clip.add_model_config(config_path)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL, image_resize_mode="longest", output_dict=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name != "logit_scale":  # LayerNorm weights/biases, biases, class embedding
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.eval()
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, root / "HPS_v2_compressed.pt")
    prefixed = {f"module.{k}": v.half() for k, v in model.state_dict().items()}  # DDP prefix, fp16 as "compressed"
    (root / "v21").mkdir()
    torch.save({"state_dict": prefixed}, root / "v21" / "HPS_v2.1_compressed.pt")

    tokenizer = _hf_clip_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    text = dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, max_position_embeddings=CONTEXT, hidden_act="gelu", projection_dim=EMBED,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  image_size=IMAGE, patch_size=PATCH, hidden_act="gelu", projection_dim=EMBED)
    CLIPConfig(text_config=text, vision_config=vision, projection_dim=EMBED).to_json_file(root / "config.json")
    return {"model": model, "preprocess": preprocess, "tokenizer": open_clip.get_tokenizer(MODEL),
            "checkpoint": root / "HPS_v2_compressed.pt", "v21_dir": root / "v21", "open_clip_config": config_path,
            "config": root / "config.json", "hf_tokenizer": root / "tokenizer", "root": root}


def _open_clip_scores(model, preprocess, tokenizer, images: list[Tensor], prompts: list[str]) -> Tensor:  # noqa: ANN001
    """HPSv2's img_score: open_clip's forward on preprocess_val(PIL) and tokenizer(prompt); 100 x diag."""
    pixels = torch.stack([preprocess(_pil(image)) for image in images])
    with torch.no_grad():
        out = model(pixels, tokenizer(prompts))
    return 100 * (out["image_features"] @ out["text_features"].T).diagonal()


def _transformers_scorer(tiny: dict):  # noqa: ANN202
    return ScorerSpec.parse(f"hpsv2={tiny['checkpoint']},config={tiny['config']},tokenizer={tiny['hf_tokenizer']}").load()


def test_offline_clip_tokenizer_from_open_clips_bpe_equals_open_clips_ids(tiny: dict) -> None:
    from transformers import AutoTokenizer

    expected = tiny["tokenizer"](PROMPTS)
    assert expected[3, -1] == 49407 and (expected[3] != 0).all()  # the long prompt fills all 77, <eot> last
    torch.testing.assert_close(_hf_ids(_hf_clip_tokenizer(), PROMPTS), expected, rtol=0, atol=0)
    saved = AutoTokenizer.from_pretrained(tiny["hf_tokenizer"])  # as the scorer loads it
    torch.testing.assert_close(_hf_ids(saved, PROMPTS), expected, rtol=0, atol=0)


def test_conversion_matches_open_clip_on_identical_inputs(tiny: dict) -> None:
    """Same preprocessed pixels, same token ids: only the conversion (and float32 rounding) differs."""
    scorer = _transformers_scorer(tiny)
    model, hf = tiny["model"], scorer.model
    pixels = torch.stack([tiny["preprocess"](_pil(image)) for image in _uint8_images()])
    ids = tiny["tokenizer"](PROMPTS)
    with torch.no_grad():
        oc_img, oc_txt = model.encode_image(pixels), model.encode_text(ids)
        hf_img = hf.visual_projection(hf.vision_model(pixel_values=pixels).pooler_output)
        hidden = hf.text_model(input_ids=ids).last_hidden_state
        hf_txt = hf.text_projection(hidden[torch.arange(len(ids)), ids.argmax(dim=-1)])
    torch.testing.assert_close(hf_img, oc_img, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(hf_txt, oc_txt, atol=1e-5, rtol=1e-4)
    expected = 100 * F.cosine_similarity(oc_img, oc_txt, dim=-1)
    got = 100 * F.cosine_similarity(hf_img, hf_txt, dim=-1)
    assert expected.abs().max() > 1  # x100 of a random model: not all ~0
    torch.testing.assert_close(got, expected, atol=CONVERSION_ATOL, rtol=0)


def test_transformers_backend_end_to_end_against_open_clip(tiny: dict) -> None:
    """Our scorer on [-1, 1] tensors vs open_clip on the same images as PIL uint8 (HPSv2's path).

    The networks agree to ~1e-5 (above); what differs is the resize: PIL's bicubic works on uint8
    and rounds its output to uint8 (up to 1/510 per pixel before normalisation), ours resizes
    floats. The padding (centred, black, extra pixel right/bottom) and normalisation are the same,
    so the 32x32 image, which neither resizes, agrees as tightly as the conversion alone."""
    scorer = _transformers_scorer(tiny)
    images = _uint8_images()
    expected = _open_clip_scores(tiny["model"], tiny["preprocess"], tiny["tokenizer"], images, PROMPTS)
    got = torch.cat([scorer(_as_scorer_input(image), [prompt]) for image, prompt in zip(images, PROMPTS)]).float()
    unresized = SIZES.index((IMAGE, IMAGE))
    torch.testing.assert_close(got[unresized], expected[unresized], atol=CONVERSION_ATOL, rtol=0)
    torch.testing.assert_close(got, expected, atol=END_TO_END_ATOL, rtol=0)


@pytest.mark.parametrize("name", ["hpsv2", "hpsv21"])
def test_open_clip_backend_is_open_clips_own_forward(name: str, tiny: dict) -> None:
    weights = tiny["checkpoint"] if name == "hpsv2" else tiny["v21_dir"]  # v2.1: a directory, module.-prefixed fp16
    scorer = ScorerSpec.parse(f"{name}={weights},backend=open_clip,open_clip_config={tiny['open_clip_config']}").load()
    assert scorer.backend == "open_clip"
    file = weights if name == "hpsv2" else weights / "HPS_v2.1_compressed.pt"
    reference, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=str(file),
                                                                     image_resize_mode="longest", output_dict=True)
    images = _uint8_images(seed=2)
    prompts = [PROMPTS[0], PROMPTS[3], PROMPTS[1], PROMPTS[0], PROMPTS[4]]  # a repeat: deduplicated text batch
    tokenizer = open_clip.get_tokenizer(MODEL)
    reference.eval()
    # per image, as HPSv2's img_score: same batches on both sides, so only the final dot product's
    # summation order differs (elementwise sum vs matmul): 1-2 float32 ulp of scores ~30-45 (<= 7.7e-6)
    expected = torch.cat([_open_clip_scores(reference, preprocess, tokenizer, [image], [prompt])
                          for image, prompt in zip(images, prompts)])
    got = torch.cat([scorer(_as_scorer_input(image), [prompt]) for image, prompt in zip(images, prompts)]).float()
    torch.testing.assert_close(got, expected, atol=OPEN_CLIP_ATOL, rtol=0)
    square = [image for image, size in zip(images, SIZES) if size == (IMAGE, IMAGE)] * 3  # one batch of three
    batched = scorer(torch.cat([_as_scorer_input(image) for image in square]), prompts[:3]).float()
    torch.testing.assert_close(batched, _open_clip_scores(reference, preprocess, tokenizer, square, prompts[:3]),
                               atol=OPEN_CLIP_ATOL, rtol=0)
    if name == "hpsv2":  # same weights, the other backend: equal up to the preprocessing difference
        torch.testing.assert_close(_transformers_scorer(tiny)(torch.cat([_as_scorer_input(i) for i in square]),
                                                              prompts[:3]).float(), batched, atol=CONVERSION_ATOL, rtol=0)


def test_open_clip_backend_errors(tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    oc_config = tiny["open_clip_config"]

    def load(spec: str):  # noqa: ANN202
        return ScorerSpec.parse(spec).load()

    with pytest.raises(ModelLoadError, match="backend 'tf'"):
        load(f"hpsv2={tiny['checkpoint']},backend=tf")
    with pytest.raises(ModelLoadError, match="only apply to backend=open_clip"):
        load(f"hpsv2={tiny['checkpoint']},open_clip_config={oc_config},config={tiny['config']}")
    with pytest.raises(ModelLoadError, match="open_clip_config"):  # a transformers config given to open_clip
        load(f"hpsv2={tiny['checkpoint']},backend=open_clip,config={tiny['config']}")
    with pytest.raises(ModelLoadError, match="not an open_clip model config"):
        load(f"hpsv2={tiny['checkpoint']},backend=open_clip,open_clip_config={tiny['config']}")
    with pytest.raises(ModelLoadError, match="no such file"):
        load(f"hpsv2={tiny['checkpoint']},backend=open_clip,open_clip_config={tmp_path / 'none.json'}")
    with pytest.raises(ModelLoadError, match="registers the model"):
        load(f"hpsv2={tiny['checkpoint']},backend=open_clip,open_clip_config={oc_config},model=ViT-B-32")
    with pytest.raises(ModelLoadError, match="no-such-hps.pt"):
        load(f"hpsv2={tmp_path / 'no-such-hps.pt'},backend=open_clip,open_clip_config={oc_config}")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x02this is not a checkpoint" * 10)
    with pytest.raises(ModelLoadError, match="garbage.pt") as err:
        load(f"hpsv2={garbage},backend=open_clip,open_clip_config={oc_config}")
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)
    wider = tmp_path / f"{MODEL}-wider.json"  # another architecture: open_clip's strict load fails
    wider.write_text(json.dumps({**OPEN_CLIP_CONFIG, "embed_dim": 2 * EMBED}))
    with pytest.raises(ModelLoadError, match="could not load .*HPS_v2_compressed.pt.* as 'spo-tiny-hps-vit-wider'"):
        load(f"hpsv2={tiny['checkpoint']},backend=open_clip,open_clip_config={wider}")
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if not installed: import raises ImportError
    with pytest.raises(ModelLoadError, match=r"pip install 'spo-diffusion\[eval\]'") as err:
        load(f"hpsv2={tiny['checkpoint']},backend=open_clip,open_clip_config={oc_config}")
    assert "\n" not in str(err.value) and "torchvision" in str(err.value)
