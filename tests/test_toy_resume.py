"""`spo toy pretrain` and the toy CLIP stage resume exactly: an interrupted run, resumed, ends
with the weights of an uninterrupted one (issue: faults and bad input, point 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spo.cli import main
from spo.toy.clip import ToyCLIPSettings, pretrain_toy_clip
from spo.toy.loop_checkpoint import ToyTrainingError
from spo.toy.pretrain import PretrainSettings, pretrain
from spo.training import list_checkpoints


def _same_files(a: Path, b: Path) -> None:
    assert load_file(str(a)).keys() == load_file(str(b)).keys()
    left, right = load_file(str(a)), load_file(str(b))
    different = [k for k in left if not torch.equal(left[k], right[k])]
    assert not different, different[:5]


def test_toy_pretraining_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    settings = PretrainSettings(steps=7, batch_size=4, snapshots=[0.5])
    whole = pretrain(tmp_path / "whole", settings, progress=False, checkpoint_every=2)
    # killed after step 5: the latest checkpoint is step 4 (and the snapshot of step 3 exists)
    stopped = pretrain(tmp_path / "cut", settings, progress=False, checkpoint_every=2, stop_after=5)
    assert stopped["stopped_after"] == 5 and not (tmp_path / "cut" / "pretrain.json").exists()
    assert [p.name for p in list_checkpoints(tmp_path / "cut" / "pretrain-run", "step")] == ["step-000002", "step-000004"]
    with pytest.raises(ToyTrainingError, match="--resume"):  # never overwritten without --resume
        pretrain(tmp_path / "cut", settings, progress=False, checkpoint_every=2)
    resumed = pretrain(tmp_path / "cut", settings, progress=False, checkpoint_every=2, resume=True)
    for model in ("base", "snapshot-00003"):
        for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
            _same_files(tmp_path / "whole" / model / part, tmp_path / "cut" / model / part)
    assert resumed["loss_first_100"] == whole["loss_first_100"] and resumed["loss_last_100"] == whole["loss_last_100"]


def test_toy_pretraining_refuses_to_resume_with_other_settings(tmp_path: Path) -> None:
    pretrain(tmp_path, PretrainSettings(steps=4, batch_size=4, snapshots=[]), progress=False, checkpoint_every=2,
             stop_after=3)
    with pytest.raises(ToyTrainingError, match="batch_size"):
        pretrain(tmp_path, PretrainSettings(steps=4, batch_size=2, snapshots=[]), progress=False, resume=True)


def test_toy_clip_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    settings = ToyCLIPSettings(steps=5, batch_size=8)
    whole = pretrain_toy_clip(tmp_path / "whole" / "clip", settings, progress=False, checkpoint_every=2)
    pretrain_toy_clip(tmp_path / "cut" / "clip", settings, progress=False, checkpoint_every=2, stop_after=3)
    assert not (tmp_path / "cut" / "clip" / "toy_clip.json").exists()
    assert [p.name for p in list_checkpoints(tmp_path / "cut" / "clip-run", "step")] == ["step-000002"]
    resumed = pretrain_toy_clip(tmp_path / "cut" / "clip", settings, progress=False, checkpoint_every=2, resume=True)
    _same_files(tmp_path / "whole" / "clip" / "model.safetensors", tmp_path / "cut" / "clip" / "model.safetensors")
    assert resumed["loss_last"] == whole["loss_last"]
    assert sorted(p.name for p in (tmp_path / "cut" / "clip").iterdir()) == sorted(
        p.name for p in (tmp_path / "whole" / "clip").iterdir())  # the model directory holds the model alone


def test_spo_toy_pretrain_resume_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pre"
    pretrain(out, PretrainSettings(steps=6, batch_size=4), progress=False, checkpoint_every=2, stop_after=3)
    code = main(["toy", "pretrain", "--output", str(out), "--steps", "6", "--batch-size", "4"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines()[-1].startswith("error:") and "--resume" in err
    assert main(["toy", "pretrain", "--output", str(out), "--steps", "6", "--batch-size", "4", "--resume"]) == 0
    assert json.loads((out / "pretrain.json").read_text())["settings"]["steps"] == 6


def test_flow_pretraining_in_miniature(tmp_path: Path) -> None:
    """`spo toy pretrain --objective flow`: the same networks with a flow-matching scheduler,
    loaded back as a flow backbone (its schedule is the flow SDE), resumable like the other."""
    from spo.diffusion import FlowSDESchedule
    from spo.toy.model import ToyBackbone

    settings = PretrainSettings(steps=6, batch_size=4, snapshots=[])
    summary = pretrain(tmp_path / "whole", settings, progress=False, objective="flow", checkpoint_every=2)
    assert summary["objective"] == "flow" and summary["loss_last_100"] > 0
    pretrain(tmp_path / "cut", settings, progress=False, objective="flow", checkpoint_every=2, stop_after=3)
    with pytest.raises(ToyTrainingError, match="objective"):  # an epsilon run cannot resume a flow one
        pretrain(tmp_path / "cut", settings, progress=False, resume=True)
    pretrain(tmp_path / "cut", settings, progress=False, objective="flow", checkpoint_every=2, resume=True)
    _same_files(tmp_path / "whole" / "base" / "unet" / "diffusion_pytorch_model.safetensors",
                tmp_path / "cut" / "base" / "unet" / "diffusion_pytorch_model.safetensors")
    backbone = ToyBackbone.from_pretrained(str(tmp_path / "whole" / "base"), device="cpu")
    assert isinstance(backbone.schedule(4), FlowSDESchedule)
