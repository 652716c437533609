"""Mistakes on the command line end with exit code 2, one `error:` line naming the value, no
traceback, and nothing written (issue: faults and bad input, point 6).

Every case runs `spo ...` in-process from an empty working directory, with its inputs in a
directory of their own; afterwards the inputs, the working directory and the run directory's
parent must be exactly as they were (a refused start removes a run directory it created and
keeps one that existed).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from spo.cli import main
from spo.config import load_config, save_config


@dataclass
class Case:
    argv: Callable[[Path], list[str]]  # given the inputs directory I
    needle: Callable[[Path], str]  # what the error line must name


def _toy(*extra: str) -> Callable[[Path], list[str]]:
    return lambda i: ["train", "--output", str(i / "out" / "run"), "train.rounds=1", "train.prompts_per_round=2",
                      "sampling.num_inference_steps=6", "logging.tensorboard=false",
                      *[e.replace("{I}", str(i)) for e in extra]]


def _cmd(*argv: str) -> Callable[[Path], list[str]]:
    return lambda i: [a.replace("{I}", str(i)) for a in argv]


def _text(value: str) -> Callable[[Path], str]:
    return lambda i: value.replace("{I}", str(i))


NO_CUDA = not torch.cuda.is_available()
CASES: dict[str, Case] = {
    # configurations and YAML
    "unknown preset": Case(_cmd("train", "nosuchpreset", "--output", "{I}/out/run"), _text("'nosuchpreset'")),
    "missing config file": Case(_cmd("train", "{I}/missing.yaml", "--output", "{I}/out/run"), _text("{I}/missing.yaml")),
    "YAML that does not parse": Case(_cmd("train", "{I}/broken.yaml", "--output", "{I}/out/run"), _text("line 3")),
    "YAML that is a list": Case(_cmd("train", "{I}/list.yaml", "--output", "{I}/out/run"), _text("{I}/list.yaml")),
    "two presets": Case(_cmd("train", "sd15", "toy", "--output", "{I}/out/run"), _text("'toy'")),
    "unknown key": Case(_toy("pools.kk=4"), _text("'pools.kk'")),
    "override without a section": Case(_toy("rounds=3"), _text("'rounds'")),
    "value of the wrong type": Case(_toy("train.rounds=abc"), _text("'abc'")),
    "value out of range": Case(_toy("pools.k=1"), _text("pools.k must be >= 2")),
    "several problems on one line": Case(_toy("sampling.num_inference_steps=0"), _text("3 problems")),
    "unknown method": Case(_toy("objective.name=nosuch"), _text("'nosuch'")),
    "deterministic steps for SPO": Case(_toy("sampling.eta=0"), _text("sampling.eta")),
    "unknown option": Case(_cmd("train", "--output", "{I}/out/run", "--bogus"), _text("--bogus")),
    "option out of range": Case(_cmd("eval", "toy", "--num-prompts", "0"), _text("--num-prompts")),
    "a preset given to spo demo": Case(_cmd("demo", "sd15", "--output", "{I}/out/demo"), _text("'sd15'")),
    # output paths
    "output is a file": Case(_cmd("train", "--output", "{I}/afile", "train.rounds=1"), _text("{I}/afile")),
    "output under a file": Case(_cmd("train", "--output", "{I}/afile/run"), _text("{I}/afile")),
    "output holds another run": Case(_cmd("train", "--output", "{I}/other-run", "train.rounds=1"), _text("{I}/other-run")),
    "SPM output holds another run": Case(_cmd("train-spm", "--output", "{I}/other-run", "spm.data={I}/pickapic"),
                                         _text("{I}/other-run")),
    "sample output is a file": Case(_cmd("sample", "--output", "{I}/afile", "--prompt", "a small red circle on a white background"),
                                    _text("{I}/afile")),
    "eval output is a file": Case(_cmd("eval", "toy", "--output", "{I}/afile"), _text("{I}/afile")),
    # prompt files
    "missing prompts file": Case(_toy("data.prompts={I}/missing.txt"), _text("{I}/missing.txt")),
    "empty prompts file": Case(_toy("data.prompts={I}/empty.txt"), _text("{I}/empty.txt")),
    "prompts JSON not a list": Case(_toy("data.prompts={I}/object.json"), _text("{I}/object.json")),
    "prompt outside the toy world": Case(_toy("data.prompts={I}/dog.txt"), _text("'a small red dog'")),
    "eval prompts missing": Case(_cmd("eval", "toy", "--prompts", "{I}/missing.txt", "--output", "{I}/out/ev"),
                                 _text("{I}/missing.txt")),
    # models and checkpoints
    "missing model directory": Case(_toy("model.pretrained={I}/missing"), _text("{I}/missing")),
    "not a pipeline directory": Case(_toy("model.backbone=sd15", "model.pretrained={I}/emptydir"), _text("{I}/emptydir")),
    "missing SPM checkpoint": Case(_toy("preference.checkpoint={I}/missing.bin"), _text("{I}/missing.bin")),
    "garbage SPM checkpoint": Case(_toy("preference.checkpoint={I}/garbage.bin"), _text("{I}/garbage.bin")),
    "SPM checkpoint on the hub, offline": Case(_toy("preference.checkpoint=nobody/no-repo/spm.bin"),
                                               _text("nobody/no-repo/spm.bin")),
    "step-aware scoring without time modules": Case(_toy("preference.pretrained=toy:pickscore"),
                                                    _text("preference.variant=clean")),
    "eval of a run without its LoRA": Case(_cmd("eval", "{I}/unfinished-run", "--output", "{I}/out/ev"),
                                           _text("{I}/unfinished-run")),
    "unknown scorer": Case(_cmd("eval", "toy", "--scorer", "nosuch=x", "--output", "{I}/out/ev"), _text("'nosuch'")),
    "scorer weights missing": Case(_cmd("eval", "toy", "--scorer", "pickscore={I}/missing", "--output", "{I}/out/ev"),
                                   _text("{I}/missing")),
    # data sets
    "missing preference data": Case(_cmd("train-spm", "--output", "{I}/out/run", "spm.data={I}/missing"),
                                    _text("{I}/missing")),
    "preference data without its columns": Case(_cmd("train-spm", "--output", "{I}/out/run", "spm.data={I}/captions.parquet"),
                                                _text("jpg_0")),
    "Diffusion-DPO without data": Case(_cmd("train", "toy-diffusion-dpo", "--output", "{I}/out/run",
                                            "data.preference_data=null"), _text("data.preference_data")),
    # devices, dtypes, processes
    "unknown device": Case(_toy("model.device=nonsense"), _text("'nonsense'")),
    "fp16 weights on the CPU": Case(_toy("model.device=cpu", "model.dtype=float16"), _text("float16")),
    "fp16 autocast on the CPU": Case(_toy("model.device=cpu", "train.mixed_precision=fp16"), _text("'fp16'")),
    "unknown dtype": Case(_toy("model.dtype=half8"), _text("'half8'")),
    "more processes than launched": Case(_toy("train.num_processes=4"), _text("train.num_processes")),
    # resuming
    "resume with another configuration": Case(_cmd("train", "--output", "{I}/resumable", "--resume", "pools.k=3"),
                                              _text("pools.k")),
    "resume with another process count": Case(_cmd("train", "--output", "{I}/two-process-run", "--resume"),
                                              _text("2 processes")),
    "resume with no intact checkpoint": Case(_cmd("train", "--output", "{I}/damaged-run", "--resume"),
                                             _text("round-000001")),
    "toy pretraining over an earlier one": Case(_cmd("toy", "pretrain", "--output", "{I}/pretrained", "--steps", "4"),
                                                _text("{I}/pretrained")),
    "unknown toy build stage": Case(_cmd("toy", "build", "--output", "{I}/out/b", "--stages", "nosuch"), _text("'nosuch'")),
}
if NO_CUDA:
    CASES["CUDA without CUDA"] = Case(_toy("model.device=cuda"), _text("'cuda'"))


def _fake_run(run: Path, overrides: list[str], checkpoint_files: dict[str, str] | None = None) -> None:
    run.mkdir(parents=True)
    save_config(load_config("toy", overrides), run / "config.yaml")
    checkpoint = run / "checkpoints" / "round-000001"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"rounds_done": 1, "step": 1}')
    for name, text in (checkpoint_files or {}).items():
        (checkpoint / name).write_text(text)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The inputs every case reads (never written by a case)."""
    import datasets

    i = tmp_path_factory.mktemp("inputs")
    (i / "afile").write_text("mine")
    (i / "broken.yaml").write_text("model:\n  backbone: [unclosed\n")
    (i / "list.yaml").write_text("- a\n- b\n")
    (i / "empty.txt").write_text("")
    (i / "object.json").write_text('{"a": 1}')
    (i / "dog.txt").write_text("a small red dog\n")
    (i / "emptydir").mkdir()
    (i / "garbage.bin").write_bytes(b"not a checkpoint at all")
    (i / "other-run").mkdir()
    (i / "other-run" / "metrics.jsonl").write_text('{"type": "round", "round": 0}\n')
    (i / "unfinished-run").mkdir()
    save_config(load_config("toy"), i / "unfinished-run" / "config.yaml")
    datasets.Dataset.from_dict({"caption": ["a", "b"]}).to_parquet(str(i / "captions.parquet"))
    _fake_run(i / "resumable", [])
    _fake_run(i / "two-process-run", ["train.num_processes=2"])
    _fake_run(i / "damaged-run", [], {"manifest.json": json.dumps({"trainable.safetensors": {"bytes": 3, "sha256": "0"}})})
    (i / "pretrained" / "pretrain-run" / "checkpoints" / "step-000002").mkdir(parents=True)
    (i / "pretrained" / "pretrain-run" / "checkpoints" / "step-000002" / "trainer_state.json").write_text("{}")
    (i / "out").mkdir()
    return i


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _assert_clear_error(code: object, err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert code == 2, err
    assert lines and lines[-1].startswith("error:") and needle in lines[-1], err
    assert len(errors) == 1, err
    assert "Traceback" not in err and "weights_only=False" not in err, err


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[object, str]:
    try:
        code: object = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    return code, capsys.readouterr().err


def test_there_are_at_least_25_cases() -> None:
    assert len(CASES) >= 25


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name: str, inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str]) -> None:
    case = CASES[name]
    monkeypatch.chdir(tmp_path)  # anything written to the working directory would show here
    before = _tree(inputs)
    code, err = _run(case.argv(inputs), capsys)
    _assert_clear_error(code, err, case.needle(inputs))
    assert _tree(inputs) == before, name
    assert list(tmp_path.iterdir()) == [], name


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere: the permission cannot be refused")
def test_an_unwritable_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, err = _run(["train", "--output", str(locked / "run"), "train.rounds=1"], capsys)
    finally:
        locked.chmod(0o700)
    _assert_clear_error(code, err, str(locked))


def test_a_failed_start_keeps_an_existing_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep me")  # a user's file is not another run
    garbage = tmp_path / "spm.bin"
    garbage.write_bytes(b"\x00\x01")
    code, err = _run(["train", "--output", str(tmp_path / "run"), "train.rounds=1",
                      f"preference.checkpoint={garbage}", "logging.tensorboard=false"], capsys)
    _assert_clear_error(code, err, str(garbage))
    assert "never pickled code" in err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["notes.txt"]
    assert (tmp_path / "run" / "notes.txt").read_text() == "keep me"
