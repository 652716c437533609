"""`spo eval` on the tiny SD-1.5 pipeline: fixed noise per image, same noise for base and
fine-tuned, resume after a kill, paired statistics, CSVs, grids, prompt sets, GenEval layout."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spo.backbones import load_backbone
from spo.config import LoRAConfig
from spo.config import load_config, save_config
from spo.evaluation.evaluate import BASE, EvalModel, EvaluationError, Protocol, evaluate, format_table
from spo.evaluation.generate import ImageJob, image_seed, load_png
from spo.evaluation.scorers.base import Scorer
from spo.evaluation.stats import Estimate
from spo.evaluation.targets import eval_models, model_loader, resolve_target

PROMPTS = ["a red cube", "a blue ball on grass", "two green trees", "a yellow car"]


class MeanPixel(Scorer):
    """A fixed scorer: the mean pixel value of a channel (counted calls and images)."""

    name = "mean_red"
    label = "mean red"
    channel = 0

    def __init__(self) -> None:
        self.images = 0

    @classmethod
    def load(cls, weights: str = "", **_: object) -> "MeanPixel":
        return cls()

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self.images += images.shape[0]
        return images[:, self.channel].mean(dim=(1, 2))


class MeanBlue(MeanPixel):
    name = "mean_blue"
    label = "mean blue"
    channel = 2


def _config(tiny_sd15_path: Path, *extra: str):  # noqa: ANN202
    return load_config("sd15", [f"model.pretrained={tiny_sd15_path}", "model.resolution=32", "model.device=cpu",
                                "model.dtype=float32", "model.vae=null", "sampling.num_inference_steps=4",
                                "pools.divert_start_step=0", *extra])


@pytest.fixture(scope="module")
def tiny_run(tiny_sd15_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory as `spo train` leaves it: config.yaml and lora/ (a LoRA with random B,
    so the fine-tuned model differs from the base)."""
    run = tmp_path_factory.mktemp("run") / "spo-run"
    config = _config(tiny_sd15_path)
    save_config(config, run / "config.yaml")
    backbone = load_backbone(config.model)
    params = backbone.attach_lora(LoRAConfig(rank=2))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.3)
    backbone.save_lora(run / "lora")
    return run


def _evaluate(run: Path, out: Path, scorers: Sequence[Scorer], *, batch_size: int = 8, seeds: int = 2,
              prompts: Sequence[str] = PROMPTS, **kwargs: object) -> dict:
    target = resolve_target(str(run))
    models = eval_models([target])
    protocol = Protocol(list(prompts), "test", seeds=seeds, num_inference_steps=4, guidance_scale=5.0)
    return evaluate(models, protocol, list(scorers), out, load_model=model_loader(target.config),
                    batch_size=batch_size, progress=False, **kwargs)


def test_each_image_has_its_own_noise_whatever_the_batch(tiny_run: Path, tmp_path: Path) -> None:
    _evaluate(tiny_run, tmp_path / "b1", [MeanPixel()], batch_size=1, seeds=1)
    _evaluate(tiny_run, tmp_path / "b3", [MeanPixel()], batch_size=3, seeds=1)
    for model in ("base", "spo-run"):
        for i in range(len(PROMPTS)):
            name = ImageJob(i, 0, PROMPTS[i]).name
            a = np.asarray(Image.open(tmp_path / "b1" / "images" / model / name), dtype=int)
            b = np.asarray(Image.open(tmp_path / "b3" / "images" / model / name), dtype=int)
            assert np.abs(a - b).max() <= 1  # float noise of a batched GEMM at most flips a rounding
    assert len({image_seed(0, s, i) for s in range(3) for i in range(100)}) == 300


def test_base_and_fine_tuned_share_the_noise(tiny_any_path: tuple[str, Path], tmp_path: Path) -> None:
    """A LoRA that changes nothing (B = 0 at init) gives the base's images exactly: the same noise
    per (prompt, seed), so paired differences are exactly zero (SD-1.5 and SDXL)."""
    kind, path = tiny_any_path
    run = tmp_path / "zero-run"
    config = load_config(kind, [f"model.pretrained={path}", "model.resolution=32", "model.device=cpu",
                                "model.dtype=float32", "model.vae=null", "sampling.num_inference_steps=4",
                                "pools.divert_start_step=0"])
    save_config(config, run / "config.yaml")
    backbone = load_backbone(config.model)
    backbone.attach_lora(LoRAConfig(rank=2))
    backbone.save_lora(run / "lora")
    result = _evaluate(run, tmp_path / "out", [MeanPixel()], seeds=2)
    assert result["differences"]["zero-run"]["mean_red"]["mean"] == 0.0
    for i in range(len(PROMPTS)):
        for s in range(2):
            name = ImageJob(i, s, PROMPTS[i]).name
            assert (Image.open(tmp_path / "out" / "images" / "base" / name).tobytes()
                    == Image.open(tmp_path / "out" / "images" / "zero-run" / name).tobytes())
    # and different seeds do give different images
    a, b = (load_png(tmp_path / "out" / "images" / "base" / ImageJob(0, s, "").name) for s in (0, 1))
    assert (a - b).abs().max() > 0.05


def test_statistics_csvs_grids_and_table(tiny_run: Path, tmp_path: Path) -> None:
    result = _evaluate(tiny_run, tmp_path / "out", [MeanPixel(), MeanBlue()], seeds=2)
    out = tmp_path / "out"
    saved = json.loads((out / "eval.json").read_text())
    assert saved["format"] == "spo-eval/1" and saved["protocol"]["num_prompts"] == 4 and saved["protocol"]["seeds"] == 2
    assert list(saved["models"]) == ["base", "spo-run"] and saved["models"]["spo-run"]["method"] == "spo"
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 2 * 4 * 2
    value = {(r["model"], int(r["prompt_index"]), int(r["seed_index"])): float(r["mean_red"]) for r in rows}
    # the scores are the scorer's values on the images made (the in-memory float images: PNG within 1/255)
    for (model, i, s), v in list(value.items())[:3]:
        png = load_png(out / "images" / model / ImageJob(i, s, "").name)
        assert abs(float(png[0].mean()) - v) < 1.5 / 127.5
    diffs = [value[("spo-run", i, s)] - value[("base", i, s)] for s in range(2) for i in range(4)]
    d = saved["differences"]["spo-run"]["mean_red"]
    sd = float(np.std(diffs, ddof=1))
    assert d["n"] == 8 and math.isclose(d["mean"], sum(diffs) / 8, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(d["high"] - d["mean"], 1.96 * sd / math.sqrt(8), rel_tol=1e-9)
    base = [value[("base", i, s)] for s in range(2) for i in range(4)]
    assert math.isclose(saved["results"]["base"]["mean_red"]["mean"], float(np.mean(base)), rel_tol=1e-9)
    per_prompt = list(csv.DictReader(open(out / "per_prompt.csv")))
    assert [r["prompt"] for r in per_prompt] == PROMPTS
    assert math.isclose(float(per_prompt[1]["difference:spo-run:mean_red"]),
                        (diffs[1] + diffs[5]) / 2, rel_tol=1e-5, abs_tol=1e-6)
    grid = Image.open(out / saved["grids"]["spo-run"][0])
    assert grid.width >= 4 * 64 and grid.height > 4 * 64  # base | fine-tuned for 2 seeds, 4 captioned rows
    table = format_table(result)
    assert "mean red" in table and "spo-run - base (paired)" in table and Estimate(**d).signed() in table


def test_an_interrupted_evaluation_resumes_without_redoing_images(tiny_run: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = _evaluate(tiny_run, tmp_path / "fresh", [MeanPixel()], batch_size=2)

    class Killed(RuntimeError):
        pass

    class Dies(MeanPixel):
        calls = 0

        def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
            Dies.calls += 1
            if Dies.calls == 3:  # the third batch of the base model: two batches are on disk
                raise Killed
            return super().score(images, prompts)

    with pytest.raises(Killed):
        _evaluate(tiny_run, tmp_path / "out", [Dies()], batch_size=2)
    assert len(list((tmp_path / "out" / "images" / "base").glob("*.png"))) == 4
    import spo.evaluation.evaluate as ev

    made: list[int] = []
    real = ev.generate_images
    monkeypatch.setattr(ev, "generate_images", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    resumed = _evaluate(tiny_run, tmp_path / "out", [MeanPixel()], batch_size=2)
    assert made == [4, 8]  # the base's 4 missing images, then all of the fine-tuned model's
    assert resumed["results"] == fresh["results"] and resumed["differences"] == fresh["differences"]
    # a finished evaluation rerun makes nothing and scores nothing
    made.clear()
    counter = MeanPixel()
    again = _evaluate(tiny_run, tmp_path / "out", [counter], batch_size=2)
    assert made == [] and counter.images == 0 and again["results"] == fresh["results"]


def test_a_scorer_added_later_scores_the_saved_images(tiny_run: Path, tmp_path: Path) -> None:
    _evaluate(tiny_run, tmp_path / "out", [MeanPixel()], seeds=1)
    red, blue = MeanPixel(), MeanBlue()
    result = _evaluate(tiny_run, tmp_path / "out", [red, blue], seeds=1)
    assert red.images == 0 and blue.images == 2 * 4  # only the new metric, from the PNGs
    assert set(result["results"]["base"]) == {"mean_red", "mean_blue"}


def test_an_output_holding_another_evaluation_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    _evaluate(tiny_run, tmp_path / "out", [MeanPixel()], seeds=1)
    with pytest.raises(EvaluationError, match="another evaluation .*differs in: protocol"):
        _evaluate(tiny_run, tmp_path / "out", [MeanPixel()], seeds=2)
    with pytest.raises(EvaluationError, match="another evaluation"):
        _evaluate(tiny_run, tmp_path / "out", [MeanPixel()], seeds=1, prompts=PROMPTS[::-1])


def test_runs_of_different_base_models_are_not_compared(tiny_run: Path, tiny_sdxl_path: Path, tmp_path: Path) -> None:
    from spo.errors import ModelLoadError

    other = tmp_path / "other"
    save_config(load_config("sdxl", [f"model.pretrained={tiny_sdxl_path}"]), other / "config.yaml")
    (other / "lora").mkdir()
    (other / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="one base model"):
        eval_models([resolve_target(str(tiny_run)), resolve_target(str(other))])
    models = eval_models([resolve_target(str(tiny_run)), resolve_target(str(tiny_run))])
    assert [m.key for m in models][:2] == [BASE, "spo-run"] and len({m.key for m in models}) == 3


def test_cli_eval_with_a_scorer_and_skipped_metrics(tiny_run: Path, tiny_clip_path: Path, prompts_file: Path,
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from spo.cli import main

    out = tmp_path / "eval"
    argv = ["eval", str(tiny_run), "--prompts", str(prompts_file), "--seeds", "1", "--output", str(out),
            "--scorer", f"pickscore={tiny_clip_path}", "--steps", "3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for label in ("HPSv2", "HPSv2.1", "ImageReward", "LAION aesthetic"):
        assert any(line.startswith(f"skipped {label}") for line in printed.splitlines()), label
    saved = json.loads((out / "eval.json").read_text())
    assert list(saved["metrics"]) == ["pickscore"] and saved["protocol"]["num_inference_steps"] == 3
    assert len(saved["skipped"]) == 4 and "PickScore" in printed
    # bad input: exit 2, one error line, nothing written
    for bad, needle in [(["--scorer", "nosuch=x"], "nosuch"), (["--scorer", "pickscore"], "pickscore"),
                        (["--scorer", f"pickscore={tmp_path / 'missing'}"], "missing"),
                        (["--prompts", str(tmp_path / "none.txt")], "none.txt")]:
        target = tmp_path / "bad"
        code = main(["eval", str(tiny_run), "--output", str(target), "--prompts", str(prompts_file), *bad])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error:") and needle in err and "Traceback" not in err, (bad, err)
    code = main(["eval", str(tiny_run), "--output", str(out), "--prompts", str(prompts_file), "--seeds", "2",
                 "--steps", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "another evaluation" in err


def test_cli_eval_scorer_dtype(tiny_run: Path, tiny_clip_path: Path, prompts_file: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """``--scorer-dtype bfloat16`` scores the same images under the metric ``pickscore@bfloat16``,
    kept apart from the float32 scores stored beside it, within the tiny models' tolerance
    (tests/test_scorer_dtype.py); the toy world refuses it before anything is written."""
    from spo.cli import main

    out = tmp_path / "eval"
    common = ["eval", str(tiny_run), "--prompts", str(prompts_file), "--seeds", "1", "--output", str(out),
              "--scorer", f"pickscore={tiny_clip_path}", "--steps", "3"]
    assert main(common) == 0
    exact = json.loads((out / "eval.json").read_text())
    exact_rows = (out / "scores.csv").read_text().splitlines()
    assert main([*common, "--scorer-dtype", "bfloat16"]) == 0  # the images are reused, the scores are new
    low = json.loads((out / "eval.json").read_text())
    low_rows = (out / "scores.csv").read_text().splitlines()
    assert list(exact["metrics"]) == ["pickscore"] and list(low["metrics"]) == ["pickscore@bfloat16"]
    assert "bfloat16" in low["metrics"]["pickscore@bfloat16"]["label"]
    assert exact_rows[0].endswith(",pickscore") and low_rows[0].endswith(",pickscore@bfloat16")
    assert len(exact_rows) == len(low_rows) > 1
    for a, b in zip(exact_rows[1:], low_rows[1:]):  # the same images, row by row
        assert a.rsplit(",", 1)[0] == b.rsplit(",", 1)[0]
        assert abs(float(a.rsplit(",", 1)[1]) - float(b.rsplit(",", 1)[1])) <= 0.25, (a, b)
    capsys.readouterr()
    toy_out = tmp_path / "toy"
    assert main(["eval", "toy", "--scorer-dtype", "float16", "--output", str(toy_out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --scorer-dtype float16") and not toy_out.exists()


def test_prompt_sets_from_pickapic_data(pickapic_path: Path, tmp_path: Path) -> None:
    import datasets

    from spo.data import PromptsError, load_prompt_set

    captions = datasets.load_from_disk(str(pickapic_path))["validation_unique"]["caption"]
    expected = list(dict.fromkeys(c.strip() for c in captions))
    assert load_prompt_set(str(pickapic_path)) == expected and len(expected) < len(captions)  # deduplicated
    assert load_prompt_set(str(pickapic_path), limit=3) == expected[:3]
    with pytest.raises(PromptsError, match="no split 'nosuch'"):
        load_prompt_set(str(pickapic_path), split="nosuch")
    # the same from parquet files named by split
    parquet = tmp_path / "pq"
    parquet.mkdir()
    datasets.load_from_disk(str(pickapic_path))["validation_unique"].to_parquet(str(parquet / "validation_unique-0.parquet"))
    datasets.load_from_disk(str(pickapic_path))["train"].to_parquet(str(parquet / "train-0.parquet"))
    assert load_prompt_set(str(parquet)) == expected


def test_geneval_layout(tiny_run: Path, tmp_path: Path) -> None:
    from spo.cli import main

    metadata = tmp_path / "evaluation_metadata.jsonl"
    rows = [{"tag": "single_object", "include": [{"class": "car", "count": 1}], "prompt": "a photo of a car"},
            {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}], "prompt": "a photo of a red cat"}]
    metadata.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "geneval"
    assert main(["eval", str(tiny_run), "--geneval", str(metadata), "--images-per-prompt", "2", "--output", str(out),
                 "--steps", "2"]) == 0
    for model in ("base", "spo-run"):
        folder = out / model
        assert sorted(p.name for p in folder.iterdir()) == ["00000", "00001"]
        for i, row in enumerate(rows):
            assert json.loads((folder / f"{i:05d}" / "metadata.jsonl").read_text()) == row
            assert sorted(p.name for p in (folder / f"{i:05d}" / "samples").iterdir()) == ["0000.png", "0001.png"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tag": "x"}\n')
    assert main(["eval", str(tiny_run), "--geneval", str(bad), "--output", str(tmp_path / "g2")]) == 2
    assert not (tmp_path / "g2").exists()


def test_a_lora_saved_again_with_other_metadata_order_is_the_same_model(tiny_run: Path, tmp_path: Path) -> None:
    """A finished run re-saves its LoRA on resume; safetensors may order the header differently,
    so the identity is the tensors, not the file's bytes."""
    import json as _json

    from safetensors.torch import load_file, save_file

    from spo.evaluation.evaluate import EvalModel

    lora = tiny_run / "lora" / "pytorch_lora_weights.safetensors"
    tensors = load_file(str(lora))
    copy = tmp_path / "lora"
    copy.mkdir()
    save_file(dict(reversed(list(tensors.items()))), str(copy / "pytorch_lora_weights.safetensors"),
              metadata={"b": "2", "a": "1"})
    assert (copy / "pytorch_lora_weights.safetensors").read_bytes() != lora.read_bytes()
    same = EvalModel("m", "x", lora=str(copy)).identity()
    assert same == EvalModel("m", "x", lora=str(tiny_run / "lora")).identity()
    changed = dict(tensors)
    name = sorted(changed)[0]
    changed[name] = changed[name] + 1e-3
    save_file(changed, str(copy / "pytorch_lora_weights.safetensors"))
    assert EvalModel("m", "x", lora=str(copy)).identity() != same
    assert _json.dumps(same)  # serialisable into model.json
