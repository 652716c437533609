"""`spo eval` on models `spo train` did not make (issue 21, point 3), on tiny pipelines built
here, offline: a fine-tuned diffusers pipeline (only its UNet is taken) and LoRA files in
diffusers', peft's and the release's older (`lora.down` / `lora.up`) key naming, each paired with
a named base under the base's noise; hub references through a faked `hf_hub_download`.

What each test pins: the images a target makes are exactly those of the same weights loaded the
reference way (our run's format, or the fine-tuned UNet put into the base pipeline by hand), and
differ from the base's; bad input is one `error:` line, exit code 2, nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spo.cli import main
from spo.evaluation.external import target_name
from spo.evaluation.targets import resolve_target

PROMPTS = ["a red cube", "a blue ball on grass"]
SD15_LORA = "SPO-Diffusion-Models/SPO-SD-v1-5_4k-p_10ep_LoRA/spo-sd-v1-5_4k-p_10ep_lora_diffusers.safetensors"
SD15_PIPELINE = "SPO-Diffusion-Models/SPO-SD-v1-5_4k-p_10ep"


def _base(kind: str, path: Path) -> list[str]:
    """``--base KIND`` with overrides that make the tiny pipeline fast on the CPU."""
    return ["--base", kind, f"model.pretrained={path}", "model.resolution=32", "model.device=cpu",
            "model.dtype=float32", "model.vae=null"]


def _eval(argv: list[str], prompts: Path, out: Path) -> dict:
    code = main(["eval", *argv, "--prompts", str(prompts), "--seeds", "1", "--steps", "2", "--output", str(out)])
    assert code == 0
    return json.loads((out / "eval.json").read_text())


def _pixels(out: Path, model: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(p), dtype=np.int16) for p in sorted((out / "images" / model).glob("*.png"))]


def _same(out: Path, model: str, reference: Path, ref_model: str) -> bool:
    a, b = _pixels(out, model), _pixels(reference, ref_model)
    return len(a) == len(b) == len(PROMPTS) and all(np.array_equal(x, y) for x, y in zip(a, b))


def _differs(out: Path, model: str, other: str) -> bool:
    return all(np.abs(x - y).max() > 8 for x, y in zip(_pixels(out, model), _pixels(out, other)))


@pytest.fixture()
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


class FakeHub:
    """A folder standing for the hub: ``hf_hub_download(repo, file)`` returns ``root/repo/file``
    (a missing file raises, as the real client does offline); ``calls`` records each request."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[tuple[str, str]] = []

    def download(self, repo_id: str, filename: str, **_: object) -> str:
        self.calls.append((repo_id, filename))
        path = self.root / repo_id / filename
        if not path.is_file():
            raise FileNotFoundError(f"{filename} is not in {repo_id}")
        return str(path)


@pytest.fixture()
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    import huggingface_hub

    hub = FakeHub(tmp_path / "hub")
    hub.root.mkdir()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.download)
    return hub


def _lora_run(kind: str, pretrained: Path, run: Path, alpha: float | None) -> tuple[Path, dict[str, torch.Tensor]]:
    """A run directory as `spo train` leaves it (random B, so the LoRA changes the UNet); returns
    it and the adapter's peft state dict (module keys, ``lora_A.weight``)."""
    from peft.utils import get_peft_model_state_dict

    from spo.backbones import load_backbone
    from spo.config import LoRAConfig
    from spo.config import load_config, save_config

    config = load_config(kind, [f"model.pretrained={pretrained}", "model.resolution=32", "model.device=cpu",
                                "model.dtype=float32", "model.vae=null"])
    save_config(config, run / "config.yaml")
    backbone = load_backbone(config.model)
    params = backbone.attach_lora(LoRAConfig(rank=2, alpha=alpha))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.3)
    backbone.save_lora(run / "lora")
    state = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(backbone.unet, adapter_name="spo").items()}
    return run, state


def _save_old_naming(state: dict[str, torch.Tensor], path: Path, alpha: float | None = None) -> Path:
    """The release's LoRA file: diffusers' own PEFT -> older-diffusers conversion (what the
    release's train_spo.py runs before `save_lora_weights`), ``unet.``-prefixed; with ``alpha``,
    one ``unet.<module>.alpha`` per module as well."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    old = convert_state_dict_to_diffusers(state)
    assert all((".lora.down." in k or ".lora.up." in k) for k in old)
    if alpha is not None:
        for module in {k.rsplit(".lora.", 1)[0] for k in old}:
            old[f"{module}.alpha"] = torch.tensor(alpha)
    StableDiffusionPipeline.save_lora_weights(str(path.parent), unet_lora_layers=old, weight_name=path.name)
    return path


def _save_peft_naming(state: dict[str, torch.Tensor], folder: Path, alpha: float | None = None) -> Path:
    """peft's `PeftModel.save_pretrained` layout: ``base_model.model.``-prefixed keys in
    ``adapter_model.safetensors``, and (with ``alpha``) its ``adapter_config.json``."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"base_model.model.{k}": v for k, v in state.items()}, str(folder / "adapter_model.safetensors"))
    if alpha is not None:
        LoraConfig(r=2, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"]).save_pretrained(str(folder))
    return folder / "adapter_model.safetensors"


def test_lora_files_in_three_namings_make_the_runs_images(tiny_sd15_path: Path, tmp_path: Path, prompts: Path,
                                                         fake_hub: FakeHub) -> None:
    """The release's case (alpha = rank, no alpha tensors): the same LoRA as our run's file, as
    peft's file and in the older naming fetched as REPO_ID/FILE makes exactly the run's images,
    and not the base's."""
    run, state = _lora_run("sd15", tiny_sd15_path, tmp_path / "spo-run", alpha=None)
    ours = tmp_path / "files" / "ours.safetensors"
    ours.parent.mkdir()
    shutil.copy(run / "lora" / "pytorch_lora_weights.safetensors", ours)
    peft_file = _save_peft_naming(state, tmp_path / "peft-adapter")
    repo, _, filename = SD15_LORA.rpartition("/")
    _save_old_naming(state, fake_hub.root / repo / filename)
    out = tmp_path / "eval"
    ev = _eval([*_base("sd15", tiny_sd15_path), str(run), str(ours), str(peft_file.parent), SD15_LORA], prompts, out)
    keys = ["base", "spo-run", "ours", "peft-adapter", "spo-sd-v1-5_4k-p_10ep_lora_diffusers"]
    assert list(ev["models"]) == keys
    namings = {k: ev["models"][k].get("lora_naming") for k in keys[2:]}
    assert namings == {"ours": "diffusers", "peft-adapter": "peft", "spo-sd-v1-5_4k-p_10ep_lora_diffusers": "diffusers-old"}
    assert ev["models"][keys[-1]]["source"] == SD15_LORA and (repo, filename) in fake_hub.calls
    assert _differs(out, "spo-run", "base")
    for key in keys[2:]:
        assert _same(out, key, out, "spo-run"), key
    # the same evaluation again: every model's identity matches, nothing is made again
    assert main(["eval", *_base("sd15", tiny_sd15_path), str(run), str(ours), str(peft_file.parent), SD15_LORA,
                 "--prompts", str(prompts), "--seeds", "1", "--steps", "2", "--output", str(out)]) == 0


def test_lora_alpha_travels_in_every_naming(tiny_sd15_path: Path, tmp_path: Path, prompts: Path) -> None:
    """alpha != rank (scale 0.5): our file's metadata, peft's adapter_config.json and the older
    naming's ``.alpha`` tensors each give the run's images; without its alpha the older file
    makes another model (so the alpha is what was read)."""
    run, state = _lora_run("sd15", tiny_sd15_path, tmp_path / "half-run", alpha=1.0)
    old = _save_old_naming(state, tmp_path / "old" / "old_alpha.safetensors", alpha=1.0)
    no_alpha = _save_old_naming(state, tmp_path / "old" / "old_no_alpha.safetensors")
    peft_file = _save_peft_naming(state, tmp_path / "peft-alpha", alpha=1.0)
    out = tmp_path / "eval"
    ev = _eval([*_base("sd15", tiny_sd15_path), str(run), str(old), str(no_alpha), str(peft_file)], prompts, out)
    assert list(ev["models"]) == ["base", "half-run", "old_alpha", "old_no_alpha", "peft-alpha"]
    assert _same(out, "old_alpha", out, "half-run") and _same(out, "peft-alpha", out, "half-run")
    assert not _same(out, "old_no_alpha", out, "half-run") and _differs(out, "half-run", "base")


def _fine_tuned_pipeline(kind: str, base: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(a fine-tuned pipeline: the base with a perturbed UNet AND a perturbed text encoder, the
    reference: the base pipeline with only that UNet), both saved with save_pretrained."""
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(str(base))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pipeline.unet.parameters():
            p.add_(torch.randn_like(p) * 0.05 * (p.std() if p.numel() > 1 else 1.0))
    reference = tmp_path / "reference-pipeline"
    pipeline.save_pretrained(str(reference), safe_serialization=True)
    with torch.no_grad():
        for p in pipeline.text_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    tuned = tmp_path / f"tuned-{kind}"
    pipeline.save_pretrained(str(tuned), safe_serialization=True)
    return tuned, reference


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_a_fine_tuned_pipeline_is_evaluated_by_its_unet(kind: str, tmp_path: Path, prompts: Path, fake_hub: FakeHub,
                                                        request: pytest.FixtureRequest,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A local pipeline directory and the same pipeline as a hub id: their images are exactly
    those of the base pipeline holding that UNet (not those of its own text encoder), and differ
    from the base's; the default output is runs/eval-NAME."""
    base = request.getfixturevalue(f"tiny_{kind}_path")
    tuned, reference = _fine_tuned_pipeline(kind, base, tmp_path)
    (fake_hub.root / "SPO-Diffusion-Models").mkdir()
    (fake_hub.root / SD15_PIPELINE).symlink_to(tuned, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    argv = [*_base(kind, base), str(tuned), SD15_PIPELINE]
    ev = _eval(argv, prompts, tmp_path / "eval")
    assert list(ev["models"]) == ["base", f"tuned-{kind}", "SPO-SD-v1-5_4k-p_10ep"]
    assert ev["models"]["SPO-SD-v1-5_4k-p_10ep"]["source"] == SD15_PIPELINE
    assert Path(ev["models"][f"tuned-{kind}"]["unet"]) == tuned / "unet"
    ref = _eval(["--base", kind, f"model.pretrained={reference}", "model.resolution=32", "model.device=cpu",
                 "model.dtype=float32", "model.vae=null"], prompts, tmp_path / "reference-eval")
    assert list(ref["models"]) == ["base"]
    for key in (f"tuned-{kind}", "SPO-SD-v1-5_4k-p_10ep"):
        assert _same(tmp_path / "eval", key, tmp_path / "reference-eval", "base"), key
        assert _differs(tmp_path / "eval", key, "base"), key
    # one target, no --output: runs/eval-NAME
    assert main(["eval", *_base(kind, base), str(tuned), "--prompts", str(prompts), "--seeds", "1", "--steps", "2"]) == 0
    assert (tmp_path / "runs" / f"eval-tuned-{kind}" / "eval.json").is_file()


def test_target_names() -> None:
    assert target_name(SD15_PIPELINE, "pipeline") == "SPO-SD-v1-5_4k-p_10ep"
    assert target_name(SD15_LORA, "lora") == "spo-sd-v1-5_4k-p_10ep_lora_diffusers"
    assert target_name("owner/my-repo/pytorch_lora_weights.safetensors", "lora") == "my-repo"
    assert target_name("owner/my repo!/x y.safetensors", "lora") == "x-y"
    # read without the network: a hub id or hub file is only classified here
    assert resolve_target(SD15_PIPELINE).kind == "pipeline"
    assert resolve_target(SD15_LORA).kind == "lora" and resolve_target(SD15_LORA).config is None
    assert resolve_target("sd15").kind == "config"
    # unique keys: the hub owner or the parent folder, then a number; never "base"
    from spo.config import load_config
    from spo.evaluation.targets import Target, eval_models

    def lora(source: str, name: str) -> Target:
        return Target(name, None, kind="lora", source=source, lora=Path("/nowhere") / name)

    models = eval_models([lora("a/r/x.safetensors", "x"), lora("b/r/x.safetensors", "x"), lora("a/q/x.safetensors", "x"),
                          lora("c/r/base.safetensors", "base")], load_config("sd15"))
    assert [m.key for m in models] == ["base", "x", "b-x", "a-x", "c-base"]


# ----------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def bad_inputs(tiny_sd15_path: Path, tiny_sdxl_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Inputs of the bad cases (never written by a case)."""
    from safetensors.torch import save_file

    i = tmp_path_factory.mktemp("bad")
    (i / "prompts.txt").write_text("a red cube\n")
    save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(i / "unet_weights.safetensors"))
    (i / "garbage.safetensors").write_bytes(b"not a weights file")
    _, sdxl_state = _lora_run("sdxl", tiny_sdxl_path, i / "sdxl-run", alpha=None)
    save_file({f"unet.{k}": v for k, v in sdxl_state.items()}, str(i / "sdxl_lora.safetensors"))
    _, state = _lora_run("sd15", tiny_sd15_path, i / "sd15-run", alpha=None)
    a_key = next(k for k in state if k.endswith("lora_A.weight"))
    moved = {f"unet.{k}": v for k, v in state.items()}
    moved["unet.down_blocks.7.attn.to_q.lora_A.weight"] = state[a_key].clone()
    moved["unet.down_blocks.7.attn.to_q.lora_B.weight"] = state[a_key.replace("lora_A", "lora_B")].clone()
    save_file(moved, str(i / "partly_fitting.safetensors"))
    save_file({f"unet.{k}": v for k, v in state.items() if "lora_A" in k}, str(i / "half_lora.safetensors"))
    save_file({**{f"unet.{k}": v for k, v in state.items()},
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32)},
              str(i / "with_text_encoder.safetensors"))
    shutil.copytree(tiny_sdxl_path, i / "sdxl-pipeline")
    (i / "emptydir").mkdir()
    return i


def _sd15_base(i: Path, tiny_sd15_path: Path) -> list[str]:
    return _base("sd15", tiny_sd15_path) + ["--prompts", str(i / "prompts.txt"), "--output", str(i / "out" / "ev")]


BAD = {
    "a file that is no LoRA": ("unet_weights.safetensors", "conv_in.weight"),
    "a file that is no weights file": ("garbage.safetensors", "garbage.safetensors"),
    "a LoRA of another architecture": ("sdxl_lora.safetensors", "does not fit the base's unet"),
    "a LoRA that partly fits": ("partly_fitting.safetensors", "fit no module"),
    "a LoRA with only lora_A": ("half_lora.safetensors", "incomplete"),
    "a LoRA for the text encoder too": ("with_text_encoder.safetensors", "text encoder"),
    "a pipeline of another architecture": ("sdxl-pipeline", "another architecture"),
    "a missing LoRA file": ("missing.safetensors", "missing.safetensors"),
    "a directory of nothing": ("emptydir", "emptydir"),
    "a hub pipeline not in the cache": ("@someone/not-cached-pipeline", "someone/not-cached-pipeline"),
    "a hub LoRA not in the cache": ("@someone/not-cached/lora.safetensors", "someone/not-cached"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_external_target(name: str, bad_inputs: Path, tiny_sd15_path: Path, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from test_bad_inputs import _assert_clear_error, _run, _tree

    target, needle = BAD[name]
    target = target[1:] if target.startswith("@") else str(bad_inputs / target)
    monkeypatch.chdir(tmp_path)
    before = _tree(bad_inputs)
    code, err = _run(["eval", *_sd15_base(bad_inputs, tiny_sd15_path), target], capsys)
    _assert_clear_error(code, err, needle)
    assert _tree(bad_inputs) == before, name
    assert list(tmp_path.iterdir()) == [], name


def test_a_released_model_needs_a_base(bad_inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from test_bad_inputs import _assert_clear_error, _run

    monkeypatch.chdir(tmp_path)
    code, err = _run(["eval", SD15_PIPELINE, "--prompts", str(bad_inputs / "prompts.txt")], capsys)
    _assert_clear_error(code, err, "--base")
    assert "no such local path" in err and list(tmp_path.iterdir()) == []
