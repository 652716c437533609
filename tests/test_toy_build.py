"""The toy world's preference data, toy CLIP / PickScore / SPM, `spo toy build`, built-in refs, demo."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from spo.builtin import BuiltinError, resolve_weights
from spo.cli import main
from spo.config import load_config
from spo.data import PromptsError, load_preference_split, load_prompts
from spo.preference import CLIPScorer, StepAwarePreferenceModel
from spo.training.spm_trainer import SPMTrainer
from spo.toy.build import STAGES, BuildError, BuildSettings, ToyBuild
from spo.toy.grammar import training_prompts, validation_prompts
from spo.toy.preference_data import (
    AESTHETIC_WEIGHT,
    ALIGNMENT_WEIGHT,
    LABEL_NOISE,
    blend,
    generic_label,
    label_statistics,
)


# ---------------------------------------------------------------------- the label blend
def test_generic_label_tie_rule() -> None:
    assert generic_label(0.80, 0.50) == (1.0, 0.0)
    assert generic_label(0.50, 0.80) == (0.0, 1.0)
    assert generic_label(0.50, 0.52) == (0.5, 0.5)  # |gap| < 0.03: a tie
    assert generic_label(0.52, 0.50) == (0.5, 0.5)
    assert generic_label(0.50, 0.54) == (0.0, 1.0)


def test_blend_is_the_documented_mixture() -> None:
    rng = np.random.default_rng(0)
    draws = np.array([blend(0.6, 0.2, rng) for _ in range(20000)])
    assert ALIGNMENT_WEIGHT == 0.7 and AESTHETIC_WEIGHT == 0.3 and LABEL_NOISE == 0.05  # docs/toy-world.md
    assert abs(draws.mean() - (0.7 * 0.6 + 0.3 * 0.2)) < 0.002
    assert abs(draws.std() - 0.05) < 0.002


def test_label_statistics_by_hand() -> None:
    def row(l0: float, al0: float, al1: float, ae0: float, ae1: float) -> dict:
        return {"label_0": l0, "label_1": 1 - l0, "alignment_0": al0, "alignment_1": al1,
                "aesthetic_0": ae0, "aesthetic_1": ae1}

    rows = [
        row(1.0, 1.0, 0.6, 0.2, 0.9),  # winner more aligned, less aesthetic: disagrees with aesthetic
        row(1.0, 1.0, 0.6, 0.9, 0.2),  # agrees with both
        row(0.0, 0.8, 0.8, 0.5, 0.7),  # alignment equal (not counted there); agrees with aesthetic
        row(0.5, 1.0, 0.2, 0.1, 0.9),  # a tie: counted in neither
    ]
    stats = label_statistics(rows)
    assert stats["pairs"] == 4 and stats["tie_rate"] == 0.25
    assert stats["pairs_compared_aesthetic"] == 3 and stats["disagreement_with_aesthetic"] == pytest.approx(1 / 3)
    assert stats["pairs_compared_alignment"] == 2 and stats["disagreement_with_alignment"] == 0.0


# ---------------------------------------------------------------------- a clean reward model (PickScore recipe)
def test_clean_variant_trains_a_reward_model_without_a_diffusion_model(tiny_clip_path: Path, pickapic_path: Path,
                                                                       tmp_path: Path) -> None:
    config = load_config("sd15", [
        f"model.pretrained={tmp_path / 'no-diffusion-model-needed'}", "model.device=cpu",
        f"preference.pretrained={tiny_clip_path}", "preference.variant=clean", f"spm.data={pickapic_path}",
        "spm.steps=80", "spm.lr=1e-3", "spm.batch_size=8", "spm.validate_every=1000", "spm.checkpoint_every=1000",
        "logging.tensorboard=false", "spm.weight_decay=0", "spm.lr_schedule=constant", "spm.mixed_precision=no",
        "model.dtype=float32",
    ])
    trainer = SPMTrainer(config, tmp_path / "run", progress=False)
    assert trainer.backbone is None
    before = trainer.validate()
    assert list(before) == [0]  # one clean "timestep"
    result = trainer.train()
    assert result.validation[0] > max(0.75, before[0] + 0.15), (before, result.validation)
    # the time modules were not trained: the reward model is a plain CLIP
    assert all(not p.requires_grad for m in trainer.spm.time_modules() for p in m.parameters())
    reward_dir = tmp_path / "run" / "reward"
    assert result.spm_path == reward_dir
    from safetensors.torch import load_file

    keys = load_file(str(reward_dir / "model.safetensors")).keys()
    assert not any("adaLN" in k or "t_embedder" in k for k in keys)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["a", "b", "c"]
    reloaded = CLIPScorer.from_pretrained(str(reward_dir))
    torch.testing.assert_close(reloaded(images, prompts), trainer.spm(images, prompts, torch.zeros(3)), rtol=1e-5, atol=1e-5)
    # and an SPM built from it starts as exactly that reward model (identity adaLN)
    spm = StepAwarePreferenceModel.from_pretrained(str(reward_dir))
    assert spm.variant == "step_aware"
    torch.testing.assert_close(spm(images, prompts, torch.tensor([0, 500, 900])), reloaded(images, prompts),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- spo toy build
@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("toy-build")
    assert main(["toy", "build", "--tiny", "--output", str(output)]) == 0
    return output


def test_tiny_build_runs_every_stage(tiny_build: Path) -> None:
    record = json.loads((tiny_build / "build.json").read_text())
    assert set(record["stages"]) == set(STAGES)
    assert all(e["status"] == "built" and e["seconds"] > 0 for e in record["stages"].values())
    # the preference data: Pick-a-Pic columns, both splits, disjoint prompts, labels in {0, .5, 1}
    train = load_preference_split(str(tiny_build / "preference-data"), "train")
    val = load_preference_split(str(tiny_build / "preference-data"), "validation_unique")
    assert {"caption", "jpg_0", "jpg_1", "label_0", "label_1"} <= set(train.column_names)
    assert not set(train["caption"]) & set(val["caption"])
    assert not set(train["caption"]) & set(validation_prompts())
    assert set(train["label_0"]) <= {0.0, 0.5, 1.0} and all(a + b == 1 for a, b in zip(train["label_0"], train["label_1"]))
    stats = record["stages"]["data"]["summary"]
    assert stats["rows"] == {"train": len(train), "validation_unique": len(val)}
    assert 0 <= stats["labels"]["disagreement_with_aesthetic"] <= 1
    # the oracles labelled the images as stored
    from spo.data.pickapic import decode_image
    from spo.toy.oracles import aesthetic

    picture = ((decode_image(train[0]["jpg_0"], 32) + 1) / 2).permute(1, 2, 0).numpy()
    assert aesthetic(picture) == pytest.approx(train[0]["aesthetic_0"], abs=1e-6)
    # the models load: PickScore as a plain CLIPModel directory, the SPM as our SPM
    CLIPScorer.from_pretrained(str(tiny_build / "pickscore"))
    assert StepAwarePreferenceModel.from_pretrained(str(tiny_build / "spm")).variant == "step_aware"


def test_build_is_rerunnable_stage_by_stage(tiny_build: Path) -> None:
    spm_file = tiny_build / "spm" / "spm.safetensors"
    before = spm_file.stat().st_mtime_ns
    record = ToyBuild(tiny_build, BuildSettings.tiny(), progress=False).run()
    assert spm_file.stat().st_mtime_ns == before  # nothing redone
    assert all(e["status"] == "built" for e in record["stages"].values())
    # a lost stage output is placed again from its finished run (no training step redone), later ones kept
    import shutil

    def steps(run: Path) -> int:
        return (run / "metrics.jsonl").read_text().count('"type": "step"')

    reward_weights = (tiny_build / "pickscore" / "model.safetensors").read_bytes()
    pickscore_steps = steps(tiny_build / "pickscore-run")
    shutil.rmtree(tiny_build / "pickscore")
    logs: list[str] = []
    ToyBuild(tiny_build, BuildSettings.tiny(), progress=False, log=logs.append).run()
    assert "[pickscore] running" in logs and "[spm] finished earlier: kept" in logs
    assert (tiny_build / "pickscore" / "model.safetensors").read_bytes() == reward_weights
    assert steps(tiny_build / "pickscore-run") == pickscore_steps
    assert spm_file.stat().st_mtime_ns == before
    # an interrupted SPM run resumes from its checkpoint: only the steps after it are trained again
    spm_run = tiny_build / "spm-run"
    shutil.rmtree(tiny_build / "spm")
    shutil.rmtree(spm_run / "spm")
    shutil.rmtree(spm_run / "checkpoints" / "step-000004")
    ToyBuild(tiny_build, BuildSettings.tiny(), progress=False, log=lambda _: None).run()
    lines = [json.loads(line) for line in (spm_run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines if e.get("type") == "step"] == [1, 2, 3, 4]  # steps 3 and 4 redone, once
    assert (tiny_build / "spm" / "spm.safetensors").read_bytes() == spm_file.read_bytes()


def test_build_is_deterministic(tiny_build: Path, tmp_path: Path) -> None:
    """Same seeds, same software: the later stages rebuilt from the same base model give the same bytes."""
    import shutil

    for name in ["pretrain.json", "base", "snapshot-00003", "snapshot-00008"]:
        source = tiny_build / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    record = ToyBuild(tmp_path, BuildSettings.tiny(), progress=False, log=lambda _: None).run()
    assert record["stages"]["pretrain"]["status"] == "found"
    for stage in ("data", "clip", "pickscore", "spm"):
        assert record["stages"][stage]["status"] == "built"
    for relative in ("clip/model.safetensors", "pickscore/model.safetensors", "spm/spm.safetensors"):
        assert (tmp_path / relative).read_bytes() == (tiny_build / relative).read_bytes(), relative
    original = json.loads((tiny_build / "preference-data" / "statistics.json").read_text())
    rebuilt = json.loads((tmp_path / "preference-data" / "statistics.json").read_text())
    assert {k: v for k, v in rebuilt.items() if k != "seconds"} == {k: v for k, v in original.items() if k != "seconds"}


def test_build_refuses_other_settings(tiny_build: Path, tmp_path: Path) -> None:
    # outputs found on disk must come from this build's settings
    import shutil

    shutil.copytree(tiny_build / "base", tmp_path / "base")
    pretrain_record = json.loads((tiny_build / "pretrain.json").read_text())
    pretrain_record["settings"]["steps"] = 21
    (tmp_path / "pretrain.json").write_text(json.dumps(pretrain_record))
    with pytest.raises(BuildError, match="pretrain.json was made with other settings"):
        ToyBuild(tmp_path, BuildSettings.tiny(), progress=False, log=lambda _: None).run()
    (tmp_path / "build.json").unlink(missing_ok=True)
    (tmp_path / "pretrain.json").unlink()
    (tmp_path / "build.json").write_text("{not json")
    with pytest.raises(BuildError, match="unreadable"):
        ToyBuild(tmp_path, BuildSettings.tiny())
    (tmp_path / "build.json").unlink()
    with pytest.raises(BuildError, match="no source model"):
        ToyBuild(tmp_path, BuildSettings.tiny(), progress=False, log=lambda _: None).run(("data",))
    settings = BuildSettings.tiny()
    settings.clip.steps += 1
    with pytest.raises(BuildError, match="other settings.*clip"):
        ToyBuild(tiny_build, settings)
    with pytest.raises(BuildError, match="unknown stages"):
        ToyBuild(tiny_build, BuildSettings.tiny()).run(("pretrain", "rewards"))


# ---------------------------------------------------------------------- built-in references and defaults
def test_builtin_references() -> None:
    assert Path(resolve_weights("toy:base")).joinpath("toy_model.json").exists()
    assert resolve_weights("/some/path") == "/some/path"
    with pytest.raises(BuiltinError, match="toy:base"):
        resolve_weights("toy:bsae")
    assert load_prompts("toy:training-prompts") == training_prompts()
    assert load_prompts("toy:validation-prompts") == validation_prompts()
    with pytest.raises(PromptsError, match="toy:training-prompts"):
        load_prompts("toy:prompts")


def test_versioned_reward_models_and_builds() -> None:
    from spo.builtin import TOY_DEFAULT_VERSION, TOY_REWARD_VERSIONS

    for version in TOY_REWARD_VERSIONS:
        for model in ("clip", "pickscore", "spm"):
            assert Path(resolve_weights(f"toy:{model}-{version}")).is_dir()
    assert resolve_weights("toy:spm") == resolve_weights(f"toy:spm-{TOY_DEFAULT_VERSION}")
    with pytest.raises(BuiltinError, match="toy:spm-v1"):
        resolve_weights("toy:spm-v0")
    # v1's settings are the defaults the shipped v1 was built with (its build.json records them)
    shipped = json.loads((Path(resolve_weights("toy:spm-v1")).parent / "build.json").read_text())["settings"]
    v1 = json.loads(json.dumps(asdict(BuildSettings.for_version("v1"))))
    for stage in ("pretrain", "clip"):
        assert v1[stage] == shipped[stage]
    for stage in ("data", "pickscore", "spm"):  # fields added since default to what v1 did
        assert {k: v for k, v in v1[stage].items() if k in shipped[stage]} == shipped[stage]
    v2 = BuildSettings.for_version("v2")
    assert asdict(v2.pretrain) == asdict(BuildSettings().pretrain)  # same world, same base model
    assert v2.data.pairs_per_prompt > v1["data"]["pairs_per_prompt"] and v2.data.images_per_model > v1["data"]["images_per_model"]
    with pytest.raises(BuildError, match="unknown build version"):
        BuildSettings.for_version("v9")


def test_no_preset_means_the_toy_world(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    assert main(["config", "show"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["model"]["backbone"] == "toy" and shown["preference"]["pretrained"] == "toy:spm"


def test_shipped_preference_models_load_and_prefer_clean_aligned_renders() -> None:
    """On every scene of the grammar, the shipped toy PickScore ranks a clean render of the prompt
    above a misaligned one and above a speckled one most of the time (benchmarks/toy_reward_models.py
    measures 0.80 and 0.72 on 432 pairs; it is much weaker on blur and bleed)."""
    from spo.toy import all_scenes, degrade, misalign, render
    from spo.toy.render import to_tensor_range

    pickscore = CLIPScorer.from_pretrained("toy:pickscore")
    spm = StepAwarePreferenceModel.from_pretrained("toy:spm")
    rng = np.random.default_rng(1)
    scenes = all_scenes()
    prompts = [s.prompt for s in scenes]
    clean = [render(s, rng) for s in scenes]
    batches = {
        "clean": clean,
        "speckled": [degrade(x, "speckle", 0.5, rng) for x in clean],
        "wrong": [render(misalign(s, rng), rng) for s in scenes],
    }
    s = {k: pickscore(torch.from_numpy(np.stack([to_tensor_range(x) for x in v])), prompts) for k, v in batches.items()}
    assert float((s["clean"] > s["wrong"]).float().mean()) >= 0.7
    assert float((s["clean"] > s["speckled"]).float().mean()) >= 0.6
    # the SPM was trained from it: it depends on t
    images = torch.from_numpy(np.stack([to_tensor_range(x) for x in clean[:4]]))
    t0, t9 = spm(images, prompts[:4], torch.zeros(4)), spm(images, prompts[:4], torch.full((4,), 900))
    assert float((t0 - t9).abs().max()) > 1e-3


# ---------------------------------------------------------------------- the main job, reduced
def test_demo_reduced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["demo", "--output", str(tmp_path), "--seeds", "1", "--eval-prompts", "2", "train.rounds=2",
            "train.prompts_per_round=2", "sampling.num_inference_steps=6", "logging.tensorboard=false"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for word in ("toy PickScore", "aesthetic", "alignment", "fine_tuned - base (paired)", "grid", "report.html"):
        assert word in out
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["protocol"]["reward_model"] == "toy:pickscore-v1" and saved["protocol"]["num_inference_steps"] == 6
    for metric in ("pickscore", "aesthetic", "alignment"):
        # paired difference of means = difference of means
        diff = saved["results"]["fine_tuned"][metric]["mean"] - saved["results"]["base"][metric]["mean"]
        assert saved["differences"]["fine_tuned"][metric]["mean"] == pytest.approx(diff, abs=1e-9)
    page = (tmp_path / "report.html").read_text()
    assert 'id="evaluation"' in page and 'id="training-curves"' in page and "toy PickScore" in page
    from safetensors.torch import load_file

    lora = tmp_path / "spo" / "lora" / "pytorch_lora_weights.safetensors"
    weights = load_file(str(lora))
    metrics = (tmp_path / "spo" / "metrics.jsonl").read_text()
    # rerun: the finished run is resumed, not retrained, and evaluates the same (the file's bytes
    # may differ: safetensors writes its metadata map in an arbitrary order)
    assert main(args) == 0
    assert (tmp_path / "spo" / "metrics.jsonl").read_text() == metrics
    again = load_file(str(lora))
    assert again.keys() == weights.keys() and all(torch.equal(again[k], weights[k]) for k in weights)
    assert json.loads((tmp_path / "eval" / "eval.json").read_text()) == saved
