"""A new method and a new backbone are one file each: this test module declares a throwaway method
(its settings, checks, loss and report curve) and a throwaway backbone, registers them, and
trains one round through ``spo train`` without any other file knowing them."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import Tensor

from spo.backbones import Backbone, Conditioning, SD15Backbone
from spo.backbones.tiny import build_tiny_sd15
from spo.cli import main
from spo.config import ObjectiveConfig, SPOConfig, load_config
from spo.diffusion import Schedule
from spo.objectives import Collected, Curve, LossOutput, Method
from spo.registry import BACKBONES, METHODS, RegistryError
from spo.sampling.records import Records


# ------------------------------------------------------------------------------ the throwaway method
@dataclass
class ThrowawayConfig(ObjectiveConfig):
    """``objective.name: throwaway``: fit the policy's prediction on random latents to zero."""

    name: str = "throwaway"
    scale: float = 1.0

    def problems(self, config: SPOConfig) -> list[str]:
        return [] if self.scale > 0 else [f"objective.scale must be > 0, got {self.scale!r}"]


@dataclass
class ThrowawayRecords(Records):
    cond: Conditioning
    x_t: Tensor
    t: Tensor


class ThrowawayMethod(Method):
    name = "throwaway"
    config_class = ThrowawayConfig
    metric_names = ("loss", "throwaway_error")
    curves = (Curve("throwaway_error", "Throwaway error", "error", ("throwaway_error",)),)
    needs_scorer = False
    needs_stochastic_steps = False

    def collect(self, items: Sequence[Any], generator: torch.Generator) -> Collected:
        bb, n = self.backbone, len(items)
        cond = bb.encode_prompts(list(items), with_negative=False)
        x_t = torch.randn((n, *bb.latent_shape), generator=generator).to(bb.device, bb.dtype)
        t = torch.randint(0, 1000, (n,), generator=generator)
        return Collected(ThrowawayRecords(cond=cond, x_t=x_t, t=t), units=n, valid=n)

    def loss(self, backbone: Backbone, schedule: Schedule, records: Any) -> LossOutput:
        error = backbone.predict(records.x_t, records.t.to(records.x_t.device), records.cond).float().pow(2).mean()
        loss = error * self.config.objective.scale
        return LossOutput(loss, {"loss": float(loss.detach()), "throwaway_error": float(error.detach())})


# ---------------------------------------------------------------------------- the throwaway backbone
class ThrowawayBackbone(SD15Backbone):
    """An SD-1.5-shaped backbone under another name, with its own tiny builder."""

    kind = "throwaway_sd15"
    build_tiny = staticmethod(build_tiny_sd15)


@pytest.fixture
def plugins() -> Iterator[None]:
    METHODS.register(ThrowawayMethod)
    BACKBONES.register(ThrowawayBackbone)
    try:
        yield
    finally:
        METHODS.unregister("throwaway")
        BACKBONES.unregister("throwaway_sd15")


def _args(path: Path, prompts: Path, *extra: str) -> list[str]:
    return [f"model.pretrained={path}", "model.backbone=throwaway_sd15", "model.device=cpu", "model.dtype=float32",
            "model.resolution=32", "model.vae=null", "train.mixed_precision=no", f"data.prompts={prompts}",
            "train.rounds=1", "train.prompts_per_round=2", "train.batch_size=2", "sampling.num_inference_steps=4",
            "logging.tensorboard=false", "objective.name=throwaway", *extra]


def test_a_method_and_a_backbone_from_a_test_module_train_through_spo_train(
    plugins: None, tmp_path: Path, prompts_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the backbone's tiny builder through the CLI, then one round of the method on it
    assert main(["tiny-pipeline", "throwaway_sd15", str(tmp_path / "tiny")]) == 0
    run = tmp_path / "run"
    assert main(["train", "sd15", "--output", str(run), *_args(tmp_path / "tiny", prompts_file, "objective.scale=2")]) == 0

    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rounds if r.get("type") == "round"]
    assert len(trained) == 1 and trained[0]["throwaway_error"] > 0
    assert trained[0]["loss"] == pytest.approx(2 * trained[0]["throwaway_error"], rel=1e-5)
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["objective"] == {"name": "throwaway", "scale": 2.0} and saved["model"]["backbone"] == "throwaway_sd15"
    reloaded = load_config(run / "config.yaml")
    assert type(reloaded.objective) is ThrowawayConfig and reloaded.objective.scale == 2.0

    # its checks and its curve
    capsys.readouterr()
    assert main(["train", "sd15", "--output", str(tmp_path / "bad"), *_args(tmp_path / "tiny", prompts_file,
                                                                           "objective.scale=0")]) == 2
    assert "objective.scale must be > 0, got 0" in capsys.readouterr().err
    assert main(["report", str(run)]) == 0
    assert 'data-plot="throwaway_error"' in (run / "report.html").read_text()


def test_the_method_settings_belong_to_the_method(plugins: None) -> None:
    with pytest.raises(ValueError, match="not a setting of objective.name 'spo' but of 'throwaway'"):
        load_config("toy", ["objective.scale=3"])
    # a layer naming the method starts its section from the method's defaults, whatever the order
    config = load_config("toy", ["objective.scale=3", "objective.name=throwaway"])
    assert config.objective == ThrowawayConfig(scale=3.0)
    assert "throwaway" in METHODS.names() and "throwaway_sd15" in BACKBONES.names()


def test_unknown_and_taken_names() -> None:
    with pytest.raises(RegistryError, match="objective.name must be one of 'd3po', 'ddpo', 'diffusion_dpo', 'lpo', "
                                            "'spo', got 'sppo' \\(str\\); did you mean 'spo'\\?"):
        METHODS.get("sppo")

    class Impostor(ThrowawayMethod):
        name = "spo"

    with pytest.raises(RegistryError, match="already taken"):
        METHODS.register(Impostor)
    assert "throwaway" not in METHODS.names()  # nothing left behind by the other tests
