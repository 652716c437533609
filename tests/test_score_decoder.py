"""``preference.decoder``: a tiny decoder (diffusers ``AutoencoderTiny``, TAESD's architecture)
decodes x0-hat for scoring only, in ``spo train`` and ``spo train-spm``; on the tiny SD-1.5
pipeline with a tiny random AutoencoderTiny saved to disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from spo.backbones import BackboneLoadError, load_backbone
from spo.cli import main
from spo.config import load_config

SCALING = 0.5  # TAESD's is 1.0; another value shows that decode_for_scoring divides by it


def _save_tiny_decoder(directory: Path, latent_channels: int = 4, blocks: int = 2) -> Path:
    """A random AutoencoderTiny; 2 decoder blocks upsample 2x, as the tiny pipeline's VAE."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    decoder = AutoencoderTiny(
        encoder_block_out_channels=(8,) * blocks, decoder_block_out_channels=(8,) * blocks,
        num_encoder_blocks=(1,) * blocks, num_decoder_blocks=(1,) * blocks,
        latent_channels=latent_channels, scaling_factor=SCALING,
    )
    decoder.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def tiny_decoder_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny_decoder(tmp_path_factory.mktemp("tiny-taesd"))


def _backbone(model: Path) -> Any:
    config = load_config("sd15", [f"model.pretrained={model}", "model.resolution=32", "model.device=cpu",
                                  "model.dtype=float32"])
    return load_backbone(config.model)


@pytest.fixture()
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Rows decoded by every AutoencoderTiny and every AutoencoderKL (class-level spies)."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    calls = {"tiny": 0, "vae": 0}
    for name, cls in (("tiny", AutoencoderTiny), ("vae", AutoencoderKL)):
        original = cls.decode

        def spy(self: Any, z: torch.Tensor, *args: Any, _original: Any = original, _name: str = name,
                **kwargs: Any) -> Any:
            calls[_name] += int(z.shape[0])
            return _original(self, z, *args, **kwargs)

        monkeypatch.setattr(cls, "decode", spy)
    return calls


def test_decode_for_scoring_is_autoencoder_tiny_decode(tiny_sd15_path: Path, tiny_decoder_path: Path) -> None:
    from diffusers import AutoencoderTiny

    bb = _backbone(tiny_sd15_path)
    x0 = torch.randn(3, *bb.latent_shape, generator=torch.Generator().manual_seed(1)) * 2
    torch.testing.assert_close(bb.decode_for_scoring(x0), bb.decode(x0), rtol=0, atol=0)  # none loaded: the VAE
    with torch.no_grad():
        with_vae = bb.decode(x0)
        bb.load_score_decoder(str(tiny_decoder_path))
        assert bb.score_decoder.dtype == bb.dtype and not any(p.requires_grad for p in bb.score_decoder.parameters())
        ours = bb.decode_for_scoring(x0)
        # independently: diffusers' pipelines call vae.decode(latents / vae.config.scaling_factor) and
        # AutoencoderTiny.decode returns [-1, 1] images (DecoderTiny: x.mul(2).sub(1)), clamped as decode does
        reference = AutoencoderTiny.from_pretrained(str(tiny_decoder_path)).eval()
        assert reference.config.scaling_factor == SCALING
        expected = reference.decode(x0 / reference.config.scaling_factor).sample.clamp(-1, 1)
    assert ours.shape == with_vae.shape == (3, 3, bb.resolution, bb.resolution)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert ours.min() >= -1 and ours.max() <= 1
    assert not torch.allclose(ours, with_vae)
    torch.testing.assert_close(bb.decode(x0), with_vae, rtol=0, atol=0)  # the VAE's decode is unchanged


def _train_args(model: Path, clip: Path, prompts: Path, run: Path, *overrides: str) -> list[str]:
    return ["train", "sd15", "--output", str(run), f"model.pretrained={model}", "model.dtype=float32",
            "model.device=cpu", "model.resolution=32", "train.mixed_precision=no", f"data.prompts={prompts}",
            "train.rounds=1", "train.prompts_per_round=2", "pools.k=3", "pools.threshold=0.0",
            f"preference.pretrained={clip}", "preference.checkpoint=null", "preference.variant=clean",
            "sampling.num_inference_steps=6", "logging.tensorboard=false", *overrides]


def test_spo_train_scores_through_the_tiny_decoder(tiny_sd15_path: Path, tiny_clip_path: Path, tiny_decoder_path: Path,
                                                   prompts_file: Path, tmp_path: Path, decode_calls: dict[str, int],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from spo.training import read_metrics

    run = tmp_path / "run"
    assert main(_train_args(tiny_sd15_path, tiny_clip_path, prompts_file, run,
                            f"preference.decoder={tiny_decoder_path}")) == 0
    rounds = [m for m in read_metrics(run / "metrics.jsonl") if m["type"] == "round"]
    assert len(rounds) == 1 and rounds[0]["pools"] > 0
    # every candidate of every pool (k = 3 each) went through the tiny decoder, none through the VAE
    assert decode_calls["tiny"] == 3 * rounds[0]["pools"]
    assert decode_calls["vae"] == 0
    assert (run / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert str(tiny_decoder_path) in (run / "config.yaml").read_text()
    assert "pytorch_lora_weights.safetensors" in capsys.readouterr().out


def test_train_spm_decodes_with_the_tiny_decoder(tiny_sd15_path: Path, tiny_clip_path: Path, tiny_decoder_path: Path,
                                                 pickapic_path: Path, tmp_path: Path, decode_calls: dict[str, int],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    args = ["train-spm", "sd15", "--output", str(run), f"model.pretrained={tiny_sd15_path}",
            "model.resolution=32", "model.dtype=float32", "model.device=cpu", f"preference.pretrained={tiny_clip_path}",
            f"spm.data={pickapic_path}", "spm.steps=1", "spm.batch_size=2", "spm.validation_pairs=4",
            "spm.validation_timesteps=[501]", "logging.tensorboard=false", f"preference.decoder={tiny_decoder_path}"]
    assert main(args) == 0
    # one step of 2 pairs and two validations of <= 4 pairs: both images of each pair, all through the tiny decoder
    assert decode_calls["tiny"] >= 2 * 2 and decode_calls["tiny"] % 2 == 0
    assert decode_calls["vae"] == 0
    assert (run / "spm").is_dir()
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["train", "train-spm"])
def test_missing_decoder_is_one_error_line_and_nothing_written(command: str, tiny_sd15_path: Path, tiny_clip_path: Path,
                                                               pickapic_path: Path, prompts_file: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    missing = tmp_path / "nonexistent"
    if command == "train":
        args = _train_args(tiny_sd15_path, tiny_clip_path, prompts_file, run, f"preference.decoder={missing}")
    else:
        args = ["train-spm", "sd15", "--output", str(run), f"model.pretrained={tiny_sd15_path}", "model.device=cpu",
                "model.dtype=float32", "spm.mixed_precision=no", f"preference.pretrained={tiny_clip_path}",
                f"spm.data={pickapic_path}", f"preference.decoder={missing}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert "preference.decoder" in err[0] and str(missing) in err[0]
    assert not run.exists()


def test_decoder_load_errors(tiny_sd15_path: Path, tmp_path: Path) -> None:
    bb = _backbone(tiny_sd15_path)
    # latent channels other than the UNet's
    three = _save_tiny_decoder(tmp_path / "three-channels", latent_channels=3)
    with pytest.raises(BackboneLoadError, match=r"preference\.decoder.*3-channel.*4-channel"):
        bb.load_score_decoder(str(three))
    # an upsampling other than the VAE's (3 blocks: 4x; the tiny VAE: 2x)
    deep = _save_tiny_decoder(tmp_path / "deep", blocks=3)
    with pytest.raises(BackboneLoadError, match=r"preference\.decoder.*upsamples latents 4x.*2x"):
        bb.load_score_decoder(str(deep))
    # an AutoencoderKL directory is not an AutoencoderTiny
    assert json.loads((tiny_sd15_path / "vae" / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    with pytest.raises(BackboneLoadError, match=r"preference\.decoder.*AutoencoderKL, not an AutoencoderTiny"):
        bb.load_score_decoder(str(tiny_sd15_path / "vae"))
    # a missing local path, and a hub id that cannot be fetched (offline)
    with pytest.raises(BackboneLoadError, match=r"preference\.decoder: no such directory .*nonexistent"):
        bb.load_score_decoder(str(tmp_path / "nonexistent"))
    with pytest.raises(BackboneLoadError, match=r"preference\.decoder: could not load an AutoencoderTiny from 'nobody/no-taesd'"):
        bb.load_score_decoder("nobody/no-taesd")
    assert bb.score_decoder is None  # nothing half-loaded
