"""Mistakes on the command line end with exit code 2, one `error:` line naming the value, no
traceback, and nothing written (issue: faults and bad input)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spo.cli import main


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def _assert_clear_error(code: int, err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert lines and lines[-1].startswith("error:") and needle in lines[-1], err
    assert "Traceback" not in err and "weights_only=False" not in err, err


def _toy(tmp_path: Path, *extra: str) -> list[str]:
    return ["train", "--output", str(tmp_path / "run"), "train.rounds=1", "train.prompts_per_round=2",
            "sampling.num_inference_steps=6", "logging.tensorboard=false", *extra]


def test_an_output_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "afile"
    target.write_text("mine")
    code, err = _run(["train", "--output", str(target), "train.rounds=1"], capsys)
    _assert_clear_error(code, err, str(target))
    assert target.read_text() == "mine"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the request can be honoured")
def test_cuda_asked_for_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(_toy(tmp_path, "model.device=cuda"), capsys)
    _assert_clear_error(code, err, "'cuda'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("device", ["cpu", "nonsense"])
def test_device_and_dtype_that_cannot_be_honoured(device: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(_toy(tmp_path, f"model.device={device}", "model.dtype=float16"), capsys)
    _assert_clear_error(code, err, "float16" if device == "cpu" else "'nonsense'")
    assert not (tmp_path / "run").exists()


def test_garbage_preference_checkpoint_is_refused_and_the_run_dir_removed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    garbage = tmp_path / "spm.bin"
    garbage.write_bytes(b"not a checkpoint at all")
    code, err = _run(_toy(tmp_path, f"preference.checkpoint={garbage}"), capsys)
    _assert_clear_error(code, err, str(garbage))
    assert "never pickled code" in err
    assert not (tmp_path / "run").exists()  # created by this call, removed on the failed start


def test_a_failed_start_keeps_an_existing_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    garbage = tmp_path / "spm.bin"
    garbage.write_bytes(b"\x00\x01")
    code, err = _run(_toy(tmp_path, f"preference.checkpoint={garbage}"), capsys)
    _assert_clear_error(code, err, str(garbage))
    assert (tmp_path / "run" / "notes.txt").read_text() == "keep me"
