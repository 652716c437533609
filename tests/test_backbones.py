"""Backbones on tiny random SD-1.5 / SDXL pipelines loaded from disk, against diffusers' own pipelines."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from spo.backbones import (
    Backbone,
    BackboneLoadError,
    Conditioning,
    SD15Backbone,
    SDXLBackbone,
)
from spo.config import LoRAConfig
from spo.sampling import ddim_sample

PROMPTS = ["a red circle on a blue background", "two green squares"]
CLASSES = {"sd15": (SD15Backbone, StableDiffusionPipeline), "sdxl": (SDXLBackbone, StableDiffusionXLPipeline)}


def _load(kind: str, path: Path, **kwargs: object) -> Backbone:
    kwargs.setdefault("device", "cpu")
    return CLASSES[kind][0].from_pretrained(str(path), **kwargs)  # type: ignore[attr-defined]


def _diffusers_pipeline(kind: str, path: Path):  # noqa: ANN202
    pipe = CLASSES[kind][1].from_pretrained(str(path))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("eta,guidance", [(1.0, 5.0), (0.0, 1.0)])
def test_ddim_sampling_reproduces_diffusers_pipeline(tiny_path: tuple[str, Path], eta: float, guidance: float) -> None:
    kind, path = tiny_path
    backbone = _load(kind, path)
    latents = backbone.initial_latents(2, torch.Generator().manual_seed(1))
    ours = ddim_sample(
        backbone, PROMPTS, num_inference_steps=10, eta=eta, guidance_scale=guidance,
        latents=latents, generator=torch.Generator().manual_seed(7),
    )
    pipe = _diffusers_pipeline(kind, path)
    common = dict(num_inference_steps=10, guidance_scale=guidance, eta=eta, height=32, width=32)
    ref = pipe(PROMPTS, latents=latents.clone(), generator=torch.Generator().manual_seed(7), output_type="latent", **common).images
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # decoding matches the pipeline's images too ([0, 1] there, [-1, 1] here)
    images = pipe(PROMPTS, latents=latents.clone(), generator=torch.Generator().manual_seed(7), output_type="pt", **common).images
    torch.testing.assert_close((backbone.decode(ours) + 1) / 2, images, rtol=1e-4, atol=1e-4)
    assert not torch.equal(ours[0], ours[1])


def test_initial_latents_and_shape(tiny_path: tuple[str, Path]) -> None:
    kind, path = tiny_path
    backbone = _load(kind, path)
    assert backbone.latent_shape == (4, 16, 16)
    a = backbone.initial_latents(3, torch.Generator().manual_seed(5))
    b = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)


def test_guidance_is_one_batched_call(tiny_path: tuple[str, Path]) -> None:
    kind, path = tiny_path
    backbone = _load(kind, path)
    cond = backbone.encode_prompts(PROMPTS)
    x = torch.randn(2, *backbone.latent_shape)
    calls: list[int] = []
    handle = backbone.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    guided = backbone.predict(x, 501, cond, guidance_scale=5.0)
    handle.remove()
    assert calls == [4]  # uncond and cond rows in one call
    # independent reference: two separate passes, combined by hand
    uncond = Conditioning(
        prompt_embeds=cond.negative_prompt_embeds, pooled=cond.negative_pooled, time_ids=cond.negative_time_ids
    )
    e_u = backbone.predict(x, 501, uncond, guidance_scale=1.0)
    e_c = backbone.predict(x, 501, cond, guidance_scale=1.0)
    torch.testing.assert_close(guided, e_u + 5.0 * (e_c - e_u), rtol=1e-4, atol=1e-5)


def test_per_row_timesteps(tiny_path: tuple[str, Path]) -> None:
    kind, path = tiny_path
    backbone = _load(kind, path)
    cond = backbone.encode_prompts(PROMPTS)
    x = torch.randn(2, *backbone.latent_shape)
    batched = backbone.predict(x, torch.tensor([901, 101]), cond, guidance_scale=5.0)
    for i, t in enumerate([901, 101]):
        row = backbone.predict(x[i : i + 1], t, cond.index([i]), guidance_scale=5.0)
        torch.testing.assert_close(batched[i : i + 1], row, rtol=1e-4, atol=1e-5)


def test_conditioning_index_repeat_cat(tiny_sdxl_path: Path) -> None:
    backbone = _load("sdxl", tiny_sdxl_path)
    cond = backbone.encode_prompts(PROMPTS)
    rep = cond.repeat_interleave(3)
    assert len(rep) == 6 and rep.pooled is not None and rep.time_ids is not None
    torch.testing.assert_close(rep.index([3]).prompt_embeds, cond.index([1]).prompt_embeds)
    both = Conditioning.cat([cond.index([1]), cond.index([0])])
    torch.testing.assert_close(both.pooled, cond.pooled.flip(0))
    with pytest.raises(ValueError, match="rows"):
        backbone.predict(torch.randn(3, 4, 16, 16), 1, cond, 5.0)


def test_sdxl_conditioning_details(tiny_sdxl_path: Path) -> None:
    backbone = _load("sdxl", tiny_sdxl_path)
    cond = backbone.encode_prompts(PROMPTS)
    assert cond.prompt_embeds.shape == (2, 77, 64)  # both encoders' penultimate states
    assert cond.pooled.shape == (2, 32)
    assert cond.time_ids.tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    assert float(cond.negative_prompt_embeds.abs().max()) == 0.0  # force_zeros_for_empty_prompt
    explicit = _load("sdxl", tiny_sdxl_path, negative_prompt="blurry").encode_prompts(PROMPTS)
    assert float(explicit.negative_prompt_embeds.abs().max()) > 0.0


def test_sd15_negative_prompt_is_empty_string(tiny_sd15_path: Path) -> None:
    backbone = _load("sd15", tiny_sd15_path)
    cond = backbone.encode_prompts(PROMPTS)
    empty = backbone.encode_prompts([""], with_negative=False)
    torch.testing.assert_close(cond.negative_prompt_embeds[1:], empty.prompt_embeds)
    assert backbone.encode_prompts(PROMPTS, with_negative=False).negative_prompt_embeds is None


def test_lora_identity_at_init_then_reference_is_base(tiny_path: tuple[str, Path]) -> None:
    kind, path = tiny_path
    backbone = _load(kind, path)
    cond = backbone.encode_prompts(PROMPTS)
    x = torch.randn(2, *backbone.latent_shape)
    base = backbone.predict(x, 501, cond, 5.0)
    params = backbone.attach_lora(LoRAConfig(rank=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    names = [n for n, p in backbone.unet.named_parameters() if p.requires_grad]
    assert params and all("lora_" in n for n in names) and len(names) == len(params)
    assert all(p.dtype == torch.float32 for p in params)
    # Gaussian init: A ~ N(0, 1/r), B = 0, so the policy equals the base model at the start
    a_weights = torch.cat([p.detach().flatten() for n, p in backbone.unet.named_parameters() if "lora_A" in n])
    assert float(a_weights.std()) == pytest.approx(1 / 4, rel=0.2)
    assert all(float(p.detach().abs().max()) == 0 for n, p in backbone.unet.named_parameters() if "lora_B" in n)
    torch.testing.assert_close(backbone.predict(x, 501, cond, 5.0), base)
    with torch.no_grad():
        for n, p in backbone.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    policy = backbone.predict(x, 501, cond, 5.0)
    assert float((policy - base).detach().abs().max()) > 1e-3
    torch.testing.assert_close(backbone.predict(x, 501, cond, 5.0, reference=True), base)
    # adapters come back on after the reference context, also when it raised
    with pytest.raises(RuntimeError, match="boom"), backbone.reference_model():
        raise RuntimeError("boom")
    torch.testing.assert_close(backbone.predict(x, 501, cond, 5.0), policy)
    with pytest.raises(RuntimeError, match="already"):
        backbone.enable_full_finetuning()


def test_lora_gradients_reach_only_adapters(tiny_sd15_path: Path) -> None:
    backbone = _load("sd15", tiny_sd15_path)
    backbone.attach_lora(LoRAConfig(rank=2))
    backbone.enable_gradient_checkpointing()
    backbone.unet.train()
    cond = backbone.encode_prompts(PROMPTS)
    with torch.no_grad():
        for n, p in backbone.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    out = backbone.predict(torch.randn(2, 4, 16, 16), 501, cond, 5.0)
    out.square().mean().backward()
    grads = {n: p.grad for n, p in backbone.unet.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert any(float(g.abs().max()) > 0 for n, g in grads.items() if "lora_A" in n)


def test_lora_bad_targets(tiny_sd15_path: Path) -> None:
    backbone = _load("sd15", tiny_sd15_path)
    with pytest.raises(ValueError, match="matched no module"):
        backbone.attach_lora(LoRAConfig(rank=2, target_modules=["no_such_layer"]))


def test_full_finetuning_keeps_a_frozen_reference(tiny_sd15_path: Path) -> None:
    backbone = _load("sd15", tiny_sd15_path)
    cond = backbone.encode_prompts(PROMPTS)
    x = torch.randn(2, 4, 16, 16)
    base = backbone.predict(x, 301, cond, 5.0)
    params = backbone.enable_full_finetuning()
    assert len(params) == len(list(backbone.unet.parameters()))
    assert backbone.reference_unet is not None
    assert not any(p.requires_grad for p in backbone.reference_unet.parameters())
    with torch.no_grad():
        backbone.unet.conv_out.bias.add_(1.0)
    assert float((backbone.predict(x, 301, cond, 5.0) - base).detach().abs().max()) > 0.5
    torch.testing.assert_close(backbone.predict(x, 301, cond, 5.0, reference=True), base)


@pytest.mark.parametrize("targets", [["to_q", "to_k", "to_v", "to_out.0"], ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]],
                         ids=["attention", "attention+conv"])
def test_saved_lora_loads_into_diffusers_and_changes_output(tiny_path: tuple[str, Path], tmp_path: Path,
                                                            targets: list[str]) -> None:
    kind, path = tiny_path
    backbone = _load(kind, path)
    # alpha != rank must survive the round trip; convolutions too (the toy preset adapts them)
    backbone.attach_lora(LoRAConfig(rank=4, alpha=8, target_modules=targets))
    with torch.no_grad():
        for n, p in backbone.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    file = backbone.save_lora(tmp_path / "lora")
    assert file.name == "pytorch_lora_weights.safetensors" and file.exists()
    from safetensors.torch import load_file

    keys = list(load_file(str(file)))
    assert keys and all(k.startswith("unet.") for k in keys)
    pipe = _diffusers_pipeline(kind, path)
    kw = dict(num_inference_steps=4, guidance_scale=5.0, eta=0.0, height=32, width=32, output_type="latent")
    before = pipe(PROMPTS[:1], generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(str(tmp_path / "lora"))
    after = pipe(PROMPTS[:1], generator=torch.Generator().manual_seed(0), **kw).images
    assert float((after - before).abs().max()) > 1e-3
    # and it is the same function as our policy
    ours = ddim_sample(backbone, PROMPTS[:1], num_inference_steps=4, eta=0.0, guidance_scale=5.0,
                       generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, after, rtol=1e-4, atol=1e-4)


def test_bfloat16_weights(tiny_sd15_path: Path) -> None:
    backbone = _load("sd15", tiny_sd15_path, dtype="bfloat16")
    assert backbone.unet.dtype == torch.bfloat16
    cond = backbone.encode_prompts(PROMPTS)
    assert cond.prompt_embeds.dtype == torch.bfloat16
    out = backbone.predict(backbone.initial_latents(2, torch.Generator().manual_seed(0)), 501, cond, 5.0)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()  # guidance combined in fp32
    # conditioning in another dtype is cast to the UNet's
    assert torch.isfinite(backbone.predict(torch.randn(2, 4, 16, 16), 501, cond.to(dtype=torch.float32), 5.0)).all()


def test_full_finetuning_in_bfloat16_starts_at_the_reference(tiny_sd15_path: Path) -> None:
    backbone = _load("sd15", tiny_sd15_path, dtype="bfloat16")
    backbone.enable_full_finetuning()
    cond = backbone.encode_prompts(PROMPTS)
    x = torch.randn(2, 4, 16, 16)
    torch.testing.assert_close(backbone.predict(x, 501, cond, 5.0), backbone.predict(x, 501, cond, 5.0, reference=True))
    with torch.no_grad():
        backbone.unet.conv_out.bias.add_(1.0)
    with backbone.reference_model():  # the context, not only the flag, selects the frozen copy
        ref = backbone.predict(x, 501, cond, 5.0)
    torch.testing.assert_close(ref, backbone.predict(x, 501, cond, 5.0, reference=True))
    assert float((backbone.predict(x, 501, cond, 5.0) - ref).detach().abs().max()) > 0.5


def test_missing_and_invalid_paths(tmp_path: Path, tiny_sd15_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(BackboneLoadError, match="no such directory") as err:
        SD15Backbone.from_pretrained(str(missing))
    assert str(missing) in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneLoadError, match="model_index.json"):
        SDXLBackbone.from_pretrained(str(tmp_path / "empty"))
    with pytest.raises(BackboneLoadError, match="model.vae"):
        SD15Backbone.from_pretrained(str(tiny_sd15_path), vae=str(tmp_path / "no-vae"))


def test_encode_images_matches_the_vae(tiny_sd15_path: Path) -> None:
    backbone = _load("sd15", tiny_sd15_path)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = backbone.encode_images(images, generator=torch.Generator().manual_seed(0))
    vae = backbone.vae
    expected = vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(0)) * vae.config.scaling_factor
    torch.testing.assert_close(latents, expected)
    torch.testing.assert_close(backbone.decode(latents), vae.decode(expected / vae.config.scaling_factor).sample.clamp(-1, 1))


def test_latents_mean_std_convention(tiny_sd15_path: Path) -> None:
    """A VAE with latents_mean/std (as SDXL-style VAEs may declare): diffusers' formula."""
    backbone = _load("sd15", tiny_sd15_path)
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]
    backbone.vae.register_to_config(latents_mean=mean, latents_std=std)
    lat = torch.randn(1, 4, 16, 16)
    m, s = torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
    sf = backbone.vae.config.scaling_factor
    want = backbone.vae.decode(lat * s / sf + m).sample.clamp(-1, 1)
    torch.testing.assert_close(backbone.decode(lat), want)


def test_unavailable_device_and_cpu_fp16_are_clear_errors(tiny_sd15_path: Path) -> None:
    from spo.errors import ModelLoadError

    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            _load("sd15", tiny_sd15_path, device="cuda")
    with pytest.raises(ModelLoadError, match="not a torch device"):
        SD15Backbone.from_pretrained(str(tiny_sd15_path), device="gpu0")
    with pytest.raises(ModelLoadError, match="float16"):
        _load("sd15", tiny_sd15_path, dtype="float16")


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_resolution_null_is_the_pipelines_native_size(kind: str, request: pytest.FixtureRequest) -> None:
    """model.resolution: null (every preset's default) = UNet sample_size x VAE scale factor, as
    diffusers pipelines default; an explicit value still wins."""
    from spo.backbones import load_backbone
    from spo.config import load_config

    path = request.getfixturevalue(f"tiny_{kind}_path")
    config = load_config(kind, [f"model.pretrained={path}", "model.device=cpu", "model.vae=null", "model.dtype=float32"])
    assert config.model.resolution is None
    backbone = load_backbone(config.model)
    native = backbone.unet.config.sample_size * backbone.vae_scale_factor
    assert backbone.resolution == native and backbone.latent_shape[1:] == (backbone.unet.config.sample_size,) * 2
    assert native < 512  # the tiny pipelines are small: a 512 px default would have cost minutes per round
    explicit = load_backbone(load_config(kind, [f"model.pretrained={path}", "model.device=cpu", "model.vae=null",
                                                "model.dtype=float32", f"model.resolution={2 * native}"]).model)
    assert explicit.resolution == 2 * native


def test_text_encoder_outputs_are_cached_per_call_and_never_depend_on_earlier_calls(tiny_path: tuple[str, Path]) -> None:
    """A call's distinct prompts are encoded in one batch (repeats share a row) and the call is
    cached: the same prompt list again runs no encoder; what a call returns is exactly what a
    fresh backbone returns for it (a resumed run's empty cache changes nothing), whatever was
    encoded before; the cache keeps at most prompt_cache_size calls."""
    kind, path = tiny_path
    backbone = _load(kind, path)
    encoders = [backbone.pipeline.text_encoder] + ([backbone.pipeline.text_encoder_2] if kind == "sdxl" else [])
    rows: list[int] = []
    for encoder in encoders[:1]:
        encoder.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    first = backbone.encode_prompts(["a cat", "a dog", "a cat"])
    assert rows == ([2, 2] if kind == "sd15" else [2])  # prompts once (+ the negatives for SD-1.5)
    assert torch.equal(first.prompt_embeds[0], first.prompt_embeds[2])
    rows.clear()
    backbone.encode_prompts(["a cat", "a dog", "a cat"])
    assert rows == []  # the same call: cached
    again = backbone.encode_prompts(["a dog", "a cat", "a bird"])
    fresh = _load(kind, path).encode_prompts(["a dog", "a cat", "a bird"])
    for name in ("prompt_embeds", "negative_prompt_embeds", "pooled", "negative_pooled", "time_ids"):
        a, b = getattr(again, name), getattr(fresh, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), name  # bit for bit: earlier calls do not matter
    backbone.prompt_cache_size = 2
    backbone.encode_prompts(["x", "y", "z"])
    backbone.encode_prompts(["w"])
    assert len(backbone._prompt_cache) == 2
