"""Parity of the step-aware preference model (SPM) with the authors' release, against its own code.

The release's time-conditioned CLIP needs transformers 4.x, so its outputs come as fixtures
(tests/fixtures/release/spm/) written by tools/release_parity/make_spm_fixtures.py, which runs the
release's own modules in a separate venv: a tiny random CLIP built and saved by the SPM trainer's
code (transformers 4.27.3, checkpoint written as DeepSpeed's fp32 conversion writes it), scored
by ``StepAwarePreferenceModel.get_preference_score`` of the SPO side (transformers 4.40.1) on
unclamped images at several sizes and timesteps. Here the fixture is loaded through OUR loader
and OUR preprocessing, without the old stack.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from spo.preference import CLIPScorer, StepAwarePreferenceModel, clip_preprocess, spm_preprocess
from spo.preference.clip_scorer import load_clip_parts
from spo.preference.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from spo.weights import read_state_dict

FIXTURES = Path(__file__).parent / "fixtures" / "release" / "spm"
BASE = FIXTURES / "base-clip"
CHECKPOINT = FIXTURES / "spm_release.bin"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
INPUTS = load_file(str(FIXTURES / "inputs.safetensors"))
PIXELS = load_file(str(FIXTURES / "pixels.safetensors"))
GROUPS = EXPECTED["groups"]
TIMESTEPS = EXPECTED["timesteps"]
SIZE = EXPECTED["image_size"]
# fp32 on the same inputs: the only differences are summation orders (measured: < 2e-5 on
# scores of magnitude ~50; pixel values < 1e-6)
SCORE_TOL = 2e-4
PIXEL_TOL = 1e-5


def _scores(model: CLIPScorer, group: dict, t: int) -> torch.Tensor:
    images = INPUTS[f"images_{group['key']}"]
    with torch.no_grad():
        return model(images, group["prompts"], torch.full((images.shape[0],), t))


def _release(group: dict, t: int, which: str = "scores") -> torch.Tensor:
    return torch.tensor(group[which][str(t)])


@pytest.fixture(scope="module")
def trained() -> StepAwarePreferenceModel:
    return StepAwarePreferenceModel.from_pretrained(str(BASE), checkpoint=str(CHECKPOINT))


def test_fixture_is_what_the_release_wrote() -> None:
    """The checkpoint is DeepSpeed's fp32 conversion of the trainer's wrapper: tensors only
    (loads with weights_only), ``model.`` keys, the float32 position_ids buffers of
    transformers 4.27.3 first, then the parameters with the time modules."""
    state = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    keys = list(state)
    assert keys[:2] == ["model.text_model.embeddings.position_ids", "model.vision_model.embeddings.position_ids"]
    assert state[keys[0]].dtype == torch.float32 and torch.equal(state[keys[0]], torch.arange(77.0)[None])
    assert all(k.startswith("model.") for k in keys) and all(v.dtype == torch.float32 for v in state.values())
    assert {"model.t_embedder.mlp.0.weight", "model.vision_model.adaLN_modulation.1.weight",
            "model.vision_model.encoder.layers.1.adaLN_modulation.1.bias"} <= set(keys)
    assert read_state_dict(CHECKPOINT, "preference.checkpoint").keys() == state.keys()
    assert EXPECTED["versions"]["score"]["transformers"] == "4.40.1"


def test_our_tokenizer_gives_the_release_input_ids() -> None:
    _, tokenizer, settings = load_clip_parts(str(BASE))
    assert settings["size"] == SIZE and tuple(settings["mean"]) == OPENAI_CLIP_MEAN and tuple(settings["std"]) == OPENAI_CLIP_STD
    for group in GROUPS:
        ours = tokenizer(group["prompts"], padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids
        assert torch.equal(ours, INPUTS[f"input_ids_{group['key']}"]), group["key"]


@pytest.mark.parametrize("group", GROUPS, ids=[g["key"] for g in GROUPS])
def test_preprocessing_is_the_release_s(group: dict) -> None:
    """Bicubic without antialiasing on the unclamped image, int(x * scale + 0.5) sizes,
    torchvision's centre crop, then clamp, then normalise: the pixel values the release's CLIP got."""
    ours = spm_preprocess(INPUTS[f"images_{group['key']}"], SIZE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    reference = PIXELS[f"pixels_{group['key']}"]
    assert ours.shape == reference.shape == (2, 3, SIZE, SIZE)
    assert float((ours - reference).abs().max()) < PIXEL_TOL


def test_scores_match_the_release_at_every_t(trained: StepAwarePreferenceModel) -> None:
    worst = 0.0
    for group in GROUPS:
        for t in TIMESTEPS:
            ours, release = _scores(trained, group, t), _release(group, t)
            worst = max(worst, float((ours - release).abs().max()))
            torch.testing.assert_close(ours, release, rtol=0, atol=SCORE_TOL, msg=f"{group['key']} t={t}")
    # t matters in this fixture: the comparison is not of a t-blind model
    spread = max(float(_release(g, 0).sub(_release(g, 999)).abs().max()) for g in GROUPS)
    assert spread > 5.0
    print(f"max |score - release| = {worst:.2e}")


def _antialiased(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:  # noqa: ANN001
    return clip_preprocess(images.clamp(-1, 1), size, mean, std)  # the project's path before this change


def _floor_crop(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:  # noqa: ANN001
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new = (int(h * scale + 0.5), int(w * scale + 0.5))
    x = F.interpolate(images.float(), size=new, mode="bicubic", align_corners=False)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    return spm_preprocess(x[..., top : top + size, left : left + size], size, mean, std)


def _python_round_sizes(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:  # noqa: ANN001
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new = (round(h * scale), round(w * scale))
    x = F.interpolate(images.float(), size=new, mode="bicubic", align_corners=False)
    top, left = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    return spm_preprocess(x[..., top : top + size, left : left + size], size, mean, std)


def _clamp_first(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:  # noqa: ANN001
    return spm_preprocess(images.clamp(-1, 1), size, mean, std)


@pytest.mark.parametrize("wrong", [_antialiased, _floor_crop, _python_round_sizes, _clamp_first],
                         ids=["antialiased", "floor-crop", "python-round-sizes", "clamp-first"])
def test_other_image_paths_would_not_match(trained: StepAwarePreferenceModel, wrong: Callable,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The test can fail: each rule of the release's image path changes the scores far beyond
    the tolerance (the old antialiased path in every resized group)."""
    import spo.preference.clip_scorer as clip_scorer

    monkeypatch.setattr(clip_scorer, "spm_preprocess", wrong)
    gaps = {g["key"]: max(float((_scores(trained, g, t) - _release(g, t)).abs().max()) for t in (0, 501)) for g in GROUPS}
    assert max(gaps.values()) > 100 * SCORE_TOL, gaps
    if wrong is _antialiased:  # downscaled and cropped groups all move
        assert min(gaps["64x64"], gaps["48x80"], gaps["37x41"]) > 100 * SCORE_TOL, gaps


def test_identity_init_is_the_base_clip_at_every_t() -> None:
    """Before training, the SPM equals its base CLIP for every t: ours (our identity init), the
    release's (its ``init_adaln_paras``) and the plain CLIP all give the same scores."""
    spm = StepAwarePreferenceModel.from_pretrained(str(BASE))
    base = CLIPScorer.from_pretrained(str(BASE), preprocessing="release")
    for group in GROUPS:
        plain = _scores(base, group, 0)
        torch.testing.assert_close(plain, _release(group, 0, "base_scores"), rtol=0, atol=SCORE_TOL)
        for t in TIMESTEPS:
            torch.testing.assert_close(_release(group, t, "identity_scores"), _release(group, t, "base_scores"), rtol=0, atol=1e-5)
            torch.testing.assert_close(_scores(spm, group, t), plain, rtol=0, atol=1e-5)


def test_the_released_checkpoint_loads_as_a_hub_file_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``preference.checkpoint=REPO_ID/FILE`` (the presets' reference to the released SPM) is
    fetched through huggingface_hub; offline it comes from the hub cache, here a faked one
    holding the fixture under the released file's name, and scores as the local file does."""
    import shutil

    import huggingface_hub.constants as hub

    repo, name, commit = "SPO-Diffusion-Models/Step-Aware_Preference_Models", "sd-v1-5_step-aware_preference_model.bin", "0" * 40
    folder = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(CHECKPOINT, folder / "snapshots" / commit / name)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    from_hub = StepAwarePreferenceModel.from_pretrained(str(BASE), checkpoint=f"{repo}/{name}")
    local = StepAwarePreferenceModel.from_pretrained(str(BASE), checkpoint=str(CHECKPOINT))
    group = GROUPS[0]
    torch.testing.assert_close(_scores(from_hub, group, 501), _scores(local, group, 501), rtol=0, atol=0)
    from spo.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="not-there.bin"):
        StepAwarePreferenceModel.from_pretrained(str(BASE), checkpoint=f"{repo}/not-there.bin")
