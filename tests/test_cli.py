"""The ``spo`` command line, run in-process through ``spo.cli.main``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from spo.cli import main
from spo.config import config_to_dict, load_config


def test_config_show_prints_the_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "sdxl", "pools.k=3", "seed=7"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    expected = config_to_dict(load_config("sdxl", ["pools.k=3", "seed=7"]))
    assert shown == expected
    assert shown["pools"]["k"] == 3 and shown["pools"]["threshold"] == 0.4


def test_config_presets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "presets"]) == 0
    lines = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    assert lines["sd15"] == "spo" and lines["sdxl"] == "spo" and lines["toy"] == "spo"
    for backbone in ("sd15", "sdxl", "toy"):
        assert lines[f"{backbone}-d3po"] == "d3po" and lines[f"{backbone}-ddpo"] == "ddpo"
        assert lines[f"{backbone}-diffusion-dpo"] == "diffusion_dpo"


def test_config_errors_exit_2_with_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "sd15", "pools.treshold=0.2"]) == 2
    err = capsys.readouterr().err
    assert "pools.treshold" in err and "pools.threshold" in err


def test_sample_missing_model_path_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-model"
    assert main(["sample", "sd15", f"model.pretrained={missing}", "model.dtype=float32", "--output",
                 str(tmp_path / "out")]) == 2
    assert str(missing) in capsys.readouterr().err


def test_sample_from_prompts_file(tiny_sd15_path: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["a red cat", "a blue dog", "a green bird"]))
    out = tmp_path / "out"
    args = ["sample", "sd15", f"model.pretrained={tiny_sd15_path}", "model.resolution=32", "model.dtype=float32",
            "sampling.num_inference_steps=5", "--prompts", str(prompts), "--seeds", "2", "--output", str(out)]
    assert main(args) == 0
    assert len(list((out / "images").glob("*.png"))) == 6
    assert Image.open(out / "grid.png").size == (3 * 32, 2 * 32)
    meta = json.loads((out / "generation.json").read_text())
    assert meta["prompts"] == ["a red cat", "a blue dog", "a green bird"] and meta["num_inference_steps"] == 5
    # fixed seeds: a second run gives the same pixels
    assert main([*args[:-1], str(tmp_path / "again")]) == 0
    assert (out / "images" / "image_0004.png").read_bytes() == (tmp_path / "again" / "images" / "image_0004.png").read_bytes()


def test_sample_with_no_preset_uses_the_toy_world(tmp_path: Path) -> None:
    assert main(["sample", "sampling.num_inference_steps=6", "--output", str(tmp_path / "out")]) == 0
    meta = json.loads((tmp_path / "out" / "generation.json").read_text())
    from spo.toy.grammar import validation_prompts

    assert meta["model"] == "toy:base" and meta["prompts"] == validation_prompts()  # eval.prompts of the preset
    assert Image.open(tmp_path / "out" / "grid.png").size == (24 * 32, 32)


def test_tiny_pipeline_command(tmp_path: Path) -> None:
    assert main(["tiny-pipeline", "sdxl", str(tmp_path / "xl")]) == 0
    index = json.loads((tmp_path / "xl" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
