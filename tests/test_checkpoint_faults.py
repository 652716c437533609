"""Damaged checkpoints: a truncated or corrupted latest checkpoint is detected by its manifest
and resume falls back to the previous one; a write killed midway leaves the previous intact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fixed_scorers import brightness
from spo.cli import main
from spo.config import load_config
from spo.training import CheckpointError, SPOTrainer, list_checkpoints
from spo.training.checkpoint import MANIFEST, checkpoint_problem


def _config(model: Path, prompts: Path, rounds: int = 3):  # noqa: ANN202
    return load_config("sd15", [
        f"model.pretrained={model}", "model.resolution=32", "model.device=cpu", "model.dtype=float32",
        "train.mixed_precision=no", f"data.prompts={prompts}", f"train.rounds={rounds}", "train.prompts_per_round=2",
        "train.batch_size=8", "sampling.num_inference_steps=6", "pools.divert_start_step=2", "pools.threshold=0.0",
        "optimizer.lr=1e-3", "logging.tensorboard=false", "logging.checkpoint_every=1",
    ])


@pytest.fixture(scope="module")
def finished(tiny_sd15_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    prompts = tmp_path_factory.mktemp("prompts") / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    run = tmp_path_factory.mktemp("runs") / "run"
    SPOTrainer(_config(tiny_sd15_path, prompts, rounds=2), run, scorer=brightness, progress=False).train()
    return run, prompts


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def test_every_checkpoint_has_a_manifest_that_it_satisfies(finished: tuple[Path, Path]) -> None:
    run, _ = finished
    checkpoints = list_checkpoints(run)
    assert [c.name for c in checkpoints] == ["round-000001", "round-000002"]
    for c in checkpoints:
        assert (c / MANIFEST).exists() and checkpoint_problem(c) is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(
        damage: str, finished: tuple[Path, Path], tiny_sd15_path: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    run, prompts = finished
    run = _copy(run, tmp_path)
    target = run / "checkpoints" / "round-000002" / "trainable.safetensors"
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        target.unlink()
    trainer = SPOTrainer(_config(tiny_sd15_path, prompts, rounds=2), run, scorer=brightness, resume=True,
                         progress=False)
    assert trainer.resume_from is not None and trainer.resume_from.name == "round-000001"
    assert trainer.rounds_done == 1
    out = capsys.readouterr().out
    assert "warning: checkpoint round-000002 is damaged: trainable.safetensors" in out and "round-000001" in out


def test_no_intact_checkpoint_is_a_clear_error(finished: tuple[Path, Path], tiny_sd15_path: Path,
                                              tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, prompts = finished
    run = _copy(run, tmp_path)
    for c in list_checkpoints(run):
        (c / "optimizer.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no intact checkpoint .*optimizer.pt is 0 bytes"):
        SPOTrainer(_config(tiny_sd15_path, prompts, rounds=2), run, scorer=brightness, resume=True, progress=False)
    config_args = ["train", "sd15", "--output", str(run), "--resume", f"model.pretrained={tiny_sd15_path}",
                   "model.resolution=32", "model.device=cpu", f"data.prompts={prompts}", "train.rounds=2",
                   "logging.tensorboard=false", "sampling.num_inference_steps=6", "pools.divert_start_step=2",
                   "train.prompts_per_round=2", "train.batch_size=8", "pools.threshold=0.0", "optimizer.lr=1e-3",
                   "logging.checkpoint_every=1", "train.mixed_precision=no", "model.dtype=float32"]
    capsys.readouterr()
    assert main(config_args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no intact checkpoint") and "Traceback" not in err


def test_a_write_killed_midway_leaves_the_previous_checkpoint(tiny_sd15_path: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import spo.training.checkpoint as checkpoint

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    run = tmp_path / "run"
    real_save = checkpoint.torch.save
    calls = {"optimizer": 0}

    class Killed(BaseException):
        pass

    def dying_save(obj, path, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        if Path(path).name == "optimizer.pt":
            calls["optimizer"] += 1
            if calls["optimizer"] == 2:  # inside the second checkpoint's write
                raise Killed
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", dying_save)
    with pytest.raises(Killed):
        SPOTrainer(_config(tiny_sd15_path, prompts), run, scorer=brightness, progress=False).train()
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert [c.name for c in list_checkpoints(run)] == ["round-000001"]
    assert checkpoint_problem(run / "checkpoints" / "round-000001") is None
    resumed = SPOTrainer(_config(tiny_sd15_path, prompts), run, scorer=brightness, resume=True, progress=False)
    assert resumed.rounds_done == 1
    result = resumed.train()
    assert result.rounds == 3 and [c.name for c in list_checkpoints(run)] == ["round-000002", "round-000003"]
    assert torch.isfinite(torch.cat([p.detach().flatten() for p in resumed.params])).all()


def test_a_failed_checkpoint_write_is_one_error_line_and_leaves_no_half_written_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`spo train` when the disk fills during a checkpoint: exit 1 (not the user's input), one
    `error:` line naming the checkpoint and the cause, no traceback, no temporary directory."""
    from spo.training import checkpoint as checkpoint_module

    def disk_full(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", disk_full)
    run = tmp_path / "run"
    code = main(["train", "--output", str(run), "train.rounds=1", "train.prompts_per_round=2",
                 "sampling.num_inference_steps=6", "logging.tensorboard=false"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1, err
    assert lines[-1].startswith("error: writing checkpoint") and "round-000001" in lines[-1], err
    assert "No space left on device" in lines[-1] and "Traceback" not in err, err
    assert list((run / "checkpoints").iterdir()) == []
