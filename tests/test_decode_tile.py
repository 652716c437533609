"""``sampling.decode_tile``: the pools' x0-hats decoded for scoring in tiles (diffusers' VAE
tiling), checked against the decoder run on one tile by hand; the final decode stays whole; the
settings that would not tile are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spo.backbones import BackboneLoadError, load_backbone
from spo.cli import main
from spo.config import ConfigError, load_config

TILE = 16  # pixels: the tiny SD-1.5 decodes 16x16 latents to 32 px (factor 2), so 8-latent tiles


@pytest.fixture()
def tiled_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts diffusers' ``AutoencoderKL.tiled_decode`` calls (the decodes that were tiled)."""
    from diffusers import AutoencoderKL

    calls = {"tiled": 0}
    tiled_decode = AutoencoderKL.tiled_decode

    def counted(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls["tiled"] += 1
        return tiled_decode(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "tiled_decode", counted)
    return calls


def _backbone(path: Path):  # noqa: ANN202
    return load_backbone(load_config("sd15", [f"model.pretrained={path}", "model.device=cpu", "model.dtype=float32",
                                              "model.resolution=32"]).model)


def test_tiled_score_decode_is_diffusers_tiling_and_leaves_the_vae_as_it_was(tiny_sd15_path: Path) -> None:
    bb = _backbone(tiny_sd15_path)
    x0 = torch.randn(2, *bb.latent_shape, generator=torch.Generator().manual_seed(3)) * 2
    with torch.no_grad():
        whole = bb.decode(x0)
        bb.tile_score_decodes(TILE)
        tiled = bb.decode_for_scoring(x0)
        # independently: the first tile alone, through the VAE's own decoder (latents unscaled as
        # decode does), keeps its top-left corner up to where the next tiles blend in
        vae, factor = bb.vae, bb.vae_scale_factor
        z = x0 / vae.config.scaling_factor
        latent_tile = TILE // factor
        first = vae.decoder(vae.post_quant_conv(z[:, :, :latent_tile, :latent_tile])).clamp(-1, 1)
        keep = TILE - int(TILE * vae.tile_overlap_factor)
        assert vae.use_tiling is False  # switched on around the scoring decode only
        assert torch.equal(bb.decode(x0), whole)  # the final images' decode is whole
    assert tiled.shape == whole.shape
    torch.testing.assert_close(tiled[:, :, :keep, :keep], first[:, :, :keep, :keep], rtol=1e-5, atol=1e-6)
    assert float((tiled - whole).abs().max()) > 1e-3  # the blended image is not the whole decode
    bb.tile_score_decodes(None)
    with torch.no_grad():
        assert torch.equal(bb.decode_for_scoring(x0), whole)


def test_diffusers_tiles_meet_only_at_multiples_of_four_latents() -> None:
    """Why tiles must be a multiple of 4 x the VAE's factor: diffusers' ``tiled_decode`` steps by
    int(0.75 T) latents but keeps S - int(S / 4) pixels of each tile; with a factor-8 VAE (as
    SD-1.5's) a 264 px tile on 64 latents decodes a 524 px image, 256 px the right 512."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                        sample_size=512).eval()
    z = torch.randn(1, 4, 64, 64)
    sizes = {}
    with torch.no_grad():
        for tile in (256, 264):
            vae.enable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // 8
            sizes[tile] = vae.decode(z).sample.shape[-1]
    assert sizes == {256: 512, 264: 524}


def test_settings_that_would_not_tile_are_refused(tiny_sd15_path: Path) -> None:
    bb = _backbone(tiny_sd15_path)
    with pytest.raises(BackboneLoadError, match="smaller than the images"):
        bb.tile_score_decodes(32)  # the whole image: diffusers would not tile
    bb.vae_scale_factor, bb.resolution = 8, 512  # as SD-1.5: tiles of 32 px steps
    with pytest.raises(BackboneLoadError, match="multiple of 32"):
        bb.tile_score_decodes(264)
    bb.tile_score_decodes(256)
    with pytest.raises(ConfigError, match="multiple of 8"):
        load_config("sd15", ["sampling.decode_tile=20"])
    with pytest.raises(ConfigError, match="preference.decoder"):
        load_config("sd15", ["sampling.decode_tile=512", "preference.decoder=madebyollin/taesd"])
    with pytest.raises(ConfigError, match="scores nothing"):  # Diffusion-DPO decodes nothing for scoring
        load_config("sd15-diffusion-dpo", ["sampling.decode_tile=256"])
    with pytest.raises(ConfigError, match="latent reward model"):  # LPO scores latents
        load_config("sd15-lpo", ["sampling.decode_tile=256"])
    toy = load_backbone(load_config("toy", ["model.device=cpu"]).model)
    with pytest.raises(BackboneLoadError, match="no VAE"):
        toy.tile_score_decodes(16)


def test_spo_train_scores_tiled_decodes(tiny_sd15_path: Path, tiny_clip_path: Path, prompts_file: Path, tmp_path: Path,
                                        tiled_calls: dict[str, int]) -> None:
    from spo.training import read_metrics

    calls = tiled_calls
    run = tmp_path / "run"
    args = ["train", "sd15", "--output", str(run), f"model.pretrained={tiny_sd15_path}", "model.dtype=float32",
            "model.device=cpu", "model.resolution=32", "train.mixed_precision=no", f"data.prompts={prompts_file}",
            "train.rounds=1", "train.prompts_per_round=2", "pools.k=3", "pools.threshold=0.0",
            f"preference.pretrained={tiny_clip_path}", "preference.checkpoint=null", "preference.variant=clean",
            "sampling.num_inference_steps=6", "logging.tensorboard=false", "sampling.decode_batch_size=1",
            f"sampling.decode_tile={TILE}"]
    assert main(args) == 0
    (round_line,) = [m for m in read_metrics(run / "metrics.jsonl") if m["type"] == "round"]
    assert calls["tiled"] == 3 * round_line["pools"]  # every candidate, one decode call each
    assert (run / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert main(args[:-1] + ["sampling.decode_tile=32", "--output", str(tmp_path / "refused")]) == 2
    assert not (tmp_path / "refused").exists()


def test_train_spm_decodes_tiled_as_spo_train_scores(tiny_sd15_path: Path, tiny_clip_path: Path, pickapic_path: Path,
                                                      tmp_path: Path, tiled_calls: dict[str, int]) -> None:
    """``spo train-spm`` decodes its x0 estimates in the same tiles, so the SPM learns on what
    ``spo train`` will score."""
    calls = tiled_calls
    args = ["train-spm", "sd15", "--output", str(tmp_path / "spm"), f"model.pretrained={tiny_sd15_path}",
            "model.resolution=32", "model.dtype=float32", "model.device=cpu", f"preference.pretrained={tiny_clip_path}",
            f"spm.data={pickapic_path}", "spm.steps=1", "spm.batch_size=2", "spm.validation_pairs=4",
            "spm.validation_timesteps=[501]", "logging.tensorboard=false", f"sampling.decode_tile={TILE}"]
    assert main(args) == 0
    assert calls["tiled"] > 0
