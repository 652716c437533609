"""One rule for every option that names weights (:func:`spo.weights.resolve_reference`): a local
path, a hub repo id ``owner/name``, or ``REPO_ID/PATH`` for a file (or folder) inside a repo.

The hub is a faked cache: the files of each repo are laid out as ``huggingface_hub`` keeps them
(``models--owner--name/snapshots/COMMIT/...`` and ``refs/main``) in a temporary directory, which
``huggingface_hub.constants.HF_HUB_CACHE`` points to, and the tests run offline
(``HF_HUB_OFFLINE=1``, tests/conftest.py). So the real ``hf_hub_download`` / ``snapshot_download``
and the real ``from_pretrained`` of transformers and diffusers serve every form from that cache,
as they do for a user offline; ``huggingface_hub.hf_hub_download`` and ``snapshot_download`` are
wrapped to record which repo and which file (or folder) this project asked for. A reference
that is in no cache fails with one line naming the option.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from spo.errors import ModelLoadError
from spo.evaluation.scorers import ScorerSpec
from spo.weights import parse_reference, resolve_reference
from test_scorers_clip_family import _hps_spec, _images, _mlp_state_dict, hps_files  # noqa: F401 - a fixture

COMMIT = "0123456789abcdef0123456789abcdef01234567"
PROMPTS = ["a red cube", "two green dogs on a blue sofa"]
NOT_CACHED = "not in the local hub cache"


class FakeHub:
    """A hub cache in a folder, and the requests this project made of ``huggingface_hub``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[tuple[Any, ...]] = []

    def add(self, repo_id: str, files: dict[str, Path]) -> None:
        """Put ``files`` (path in the repo, or ``"."`` for the top -> a local file or directory,
        copied) in the cache as the repo's ``main`` revision."""
        repo = self.root / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / COMMIT
        snapshot.mkdir(parents=True, exist_ok=True)
        for inside, source in files.items():
            target = snapshot / inside
            if source.is_dir():
                shutil.copytree(source, target, dirs_exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(COMMIT)

    def snapshot(self, repo_id: str) -> Path:
        return self.root / f"models--{repo_id.replace('/', '--')}" / "snapshots" / COMMIT

    def take(self) -> list[tuple[Any, ...]]:
        calls, self.calls = self.calls, []
        return calls


@pytest.fixture()
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    import huggingface_hub
    from huggingface_hub import constants

    fake = FakeHub(tmp_path / "hub-cache")
    fake.root.mkdir()
    real_file, real_snapshot = huggingface_hub.hf_hub_download, huggingface_hub.snapshot_download

    def download(repo_id: str, filename: str, **kwargs: Any) -> str:
        fake.calls.append(("file", repo_id, filename))
        return real_file(repo_id, filename, **kwargs)

    def snapshot(repo_id: str, **kwargs: Any) -> str:
        fake.calls.append(("snapshot", repo_id, tuple(kwargs.get("allow_patterns") or ())))
        return real_snapshot(repo_id, **kwargs)

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(fake.root))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    return fake


def folder(name: str) -> tuple[str, ...]:
    """The ``allow_patterns`` of a folder inside a repo."""
    return (f"{name}/*", f"{name}/**")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- the rule
def test_how_references_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "w.bin").write_bytes(b"")
    assert parse_reference("owner/name").repo_id == "owner/name"
    assert parse_reference("owner/name").path_in_repo is None
    ref = parse_reference("owner/name/sub/w.safetensors")
    assert (ref.repo_id, ref.path_in_repo, ref.local) == ("owner/name", "sub/w.safetensors", None)
    assert parse_reference("bert-base-uncased").repo_id == "bert-base-uncased"  # a legacy id: the hub
    for local in ("runs/a/w.bin", "runs/a", "./owner/name", "/abs/owner/name", "~/owner/name", "owner/name/",
                  "a b/c", "x/../y"):
        assert parse_reference(local).local is not None, local  # exists, or cannot be a hub reference


# ----------------------------------------------------------------------------- files: REPO_ID/FILE, or the option's file
@pytest.fixture(scope="module")
def release_spm(tiny_clip_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """An SPM with changed weights, and its state dict saved as the authors' release saves one."""
    from spo.preference import StepAwarePreferenceModel

    spm = StepAwarePreferenceModel.from_pretrained(str(tiny_clip_path))
    with torch.no_grad():
        for p in spm.model.t_embedder.parameters():
            p.add_(0.05)
        spm.model.visual_projection.weight.mul_(1.1)
    path = tmp_path_factory.mktemp("spm-release") / "spm.bin"
    torch.save(spm.state_dict(), path)
    return spm, path


def test_preference_checkpoint(hub: FakeHub, release_spm: tuple[Any, Path], tiny_clip_path: Path) -> None:
    from spo.preference import StepAwarePreferenceModel

    trained, path = release_spm
    hub.add("owner/spm-release", {"sd15/spm.bin": path})
    images, t = _images(2, 32, 32), torch.tensor([0, 700])
    want = trained(images, PROMPTS, t)
    local = StepAwarePreferenceModel.from_pretrained(str(tiny_clip_path), checkpoint=str(path))
    torch.testing.assert_close(local(images, PROMPTS, t), want)
    assert hub.take() == []
    loaded = StepAwarePreferenceModel.from_pretrained(str(tiny_clip_path), checkpoint="owner/spm-release/sd15/spm.bin")
    assert hub.take() == [("file", "owner/spm-release", "sd15/spm.bin")]
    torch.testing.assert_close(loaded(images, PROMPTS, t), want)
    # a repo alone names no file of it: the option has no default file name
    with pytest.raises(ModelLoadError, match=r"preference\.checkpoint: 'owner/spm-release' names a hub repo.*REPO_ID/FILE"):
        StepAwarePreferenceModel.from_pretrained(str(tiny_clip_path), checkpoint="owner/spm-release")
    assert hub.take() == []


@pytest.mark.parametrize("name, filename", [("hpsv2", "HPS_v2_compressed.pt"), ("hpsv21", "HPS_v2.1_compressed.pt")])
def test_hps_weights(name: str, filename: str, hub: FakeHub, hps_files: dict[str, Path]) -> None:  # noqa: F811
    checkpoint = hps_files["v2"] if name == "hpsv2" else hps_files["v21_dir"] / filename
    hub.add("owner/hps", {filename: checkpoint, "versions/custom.pt": checkpoint, "tokenizer": hps_files["tokenizer"],
                          "config.json": hps_files["config"]})
    images = _images(2, 32, 48, seed=4)
    want = _hps_spec(name, checkpoint, hps_files).load()(images, PROMPTS)
    assert hub.take() == []
    for ref, asked in (("owner/hps", [("file", "owner/hps", filename)]),  # the repo: the scorer's own file
                       ("owner/hps/versions/custom.pt", [("file", "owner/hps", "versions/custom.pt")])):
        got = _hps_spec(name, ref, hps_files).load()(images, PROMPTS)
        assert hub.take() == asked, ref
        torch.testing.assert_close(got, want)
    # its options by the same rule: a tokenizer folder and a config file of a hub repo
    got = ScorerSpec.parse(f"{name}={checkpoint},config=owner/hps/config.json,tokenizer=owner/hps/tokenizer").load()
    assert hub.take() == [("file", "owner/hps", "config.json"), ("snapshot", "owner/hps", folder("tokenizer"))]
    torch.testing.assert_close(got(images, PROMPTS), want)


def test_aesthetic_weights_and_clip(hub: FakeHub, tiny_clip_path: Path, tmp_path: Path) -> None:
    from spo.evaluation.scorers.aesthetic import MLP_FILE

    mlp = tmp_path / MLP_FILE
    torch.save(_mlp_state_dict(), mlp)
    hub.add("owner/aesthetic", {MLP_FILE: mlp, "v2/mlp.pth": mlp})
    hub.add("owner/clip", {".": tiny_clip_path})
    hub.add("owner/bundle", {"clip": tiny_clip_path})
    images = _images(2, 40, 32, seed=5)
    want = ScorerSpec.parse(f"aesthetic={mlp},clip={tiny_clip_path}").load()(images, PROMPTS)
    cases = {
        f"aesthetic=owner/aesthetic,clip={tiny_clip_path}": [("file", "owner/aesthetic", MLP_FILE)],
        f"aesthetic=owner/aesthetic/v2/mlp.pth,clip={tiny_clip_path}": [("file", "owner/aesthetic", "v2/mlp.pth")],
        f"aesthetic={mlp},clip=owner/clip": [],  # a repo id: transformers' from_pretrained reads the cache
        f"aesthetic={mlp},clip=owner/bundle/clip": [("snapshot", "owner/bundle", folder("clip"))],
    }
    for spec, asked in cases.items():
        got = ScorerSpec.parse(spec).load()(images, PROMPTS)
        assert hub.take() == asked, spec
        torch.testing.assert_close(got, want)


def test_image_reward_file_of_a_repo(hub: FakeHub, tmp_path: Path) -> None:
    from test_scorer_image_reward import VISION, WORDS, med_config, original_state_dict

    ours = tmp_path / "image-reward"
    (ours / "tokenizer").mkdir(parents=True)
    torch.save(original_state_dict(), ours / "ImageReward.pt")
    (ours / "med_config.json").write_text(json.dumps(med_config()))
    (ours / "vision.json").write_text(json.dumps(VISION))
    (ours / "tokenizer" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    hub.add("owner/ir", {"v1/ImageReward.pt": ours / "ImageReward.pt", "v1/med_config.json": ours / "med_config.json",
                         "tokenizer": ours / "tokenizer", "vision.json": ours / "vision.json"})
    images = _images(2, 40, 56, seed=6)
    local = f"image_reward={ours / 'ImageReward.pt'},tokenizer={ours / 'tokenizer'},vision_config={ours / 'vision.json'}"
    want = ScorerSpec.parse(local).load()(images, PROMPTS)
    assert hub.take() == []
    got = ScorerSpec.parse("image_reward=owner/ir/v1/ImageReward.pt,tokenizer=owner/ir/tokenizer,"
                           "vision_config=owner/ir/vision.json").load()(images, PROMPTS)
    assert hub.take() == [("file", "owner/ir", "v1/ImageReward.pt"), ("file", "owner/ir", "v1/med_config.json"),
                          ("file", "owner/ir", "vision.json"), ("snapshot", "owner/ir", folder("tokenizer"))]
    torch.testing.assert_close(got, want)


def test_eval_lora_file(hub: FakeHub, tmp_path: Path) -> None:
    from spo.evaluation.external import resolve_lora

    (tmp_path / "run-lora").mkdir()
    lora = tmp_path / "run-lora" / "pytorch_lora_weights.safetensors"
    lora.write_bytes(b"lora bytes")
    hub.add("owner/loras", {"sd15/spo_lora.safetensors": lora})
    assert resolve_lora(str(lora), "target") == lora
    assert resolve_lora(str(lora.parent), "target") == lora  # a directory holding one
    assert hub.take() == []
    fetched = resolve_lora("owner/loras/sd15/spo_lora.safetensors", "target")
    assert hub.take() == [("file", "owner/loras", "sd15/spo_lora.safetensors")]
    assert fetched.read_bytes() == b"lora bytes" and fetched.is_relative_to(hub.root)


# ----------------------------------------------------------------------------- directories: a repo, or a folder of one
def test_model_pretrained_and_vae(hub: FakeHub, tiny_sd15_path: Path) -> None:
    from spo.backbones.sd15 import SD15Backbone

    hub.add("owner/tiny-sd15", {".": tiny_sd15_path})
    hub.add("owner/bundle", {"pipelines/sd15": tiny_sd15_path})
    local = SD15Backbone.from_pretrained(str(tiny_sd15_path))
    assert hub.take() == []
    by_id = SD15Backbone.from_pretrained("owner/tiny-sd15")  # diffusers reads the cache itself
    assert hub.take() == []
    by_folder = SD15Backbone.from_pretrained("owner/bundle/pipelines/sd15")
    assert hub.take() == [("snapshot", "owner/bundle", folder("pipelines/sd15"))]
    for backbone in (by_id, by_folder):
        assert _same_weights(backbone.unet, local.unet) and _same_weights(backbone.vae, local.vae)
    # model.vae: a folder of a repo (the pipeline's own vae/), a repo id, a local directory
    hub.add("owner/tiny-vae", {".": tiny_sd15_path / "vae"})
    for vae, asked in (("owner/tiny-sd15/vae", [("snapshot", "owner/tiny-sd15", folder("vae"))]),
                       ("owner/tiny-vae", []), (str(tiny_sd15_path / "vae"), [])):
        backbone = SD15Backbone.from_pretrained(str(tiny_sd15_path), vae=vae)
        assert hub.take() == asked, vae
        assert _same_weights(backbone.vae, local.vae)


def test_score_decoder(hub: FakeHub, tiny_sd15_path: Path, tmp_path: Path) -> None:
    from spo.backbones.sd15 import SD15Backbone
    from test_score_decoder import _save_tiny_decoder

    taesd = _save_tiny_decoder(tmp_path / "taesd")
    hub.add("owner/taesd", {".": taesd})
    hub.add("owner/decoders", {"sd15/taesd": taesd})
    backbone = SD15Backbone.from_pretrained(str(tiny_sd15_path))
    backbone.load_score_decoder(str(taesd))
    reference = backbone.score_decoder
    for ref, asked in (("owner/taesd", []), ("owner/decoders/sd15/taesd", [("snapshot", "owner/decoders",
                                                                               folder("sd15/taesd"))])):
        backbone.load_score_decoder(ref)
        assert hub.take() == asked, ref
        assert _same_weights(backbone.score_decoder, reference)


def test_preference_pretrained(hub: FakeHub, tiny_clip_path: Path, release_spm: tuple[Any, Path],
                               tmp_path: Path) -> None:
    from spo.preference import StepAwarePreferenceModel

    trained, _ = release_spm
    saved = trained.save(tmp_path / "saved-spm")
    hub.add("owner/clip", {".": tiny_clip_path})
    hub.add("owner/bundle", {"clip": tiny_clip_path, "spm": saved})
    hub.add("owner/spm", {".": saved})
    images, t = _images(2, 32, 32, seed=7), torch.tensor([100, 800])
    clip_want = StepAwarePreferenceModel.from_pretrained(str(tiny_clip_path))(images, PROMPTS, t)
    spm_want = trained(images, PROMPTS, t)
    cases: list[tuple[str, list[tuple[Any, ...]], torch.Tensor]] = [
        # a repo id: asked whether it holds a saved SPM (no), then transformers reads the cache
        ("owner/clip", [("file", "owner/clip", "spm_config.json")], clip_want),
        ("owner/bundle/clip", [("snapshot", "owner/bundle", folder("clip"))], clip_want),
        # a saved SPM (spo train-spm's directory) as a repo, or as a folder of one
        ("owner/spm", [("file", "owner/spm", "spm_config.json"), ("snapshot", "owner/spm", ())], spm_want),
        ("owner/bundle/spm", [("snapshot", "owner/bundle", folder("spm"))], spm_want),
    ]
    for ref, asked, want in cases:
        got = StepAwarePreferenceModel.from_pretrained(ref)(images, PROMPTS, t)
        assert hub.take() == asked, ref
        torch.testing.assert_close(got, want)


def test_pickscore_and_its_processor(hub: FakeHub, tiny_clip_path: Path, tmp_path: Path) -> None:
    from transformers import CLIPModel

    bare = tmp_path / "clip-without-tokenizer"  # as PickScore ships: the processor comes from elsewhere
    CLIPModel.from_pretrained(tiny_clip_path).save_pretrained(bare)
    hub.add("owner/pickscore", {".": bare})
    hub.add("owner/bundle", {"pickscore": bare, "processor": tiny_clip_path})
    images = _images(2, 32, 32, seed=8)
    want = ScorerSpec.parse(f"pickscore={tiny_clip_path}").load()(images, PROMPTS)
    cases = {
        f"pickscore=owner/pickscore,processor={tiny_clip_path}": [],
        "pickscore=owner/bundle/pickscore,processor=owner/bundle/processor": [
            ("snapshot", "owner/bundle", folder("pickscore")), ("snapshot", "owner/bundle", folder("processor"))],
    }
    for spec, asked in cases.items():
        got = ScorerSpec.parse(spec).load()(images, PROMPTS)
        assert hub.take() == asked, spec
        torch.testing.assert_close(got, want)


def test_toy_model_pretrained(hub: FakeHub) -> None:
    from spo.builtin import resolve_weights
    from spo.toy.model import ToyBackbone

    base = Path(resolve_weights("toy:base"))
    hub.add("owner/toy", {".": base})
    hub.add("owner/bundle", {"toy/base": base})
    local = ToyBackbone.from_pretrained("toy:base")
    # the toy format is no diffusers pipeline: a repo is fetched whole, a folder of one as itself
    for ref, asked in (("owner/toy", [("snapshot", "owner/toy", ())]),
                       ("owner/bundle/toy/base", [("snapshot", "owner/bundle", folder("toy/base"))])):
        backbone = ToyBackbone.from_pretrained(ref)
        assert hub.take() == asked, ref
        assert _same_weights(backbone.unet, local.unet)


def test_eval_pipeline_target(hub: FakeHub, tiny_sd15_path: Path) -> None:
    from spo.evaluation.external import resolve_pipeline

    hub.add("owner/tuned", {".": tiny_sd15_path})
    hub.add("owner/bundle", {"sd15": tiny_sd15_path})
    assert resolve_pipeline(str(tiny_sd15_path), "unet", "t") == tiny_sd15_path and hub.take() == []
    wanted = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    for ref, repo, prefix in (("owner/tuned", "owner/tuned", ""), ("owner/bundle/sd15", "owner/bundle", "sd15/")):
        found = resolve_pipeline(ref, "unet", ref)
        assert hub.take() == [("file", repo, prefix + name) for name in wanted], ref
        assert found == hub.snapshot(repo) / prefix.rstrip("/") and (found / "unet" / "config.json").is_file()


# ----------------------------------------------------------------------------- offline, not in the cache
def _checkpoint(ref: str) -> None:
    from spo.preference.spm import StepAwarePreferenceModel

    StepAwarePreferenceModel.load_release_checkpoint(None, ref)  # type: ignore[arg-type] - fails before any use


def _vae(ref: str) -> None:
    from spo.backbones.base import BackboneLoadError
    from spo.weights import resolve_reference as resolve

    resolve(ref, "model.vae", "directory", error=BackboneLoadError)


def _scorer(spec: str) -> Callable[[str], Any]:
    return lambda ref: ScorerSpec.parse(spec.format(ref=ref)).load()


NOT_CACHED_CASES: dict[str, tuple[Callable[[str], Any], str, str]] = {
    "preference.checkpoint, REPO_ID/FILE": (
        _checkpoint, "nobody/none/spm.bin",
        r"^preference\.checkpoint: 'nobody/none/spm\.bin' is no local path, nor could 'spm\.bin' be fetched from "
        r"the hub repo 'nobody/none': " + NOT_CACHED),
    "aesthetic, a repo id (its own file)": (
        _scorer("aesthetic={ref}"), "nobody/none",
        r"^aesthetic: could not fetch 'sac\+logos\+ava1-l14-linearMSE\.pth' from the hub repo 'nobody/none': "
        + NOT_CACHED),
    "aesthetic, REPO_ID/FILE": (
        _scorer("aesthetic={ref}"), "nobody/none/mlp.pth",
        r"^aesthetic: 'nobody/none/mlp\.pth' is no local path, nor could 'mlp\.pth' be fetched .*" + NOT_CACHED),
    "model.vae, a folder of a repo": (
        _vae, "nobody/none/vae",
        r"^model\.vae: 'nobody/none/vae' is no local path, nor could the hub repo 'nobody/none' give its folder "
        r"'vae': " + NOT_CACHED),
    "toy model.pretrained, a repo id": (
        lambda ref: __import__("spo.toy.model", fromlist=["ToyBackbone"]).ToyBackbone.from_pretrained(ref),
        "nobody/none",
        r"^model\.pretrained: 'nobody/none' is no local path, nor could the hub repo 'nobody/none' give its files: "
        + NOT_CACHED),
    "spo eval LoRA, REPO_ID/FILE": (
        lambda ref: __import__("spo.evaluation.external", fromlist=["resolve_lora"]).resolve_lora(ref, ref),
        "nobody/none/lora.safetensors", r"^nobody/none/lora\.safetensors: .*'nobody/none': " + NOT_CACHED),
    "spo eval pipeline, a repo id": (
        lambda ref: __import__("spo.evaluation.external", fromlist=["resolve_pipeline"]).resolve_pipeline(ref, "unet", ref),
        "nobody/none",
        r"^nobody/none: no such local directory, nor could the hub repo 'nobody/none' give its model_index\.json: "
        + NOT_CACHED),
    "preference.pretrained, a folder of a repo": (
        lambda ref: __import__("spo.preference", fromlist=["StepAwarePreferenceModel"])
        .StepAwarePreferenceModel.from_pretrained(ref), "nobody/none/clip",
        r"^preference\.pretrained: 'nobody/none/clip' is no local path, nor could the hub repo 'nobody/none' give "
        r"its folder 'clip': " + NOT_CACHED),
}


@pytest.mark.parametrize("case", sorted(NOT_CACHED_CASES))
def test_offline_and_not_cached_is_one_line_naming_the_option(case: str, hub: FakeHub) -> None:
    load, ref, pattern = NOT_CACHED_CASES[case]
    with pytest.raises(ModelLoadError) as err:
        load(ref)
    message = str(err.value)
    assert re.search(pattern, message), message
    assert "\n" not in message and "Traceback" not in message


def test_a_repo_id_left_to_from_pretrained_fails_as_before(hub: FakeHub, tiny_sd15_path: Path) -> None:
    """``owner/name`` goes to ``from_pretrained``, whose failure the option's loader words."""
    from spo.backbones.base import BackboneLoadError
    from spo.backbones.sd15 import SD15Backbone

    backbone = SD15Backbone.from_pretrained(str(tiny_sd15_path))
    with pytest.raises(BackboneLoadError, match=r"^preference\.decoder: could not load an AutoencoderTiny from 'nobody/none'"):
        backbone.load_score_decoder("nobody/none")
    with pytest.raises(BackboneLoadError, match=r"^model\.pretrained: could not load a StableDiffusionPipeline from 'nobody/none'"):
        SD15Backbone.from_pretrained("nobody/none")
    with pytest.raises(ModelLoadError, match=r"^spm\.relabel: could not load a CLIPModel from 'nobody/none'"):
        from spo.preference.clip_scorer import CLIPScorer

        CLIPScorer.from_pretrained("nobody/none", what="spm.relabel")
    assert hub.take() == []


def test_a_missing_local_path_names_the_option(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere")
    for want, noun in (("file", "file"), ("directory", "directory")):
        with pytest.raises(ModelLoadError, match=rf"^some\.option: no such {noun} '{re.escape(missing)}'"):
            resolve_reference(missing, "some.option", want)
    with pytest.raises(ModelLoadError, match=r"^some\.option: the directory .* holds no 'w\.bin'"):
        resolve_reference(str(tmp_path), "some.option", "file", filename="w.bin")
