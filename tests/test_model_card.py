"""The model card (README.md) beside a run's final weights: built from small fake run directories
(metadata, recipe, evaluation table, previews, load snippet for a LoRA, a full fine-tune, an SPM
and a reward model), and written by the trainers and by `spo eval` on tiny real runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from spo.config import load_config, save_config
from spo.training.model_card import CARD, build_model_card, update_model_cards, write_model_card

huggingface_hub = pytest.importorskip("huggingface_hub")


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    head, _, _ = text[4:].partition("\n---\n")
    data = yaml.safe_load(head)
    assert isinstance(data, dict)
    return data


def _estimate(mean: float) -> dict:
    return {"mean": mean, "low": mean - 0.1, "high": mean + 0.1, "n": 8}


def _fake_run(run: Path, *overrides: str, weights: str = "lora", rounds: int = 3) -> Path:
    """A run directory as `spo train` leaves it, without training: config.yaml, metrics.jsonl and
    the final weights' folder (its files empty)."""
    config = load_config("sd15", ["data.prompts=prompts.txt", f"train.rounds={rounds}", *overrides])
    save_config(config, run / "config.yaml")
    lines = []
    for r in range(rounds):
        lines.append({"type": "step", "step": r, "round": r, "loss": 0.69, "lr": 6e-5})
        lines.append({"type": "round", "round": r, "num_processes": 1, "optimizer_steps": 1,
                      "sampling_seconds": 10.0, "training_seconds": 2.5, "skipped": r == 0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"type": "ro')
    (run / weights).mkdir()
    return run


def _fake_eval(folder: Path, run: Path, key: str = "spo-run") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    result = {
        "format": "spo-eval/1",
        "protocol": {"prompts": "prompts.txt", "num_prompts": 4, "seeds": 2, "num_inference_steps": 20, "eta": 1.0,
                     "guidance_scale": 5.0},
        "models": {"base": {"pretrained": "x", "lora": None, "run": None, "method": None},
                   key: {"pretrained": "x", "lora": str(run / "lora"), "run": str(run), "method": "spo"},
                   "other": {"pretrained": "x", "lora": "elsewhere/lora", "run": "elsewhere", "method": "d3po"}},
        "metrics": {"pickscore": {"label": "PickScore", "expected_range": [0, 30], "higher_is_better": True}},
        "results": {"base": {"pickscore": _estimate(21.0)}, key: {"pickscore": _estimate(21.75)},
                    "other": {"pickscore": _estimate(19.0)}},
        "differences": {key: {"pickscore": _estimate(0.75)}, "other": {"pickscore": _estimate(-2.0)}},
    }
    (folder / "eval.json").write_text(json.dumps(result))
    return folder


def test_lora_card_metadata_recipe_previews_and_evaluation(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "spo-run", "lora.rank=8", "pools.k=3", "objective.beta=7.5")
    samples = run / "samples"
    samples.mkdir()
    for name in ("reference.png", "round-000002.png", "round-000004.png", "round-000006.png", "round-000008.png"):
        (samples / name).write_bytes(b"")
    _fake_eval(run / "eval", run)
    path = write_model_card(run)  # the run's one weights folder: lora/
    assert path == run / "lora" / CARD
    text = path.read_text()

    meta = _front_matter(text)
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert meta["library_name"] == "diffusers"
    assert meta["tags"][:4] == ["text-to-image", "diffusers", "lora", "spo"] and "stable-diffusion" in meta["tags"]
    assert "license" not in meta and "License: not set" in text
    card = huggingface_hub.ModelCard.load(path)
    assert card.data.base_model == meta["base_model"] and card.data.library_name == "diffusers"
    assert "spo" in card.data.tags and card.data.license is None

    # how to load it: two lines of diffusers naming the base and this folder
    assert 'DiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")' in text
    assert f"pipe.load_lora_weights({json.dumps(str(run / 'lora'))})" in text
    # the recipe: the method's own settings, SPO's pools, optimiser, LoRA; the counts of metrics.jsonl
    for row in ("| `objective.beta` | 7.5 |", "| `objective.eps` | 0.1 |", "| `pools.k` | 3 |", "| `lora.rank` | 8 |",
                "| `optimizer.lr` | 6e-05 |", "| `train.rounds` | 3 |", "| rounds | 3 |", "| optimiser steps | 3 |",
                "| rounds skipped (too few valid records) | 1 |", "| seconds sampling / training | 30 / 8 (0.01 h) |"):
        assert row in text, row
    # the evaluation: base, this run and the paired difference; not the other run of the same evaluation
    assert "| metric | base | spo-run | spo-run - base (paired) |" in text
    assert "| PickScore | 21.000 [20.900, 21.100] | 21.750 [21.650, 21.850] | +0.750 [+0.650, +0.850] |" in text
    assert "19.000" not in text and "](../eval/eval.json)" in text
    # previews: the reference and the latest three rounds, linked relative to the card
    links = [line[line.index("](") + 2 : -1] for line in text.splitlines() if line.startswith("![")]
    assert links == ["../samples/reference.png", "../samples/round-000004.png", "../samples/round-000006.png",
                     "../samples/round-000008.png"]
    assert all((path.parent / link).resolve().is_file() for link in links)


def test_a_bare_run_and_another_method(tmp_path: Path) -> None:
    """No samples, no evaluation, no metrics: those sections are left out; a method's own section
    is dumped whatever its fields; a base model that is no hub id is pointed out."""
    run = tmp_path / "ddpo-run"
    config = load_config("sd15-ddpo", [f"model.pretrained={tmp_path / 'my-sd15'}"])
    save_config(config, run / "config.yaml")
    (run / "lora").mkdir()
    text = write_model_card(run, run / "lora", config).read_text()
    meta = _front_matter(text)
    assert meta["tags"][:4] == ["text-to-image", "diffusers", "lora", "ddpo"]
    assert meta["base_model"] == str(tmp_path / "my-sd15")
    assert "not a hub id" in text
    assert "## Previews" not in text and "## Evaluation" not in text and "metrics.jsonl" not in text
    assert "| `objective.clip_range` | 0.0001 |" in text and "| `objective.per_prompt_stat_tracking` | true |" in text
    assert "`pools." not in text  # SPO's pools only for SPO
    assert build_model_card(run, run / "lora") == text  # from config.yaml, the same card


def test_full_fine_tune_card(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "full-run", "model.finetune=full", weights="unet")
    (run / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    text = write_model_card(run).read_text()
    meta = _front_matter(text)
    assert "full-fine-tune" in meta["tags"] and "lora" not in meta["tags"] and meta["library_name"] == "diffusers"
    assert f"unet = UNet2DConditionModel.from_pretrained({json.dumps(str(run / 'unet'))})" in text
    assert 'DiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", unet=unet)' in text
    assert "`lora.rank`" not in text
    # an SD3 run's denoiser is a transformer
    (run / "unet" / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    text = build_model_card(run)
    assert "transformer = SD3Transformer2DModel.from_pretrained(" in text and "transformer=transformer)" in text


def test_spm_and_reward_model_cards(tmp_path: Path) -> None:
    run = tmp_path / "spm-run"
    config = load_config("sd15", ["preference.pretrained=yuvalkirstain/PickScore_v1", "spm.data=pickapic",
                                  "spm.steps=2"])
    save_config(config, run / "config.yaml")
    lines = [{"type": "validation", "step": 0, "pairs": 10, "accuracy_t0": 0.5, "accuracy_t501": 0.4},
             {"type": "step", "step": 1, "loss": 0.7, "pairs": 16, "skipped_rows": 0, "lr": 1e-3},
             {"type": "step", "step": 2, "loss": 0.6, "pairs": 16, "skipped_rows": 1, "lr": 1e-3},
             {"type": "validation", "step": 2, "pairs": 10, "accuracy_t0": 0.8, "accuracy_t501": 0.6}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run / "spm").mkdir()
    path = write_model_card(run)
    text = path.read_text()
    card = huggingface_hub.ModelCard.load(path)
    assert card.data.base_model == "yuvalkirstain/PickScore_v1" and card.data.library_name == "transformers"
    assert "step-aware-preference-model" in card.data.tags and card.data.license is None
    assert f"StepAwarePreferenceModel.from_pretrained({json.dumps(str(run / 'spm'))})" in text
    assert "| 0 | 0.500 | 0.800 |" in text and "| 501 | 0.400 | 0.600 |" in text
    assert "| `spm.steps` | 2 |" in text and "| pairs trained on | 32 |" in text and "| bad rows skipped | 1 |" in text
    # the clean-image reward model (`preference.variant=clean`): a CLIPModel folder
    (run / "spm").rename(run / "reward")
    text = write_model_card(run).read_text()
    meta = _front_matter(text)
    assert meta["library_name"] == "transformers" and "step-aware-preference-model" not in meta["tags"]
    assert f"CLIPModel.from_pretrained({json.dumps(str(run / 'reward'))})" in text


def _tiny_config(model: Path, prompts: Path):  # noqa: ANN202
    return load_config("sd15", [
        f"model.pretrained={model}", "model.resolution=32", "model.device=cpu", "model.dtype=float32",
        "train.mixed_precision=no", f"data.prompts={prompts}", "train.rounds=1", "train.prompts_per_round=2",
        "train.batch_size=8", "sampling.num_inference_steps=4", "pools.divert_start_step=0", "pools.threshold=0.0",
        "logging.tensorboard=false", "logging.sample_every=0"])


def test_trainer_writes_the_card_and_spo_eval_adds_the_table(tiny_sd15_path: Path, tiny_clip_path: Path,
                                                             prompts_file: Path, tmp_path: Path) -> None:
    from fixed_scorers import brightness

    from spo.cli import main
    from spo.training import SPOTrainer

    run = tmp_path / "run"
    SPOTrainer(_tiny_config(tiny_sd15_path, prompts_file), run, scorer=brightness, progress=False).train()
    card = run / "lora" / CARD
    meta = _front_matter(card.read_text())
    assert meta["base_model"] == str(tiny_sd15_path) and "spo" in meta["tags"]
    assert "| rounds | 1 |" in card.read_text() and "## Evaluation" not in card.read_text()

    # `spo eval` writes the card again with its table, here from an evaluation outside the run directory
    out = tmp_path / "elsewhere"
    assert main(["eval", str(run), "--prompts", str(prompts_file), "--num-prompts", "2", "--seeds", "1",
                 "--steps", "2", "--scorer", f"pickscore={tiny_clip_path}", "--output", str(out)]) == 0
    saved = json.loads((out / "eval.json").read_text())
    text = card.read_text()
    assert "## Evaluation" in text and "| metric | base | run | run - base (paired) |" in text
    row = next(line for line in text.splitlines() if line.startswith("| PickScore |"))
    assert f"{saved['results']['run']['pickscore']['mean']:.3f}" in row
    assert huggingface_hub.ModelCard.load(card).data.base_model == str(tiny_sd15_path)
    assert update_model_cards(run) == [card] and "## Evaluation" not in card.read_text()  # none inside the run


def test_a_card_that_cannot_be_written_is_a_warning(tiny_sd15_path: Path, prompts_file: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from fixed_scorers import brightness

    from spo.training import SPOTrainer

    def fail(*args: object, **kwargs: object) -> Path:
        raise OSError("disk full")

    monkeypatch.setattr("spo.training.model_card.write_model_card", fail)
    trainer = SPOTrainer(_tiny_config(tiny_sd15_path, prompts_file), tmp_path / "run", scorer=brightness,
                         progress=False)
    with pytest.warns(UserWarning, match="are saved, but their model card is not.*disk full"):
        result = trainer.train()
    assert result.lora_path is not None and result.lora_path.is_file() and result.rounds == 1
    assert not (tmp_path / "run" / "lora" / CARD).exists()


def test_spm_trainer_writes_the_card(tiny_sd15_path: Path, tiny_clip_path: Path, pickapic_path: Path,
                                     tmp_path: Path) -> None:
    from spo.training import SPMTrainer

    config = load_config("sd15", [
        f"model.pretrained={tiny_sd15_path}", "model.resolution=32", "model.device=cpu", "model.dtype=float32",
        f"preference.pretrained={tiny_clip_path}", "preference.checkpoint=null", f"spm.data={pickapic_path}",
        "spm.steps=2", "spm.batch_size=4", "spm.validation_pairs=4", "spm.validation_timesteps=[0,501]",
        "spm.mixed_precision=no", "spm.lr_schedule=constant", "logging.tensorboard=false"])
    SPMTrainer(config, tmp_path / "run", progress=False).train()
    path = tmp_path / "run" / "spm" / CARD
    card = huggingface_hub.ModelCard.load(path)
    assert card.data.base_model == str(tiny_clip_path) and card.data.library_name == "transformers"
    assert "step-aware-preference-model" in card.data.tags
    text = path.read_text()
    assert "## Validation" in text and "| 501 |" in text and "| optimiser steps | 2 |" in text
