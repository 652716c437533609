"""The latent reward model (LRM, spo.preference.latent) on its own: what its features are, how it
saves and loads (ours and the authors' layouts), and what its settings change.

Parity with the LPO release's own models is tests/test_release_parity_lpo.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lpo_oracle import multiscale_unet, one_thread
from spo.errors import ModelLoadError
from spo.preference.latent import LatentRewardModel, feature_width, load_latent_reward_model, unet_features

PROMPTS = ["a red circle", "a blue square", "two green stars"]
TIMESTEPS = torch.tensor([951, 501, 1])

#: the real models' UNet configs, as far as the LRM's features depend on them (the hub's
#: unet/config.json of stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0)
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                 block_out_channels=[320, 640, 1280, 1280], layers_per_block=2)
SDXL_UNET = dict(sample_size=128, cross_attention_dim=2048, attention_head_dim=[5, 10, 20],
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 block_out_channels=[320, 640, 1280], layers_per_block=2, transformer_layers_per_block=[1, 2, 10],
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    with one_thread():
        yield


def _latents(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def _randomise_head(lrm: LatentRewardModel, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in lrm.named_parameters():
            if not name.startswith(("unet.", "text_encoder")):
                value.copy_(torch.randn(value.shape, generator=gen) * 0.1 + (1.5 if name == "logit_scale" else 0.0))


def _unet_inputs(kind: str, n: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
    gen = torch.Generator().manual_seed(3)
    sample = torch.randn(n, 4, 16, 16, generator=gen)
    t = torch.tensor([901, 51])[:n]
    width = 32 if kind == "sd15" else 64
    hidden = torch.randn(n, 7, width, generator=gen)
    added = None
    if kind == "sdxl":
        added = {"text_embeds": torch.randn(n, 32, generator=gen), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * n)}
    return sample, t, hidden, added


# ------------------------------------------------------------------ the features
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_unet_features_are_what_the_full_forward_computes(kind: str) -> None:
    """unet_features stops a full ``UNet2DConditionModel.forward`` after its mid block: each
    stage is the output of its down block's last layer (resnet, then its attention in a
    cross-attention block) before the downsampler, i.e. the release's
    ``down_block_res_samples[2, 5, 8(, 11)]`` (conv_in's output first, then each block's
    res_samples: one per layer and one after its downsampler); the mid block's output is the mid."""
    unet = multiscale_unet(kind).eval()
    sample, t, hidden, added = _unet_inputs(kind)
    seen: dict[str, Any] = {"res": []}
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: seen["res"].append(o)),
             unet.mid_block.register_forward_hook(lambda m, i, o: seen.__setitem__("mid", o))]
    for b, block in enumerate(unet.down_blocks):
        hooks.append(block.register_forward_hook(lambda m, i, o: seen["res"].extend(o[1])))
        last = block.attentions[-1] if getattr(block, "has_cross_attention", False) else block.resnets[-1]
        hooks.append(last.register_forward_hook(lambda m, i, o, b=b: seen.__setitem__(b, o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        unet(sample, t, encoder_hidden_states=hidden, added_cond_kwargs=added)
        for hook in hooks:
            hook.remove()
        stages, mid = unet_features(unet, sample, t, hidden, added)
    release_indices = [2, 5, 8, 11] if kind == "sd15" else [2, 5, 8]
    assert len(stages) == len(unet.down_blocks) == len(release_indices)
    assert len(seen["res"]) == 1 + sum(len(b.resnets) + (b.downsamplers is not None) for b in unet.down_blocks)
    for b, index in enumerate(release_indices):
        torch.testing.assert_close(stages[b], seen[b], rtol=0, atol=0)
        torch.testing.assert_close(stages[b], seen["res"][index], rtol=0, atol=0)
    torch.testing.assert_close(mid, seen["mid"], rtol=0, atol=0)
    assert feature_width(unet, True) == sum(s.shape[1] for s in stages) + mid.shape[1]


@pytest.mark.parametrize("kind,config,width,shapes", [
    ("sd15", SD15_UNET, 4800, [(320, 64), (640, 32), (1280, 16), (1280, 8), (1280, 8)]),
    ("sdxl", SDXL_UNET, 3520, [(320, 128), (640, 64), (1280, 32), (1280, 32)]),
])
def test_feature_widths_of_the_real_models(kind: str, config: dict[str, Any], width: int,
                                           shapes: list[tuple[int, int]]) -> None:
    """The real UNets' configs (built on the meta device: no weights, no memory) give the
    release's hard-coded visual projection widths, 4800 (SD-1.5) and 3520 (SDXL), and the
    stages it comments (``[320, 64, 64]`` ... for SD-1.5 at 512 px, ``[320, 128, 128]`` ... for
    SDXL at 1024 px); without multi-scale the mid block's 1280."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(**config)
    assert feature_width(unet, True) == width and feature_width(unet, False) == 1280
    side = config["sample_size"]
    sample = torch.zeros(1, 4, side, side, device="meta")
    hidden = torch.zeros(1, 77, config["cross_attention_dim"], device="meta")
    added = {"text_embeds": torch.zeros(1, 1280, device="meta"), "time_ids": torch.zeros(1, 6, device="meta")} if kind == "sdxl" else None
    stages, mid = unet_features(unet, sample, torch.tensor([1], device="meta"), hidden, added)
    assert [(s.shape[1], s.shape[2]) for s in [*stages, mid]] == shapes
    encoder = type("Encoder", (), {"config": type("Config", (), {"hidden_size": 768, "projection_dim": 1280})()})()
    lrm = LatentRewardModel(unet, [encoder] * (2 if kind == "sdxl" else 1), [None] * (2 if kind == "sdxl" else 1),
                            family="sdxl" if kind == "sdxl" else "sd")
    assert lrm.visual_projection.in_features == width


# ------------------------------------------------------------------ saving and loading
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_save_then_from_pretrained_scores_identically(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    path = request.getfixturevalue(f"lrm_{kind}_path")
    lrm = LatentRewardModel.from_pretrained(str(path), multi_scale_cfg=True, guidance_scale=3.0)
    _randomise_head(lrm)
    before = lrm(_latents(), PROMPTS, TIMESTEPS)
    saved = lrm.save(tmp_path / "lrm")
    again = LatentRewardModel.from_pretrained(str(saved))  # the saved settings win over the defaults
    assert again.settings() == lrm.settings() and again.family == ("sdxl" if kind == "sdxl" else "sd")
    torch.testing.assert_close(again(_latents(), PROMPTS, TIMESTEPS), before, rtol=0, atol=0)


def _write_release_dir(lrm: LatentRewardModel, directory: Path, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """The authors' ``save`` layout: unet/, text_encoder/ (and text_encoder_2/), state_dict.pt."""
    directory.mkdir(parents=True, exist_ok=True)
    lrm.unet.save_pretrained(directory / "unet")
    lrm.text_encoder.save_pretrained(directory / "text_encoder")
    if lrm.text_encoder_2 is not None:
        lrm.text_encoder_2.save_pretrained(directory / "text_encoder_2")
    if state is None:
        state = {"visual_projection": {"weight": lrm.visual_projection.weight.detach().clone()},
                 "logit_scale": float(lrm.logit_scale)}
        if lrm.text_projection is not None:
            state["text_projection"] = {"weight": lrm.text_projection.weight.detach().clone()}
    torch.save(state, directory / "state_dict.pt")
    return state


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_a_release_layout_checkpoint_loads_through_the_config(kind: str, request: pytest.FixtureRequest,
                                                              tmp_path: Path) -> None:
    """preference.checkpoint = a directory as the authors' ``save`` writes it (trained UNet and
    text encoder(s), ``state_dict.pt`` of nested dicts with a float logit scale) over
    preference.pretrained: the loaded LRM scores as the one that wrote it."""
    from spo.config import load_config

    path = request.getfixturevalue(f"lrm_{kind}_path")
    trained = LatentRewardModel.from_pretrained(str(path))
    _randomise_head(trained)
    with torch.no_grad():  # "training" moved the UNet and the text encoder away from the base
        trained.unet.conv_in.weight.add_(0.05)
        trained.text_encoder.get_input_embeddings().weight.mul_(1.1)
    _write_release_dir(trained, tmp_path / "release")
    config = load_config(f"{kind}-lpo", [f"preference.pretrained={path}", f"preference.checkpoint={tmp_path / 'release'}",
                                         "preference.text_projection=null", "preference.dtype=float32"])
    loaded = load_latent_reward_model(config, "cpu")
    assert loaded.dtype == torch.float32 and float(loaded.logit_scale) == pytest.approx(float(trained.logit_scale))
    torch.testing.assert_close(loaded(_latents(), PROMPTS, TIMESTEPS), trained(_latents(), PROMPTS, TIMESTEPS),
                               rtol=0, atol=1e-6)
    base = LatentRewardModel.from_pretrained(str(path))
    assert not torch.equal(base.unet.conv_in.weight, loaded.unet.conv_in.weight)


def test_a_bad_release_checkpoint_fails_with_one_clear_line(lrm_sd15_path: Path, tmp_path: Path) -> None:
    lrm = LatentRewardModel.from_pretrained(str(lrm_sd15_path))
    wrong = tmp_path / "wrong"
    _write_release_dir(lrm, wrong, {"visual_projection": {"weight": torch.zeros(32, 4800)},
                                    "text_projection": {"weight": torch.zeros(32, 32)}, "logit_scale": 2.0})
    with pytest.raises(ModelLoadError) as err:
        lrm.load_release_checkpoint(str(wrong))
    message = str(err.value)
    assert "\n" not in message and "visual_projection.weight" in message and "4800" in message
    missing = tmp_path / "missing"
    _write_release_dir(lrm, missing)
    (missing / "state_dict.pt").unlink()
    with pytest.raises(ModelLoadError) as err:
        lrm.load_release_checkpoint(str(missing))
    message = str(err.value)
    assert "\n" not in message and "state_dict.pt" in message and "preference.checkpoint" in message
    pickled = tmp_path / "pickled"
    _write_release_dir(lrm, pickled, {"visual_projection": {"weight": torch.zeros(1)}, "logit_scale": 2.0,
                                      "text_projection": {"weight": torch.zeros(1)}, "note": Path("x")})
    with pytest.raises(ModelLoadError) as err:
        lrm.load_release_checkpoint(str(pickled))
    assert "\n" not in str(err.value) and "never pickled code" in str(err.value)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_a_single_file_whole_model_state_dict_loads(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """One torch file of the whole model's state dict (the release's SDXL ``load`` of a file:
    ``load_state_dict(ckpt, strict=False)``), keys as the release's model names them, its VAE's
    included (the release's preference models carry the pipeline's VAE as ``self.vae``; scoring
    never uses it, and its keys are passed over)."""
    path = request.getfixturevalue(f"lrm_{kind}_path")
    trained = LatentRewardModel.from_pretrained(str(path))
    _randomise_head(trained, seed=5)
    with torch.no_grad():
        trained.unet.conv_in.bias.add_(0.1)
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    state["vae.decoder.conv_out.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "lrm.pt")
    loaded = LatentRewardModel.from_pretrained(str(path), checkpoint=str(tmp_path / "lrm.pt"))
    torch.testing.assert_close(loaded(_latents(), PROMPTS, TIMESTEPS), trained(_latents(), PROMPTS, TIMESTEPS),
                               rtol=0, atol=0)
    torch.save({**state, "unet.no_such.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ModelLoadError, match="unet.no_such.weight"):
        LatentRewardModel.from_pretrained(str(path), checkpoint=str(tmp_path / "other.pt"))
    torch.save({**state, "unet.conv_in.bias": torch.zeros(3)}, tmp_path / "shape.pt")
    with pytest.raises(ModelLoadError) as err:  # one line naming the key, not torch's report
        LatentRewardModel.from_pretrained(str(path), checkpoint=str(tmp_path / "shape.pt"))
    assert "\n" not in str(err.value) and "unet.conv_in.bias (3,)" in str(err.value)


# ------------------------------------------------------------------ what the settings change
def test_guidance_changes_the_scores(lrm_sd15_path: Path) -> None:
    """CFG 7.5 on the pooled mid features (an unconditional pass on the empty prompt beside the
    conditional one) against 1.0 (the conditional pass alone): different scores, same weights."""
    lrm = LatentRewardModel.from_pretrained(str(lrm_sd15_path), guidance_scale=7.5)
    _randomise_head(lrm)
    guided = lrm(_latents(), PROMPTS, TIMESTEPS)
    lrm.guidance_scale = 1.0
    rows: list[int] = []
    hook = lrm.unet.conv_in.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    plain = lrm(_latents(), PROMPTS, TIMESTEPS)
    hook.remove()
    assert rows == [3]  # no unconditional rows
    assert float((guided - plain).abs().max()) > 1e-3
    assert torch.isfinite(guided).all() and torch.isfinite(plain).all()


def test_sdxl_scores_in_the_second_text_encoders_text_embeds(lrm_sdxl_path: Path) -> None:
    """The SDXL family has no text projection: its text side is text_encoder_2's projected
    ``text_embeds`` of the prompt, normalised; the pooled rows (prompt, then the empty prompt)
    also condition the UNet's added embedding."""
    lrm = LatentRewardModel.from_pretrained(str(lrm_sdxl_path))
    assert lrm.text_projection is None and "text_projection.weight" not in lrm.head_state()
    assert lrm.projection_dim == lrm.text_encoder_2.config.projection_dim
    assert lrm.resolution == 16 * 2  # sample_size x the tiny VAE's factor (two levels)
    _, text = lrm.embeddings(_latents(), PROMPTS, TIMESTEPS)
    ids = lrm.tokenizers[1](PROMPTS, padding="max_length", max_length=lrm.tokenizers[1].model_max_length,
                            truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = lrm.text_encoder_2(ids).text_embeds
    torch.testing.assert_close(text, embeds / embeds.norm(dim=-1, keepdim=True), rtol=0, atol=1e-6)
    hidden, pooled, _ = lrm.encode_text(PROMPTS)
    assert pooled is not None and pooled.shape == (2 * len(PROMPTS), 32) and hidden.shape[-1] == 64
    with pytest.raises(ValueError, match="text_embeds space"):
        LatentRewardModel(lrm.unet, [lrm.text_encoder, lrm.text_encoder_2], lrm.tokenizers, family="sdxl", projection_dim=16)
