"""The toy world's pixel-space text-to-image model behind the backbone interface."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from spo.backbones import load_backbone
from spo.config import LoRAConfig
from spo.config import load_config
from spo.objectives import SPOObjective
from spo.sampling import PoolSampler, ddim_sample
from spo.toy import training_prompts
from spo.toy.model import ToyBackbone, build_toy_pipeline, build_toy_tokenizer


@pytest.fixture(scope="module")
def toy_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_toy_pipeline(seed=0).save_pretrained(tmp_path_factory.mktemp("toy"))


def test_tokenizer_has_one_token_per_toy_word() -> None:
    tokenizer = build_toy_tokenizer()
    prompt = "two large purple triangles on a white background"
    assert tokenizer.tokenize(prompt) == [w + "</w>" for w in prompt.split()]
    assert len(tokenizer("a zebra")["input_ids"]) > 3  # unknown words fall back to bytes


def test_toy_backbone_loads_samples_and_trains(toy_path: Path) -> None:
    config = load_config("sd15", ["model.backbone=toy", f"model.pretrained={toy_path}", "model.resolution=32",
                                  "model.device=cpu", "model.dtype=float32", "train.mixed_precision=no"])
    backbone = load_backbone(config.model)
    assert isinstance(backbone, ToyBackbone) and backbone.vae is None and backbone.latent_shape == (3, 32, 32)
    prompts = training_prompts()[:2]
    x = ddim_sample(backbone, prompts, num_inference_steps=5, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 32, 32)
    torch.testing.assert_close(backbone.decode(x), x.clamp(-1, 1))  # pixel space: decode = identity
    backbone.attach_lora(LoRAConfig(rank=4))
    sampler = PoolSampler(backbone, lambda im, p, t: im.mean(dim=(1, 2, 3)) * 100, num_inference_steps=6,
                          k=3, threshold=0.0, divert_start_step=2)
    records = sampler.rollout(prompts, torch.Generator().manual_seed(1)).records
    assert len(records) == 4 * 2
    out = SPOObjective(guidance_scale=3.0)(backbone, sampler.schedule(), records)
    assert float(out.loss.detach()) == pytest.approx(math.log(2), abs=1e-6)


def test_missing_toy_model_is_a_clear_error(tmp_path: Path) -> None:
    from spo.backbones import BackboneLoadError

    with pytest.raises(BackboneLoadError, match="no such directory"):
        ToyBackbone.from_pretrained(str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneLoadError, match="not a toy model"):
        ToyBackbone.from_pretrained(str(tmp_path / "empty"))


def test_pretraining_in_miniature(tmp_path: Path) -> None:
    """`spo toy pretrain` with a tiny budget: runs, lowers the loss, writes base + snapshots,
    and the same seed gives the same weights."""
    from safetensors.torch import load_file

    from spo.toy.pretrain import PretrainSettings, pretrain

    settings = PretrainSettings(steps=12, batch_size=8, snapshots=[0.5])
    summary = pretrain(tmp_path / "a", settings, progress=False)
    assert (tmp_path / "a" / "base" / "toy_model.json").exists()
    assert (tmp_path / "a" / "snapshot-00006" / "unet").is_dir()
    assert summary["loss_last_100"] <= summary["loss_first_100"] * 1.05
    pretrain(tmp_path / "b", settings, progress=False)
    a = load_file(str(tmp_path / "a" / "base" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "base" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    backbone = ToyBackbone.from_pretrained(str(tmp_path / "a" / "base"), device="cpu")
    assert backbone.unet.conv_in.weight.shape[1] == 3


def test_toy_score_cli(toy_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from spo.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a small red circle on a black background\n")
    assert main(["toy", "score", str(toy_path), "--prompts", str(prompts), "--seeds", "2",
                 "--grid", str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out
    assert "alignment" in out and "aesthetic" in out and (tmp_path / "g.png").exists()
    prompts.write_text("a small red dog\n")
    assert main(["toy", "score", str(toy_path), "--prompts", str(prompts)]) == 2
    assert "a small red dog" in capsys.readouterr().err


def test_shipped_base_model_loads_and_draws_the_layout() -> None:
    """The shipped weights load through the backbone interface and sample recognisable layouts
    (the oracle reads most attributes back; measured 0.65 over 72 samples, see docs/toy-world.md)."""
    from spo.toy.evaluate import sample_and_score
    from spo.toy.grammar import validation_prompts
    from spo.toy.model import BASE_MODEL

    backbone = ToyBackbone.from_pretrained(str(BASE_MODEL), device="cpu")
    images, scores, _ = sample_and_score(backbone, validation_prompts()[:8], seeds=1, num_inference_steps=10)
    assert images.shape == (8, 3, 32, 32) and images.abs().max() <= 1
    assert scores["alignment"].mean > 0.4  # an untrained model scores about 0.2 (background by chance)


def test_spo_on_the_toy_model_then_spo_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """SPO trains on the shipped toy base model (with a fixed brightness scorer, so that a few
    rounds at a high learning rate surely move the LoRA) and `spo eval` compares base and
    fine-tuned with the same seeds."""
    import json

    from spo.cli import main
    from spo.toy.model import BASE_MODEL
    from spo.training import SPOTrainer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(training_prompts()[:6]) + "\n")
    config = load_config("sd15", [
        "model.backbone=toy", f"model.pretrained={BASE_MODEL}", "model.resolution=32", "model.device=cpu",
        "model.dtype=float32", "train.mixed_precision=no", f"data.prompts={prompts}", "train.rounds=2", "train.prompts_per_round=2", "train.batch_size=8",
        "sampling.num_inference_steps=8", "sampling.guidance_scale=3.0", "pools.threshold=0.0",
        "optimizer.lr=1e-2", "objective.eps=null", "logging.tensorboard=false",
        # the toy preset's choices: conv adapters, a channels-last UNet (strided conv weights must still save)
        "lora.target_modules=[to_q, to_k, to_v, to_out.0, conv1, conv2]", "model.channels_last=true",
    ])
    SPOTrainer(config, tmp_path / "run", scorer=lambda im, p, t: im.mean(dim=(1, 2, 3)) * 100, progress=False).train()
    eval_prompts = tmp_path / "eval.txt"
    eval_prompts.write_text("a small red circle on a black background\ntwo large blue squares on a white background\n")
    assert main(["eval", str(tmp_path / "run"), "--prompts", str(eval_prompts), "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    assert "run - base (paired)" in out and "alignment" in out and "aesthetic" in out and "toy PickScore" in out
    result = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert result["results"]["base"]["alignment"]["n"] == result["results"]["run"]["alignment"]["n"] == 4
    assert result["protocol"]["guidance_scale"] == 3.0 and result["protocol"]["noise"] == "per_seed"
    from PIL import Image

    grid = Image.open(tmp_path / "run" / "eval" / result["grids"]["run"][0])
    assert grid.width > 4 * 64 and grid.height > 2 * 64  # 2 prompts x (base, tuned) x 2 seeds, captioned
    # the fine-tuned model really is the base plus the run's LoRA
    base = ToyBackbone.from_pretrained(str(BASE_MODEL), device="cpu")
    tuned = ToyBackbone.from_pretrained(str(BASE_MODEL), device="cpu")
    tuned.unet.load_lora_adapter(str(tmp_path / "run" / "lora"), prefix="unet", weight_name="pytorch_lora_weights.safetensors")
    cond = base.encode_prompts(["a small red circle on a black background"])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert float((tuned.predict(x, 501, cond, 3.0) - base.predict(x, 501, cond, 3.0)).abs().max()) > 1e-3
    # a kept copy of the LoRA evaluates the same; the base model's samples come from the cache the second time
    import shutil

    from spo.backbones import BackboneLoadError
    from spo.toy import eval_run

    shutil.copytree(tmp_path / "run" / "lora", tmp_path / "kept")
    prompts_list = eval_prompts.read_text().splitlines()
    import spo.evaluation.evaluate as evaluate_module

    made: list[int] = []
    real = evaluate_module.generate_images
    monkeypatch.setattr(evaluate_module, "generate_images", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    first = eval_run.evaluate_run(tmp_path / "run", prompts_list, tmp_path / "e1", seeds=2, lora=tmp_path / "kept", num_inference_steps=8,
                                  base_cache=tmp_path / "base")
    second = eval_run.evaluate_run(tmp_path / "run", prompts_list, tmp_path / "e2", seeds=2, base_cache=tmp_path / "base",
                                   num_inference_steps=8)
    assert made == [4, 4, 4]  # base once, fine-tuned twice
    assert first["difference"] == second["difference"] == result["differences"]["run"]
    with pytest.raises(BackboneLoadError, match="no pytorch_lora_weights"):
        eval_run.evaluate_run(tmp_path / "run", prompts_list, tmp_path / "e3", lora=tmp_path)
    eval_prompts.write_text("a small red dog\n")
    assert main(["eval", str(BASE_MODEL), "--prompts", str(eval_prompts), "--output", str(tmp_path / "e")]) == 2
    assert "a small red dog" in capsys.readouterr().err
