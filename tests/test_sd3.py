"""SPO on a flow-matching model (SD3) through the flow SDE, on the tiny offline SD3 pipeline:
the sampler agrees with diffusers' StableDiffusion3Pipeline, and the unchanged trainer starts at
log 2, learns a fixed preference, resumes exactly and exports a LoRA that diffusers loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fixed_scorers import brightness
from spo.backbones import SD3Backbone, load_backbone
from spo.config import load_config
from spo.diffusion import FlowSDESchedule
from spo.sampling import ddim_sample
from spo.training import SPOTrainer, read_metrics


def _config(model: Path, prompts: Path, *overrides: str):  # noqa: ANN202
    return load_config("sd3", [
        f"model.pretrained={model}", "model.resolution=32", "model.device=cpu", "model.dtype=float32",
        "train.mixed_precision=no", f"data.prompts={prompts}", "train.rounds=2", "train.prompts_per_round=2",
        "train.batch_size=8", "sampling.num_inference_steps=6", "pools.kappa=900", "pools.threshold=0.0",
        "lora.rank=4", "lora.alpha=4", "optimizer.lr=1e-3", "logging.tensorboard=false",
        "logging.checkpoint_every=1", *overrides,
    ])


def test_the_sd3_preset_is_a_flow_backbone(tiny_sd3_path: Path) -> None:
    config = load_config("sd3", [f"model.pretrained={tiny_sd3_path}", "model.device=cpu"])
    backbone = load_backbone(config.model)
    assert isinstance(backbone, SD3Backbone) and isinstance(backbone.schedule(10), FlowSDESchedule)
    assert backbone.resolution == 32 * 8 // 4 or backbone.resolution == config.model.resolution


def test_noise_level_zero_samples_as_the_diffusers_pipeline(tiny_sd3_path: Path) -> None:
    backbone = SD3Backbone.from_pretrained(str(tiny_sd3_path), device="cpu")
    prompts = ["a red circle", "a blue square"]
    ours = ddim_sample(backbone, prompts, num_inference_steps=5, guidance_scale=4.5, eta=0.0,
                       generator=torch.Generator().manual_seed(0))
    reference = backbone.pipeline(prompts, num_inference_steps=5, guidance_scale=4.5, output_type="latent",
                                  generator=torch.Generator().manual_seed(0)).images
    assert torch.allclose(ours, reference, atol=1e-5), float((ours - reference).abs().max())
    # and the images: the VAE's shift factor applied as diffusers applies it
    pipe_images = backbone.pipeline(prompts, num_inference_steps=5, guidance_scale=4.5, output_type="pt",
                                    generator=torch.Generator().manual_seed(0)).images
    assert torch.allclose(backbone.decode(ours) * 0.5 + 0.5, pipe_images, atol=1e-4)


def _darkness(images: torch.Tensor, prompts: list[str], timesteps: torch.Tensor) -> torch.Tensor:
    return -brightness(images, prompts, timesteps)


@pytest.mark.parametrize("scorer, sign", [(brightness, 1.0), (_darkness, -1.0)], ids=["brighter", "darker"])
def test_spo_on_sd3_starts_at_log_2_and_learns_a_fixed_preference(scorer, sign: float, tiny_sd3_path: Path,  # noqa: ANN001
                                                                     prompts_file: Path, tmp_path: Path) -> None:
    """From log 2 at the first step to images that move the way the scorer prefers: the same
    noise through the policy and through the reference (adapters off) gives brighter images
    under a brightness scorer, darker ones under its negative."""
    config = _config(tiny_sd3_path, prompts_file, "train.rounds=10", "train.prompts_per_round=4",
                     "sampling.num_inference_steps=10", "train.batch_size=16", "optimizer.lr=3e-3",
                     "logging.checkpoint_every=100")
    trainer = SPOTrainer(config, tmp_path / "run", scorer=scorer, progress=False)
    assert isinstance(trainer.schedule, FlowSDESchedule)
    trainer.train()
    steps = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if m["type"] == "step"]
    assert steps[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)
    assert steps[0]["ratio_win"] == 1.0 and steps[0]["ratio_lose"] == 1.0
    backbone = trainer.backbone
    prompts = ["a red square", "a big purple circle", "three green cats", "a blue dog", "an orange tree", "two stars"] * 4
    with torch.no_grad():
        policy = backbone.decode(ddim_sample(backbone, prompts, num_inference_steps=10, guidance_scale=4.5, eta=0.7,
                                             generator=torch.Generator().manual_seed(7)))
        with backbone.reference_model():
            reference = backbone.decode(ddim_sample(backbone, prompts, num_inference_steps=10, guidance_scale=4.5,
                                                    eta=0.7, generator=torch.Generator().manual_seed(7)))
    moved = sign * (policy.mean(dim=(1, 2, 3)) - reference.mean(dim=(1, 2, 3)))
    assert float((moved > 0).float().mean()) >= 0.9, moved
    assert float(moved.mean()) > 3 * float(moved.std()) / len(moved) ** 0.5, moved


def test_sd3_resume_is_exact_and_the_lora_loads_in_diffusers(tiny_sd3_path: Path, prompts_file: Path,
                                                               tmp_path: Path) -> None:
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    SPOTrainer(_config(tiny_sd3_path, prompts_file), tmp_path / "whole", scorer=brightness, progress=False).train()
    SPOTrainer(_config(tiny_sd3_path, prompts_file), tmp_path / "cut", scorer=brightness, progress=False).train(stop_after=1)
    trainer = SPOTrainer(_config(tiny_sd3_path, prompts_file), tmp_path / "cut", scorer=brightness, resume=True,
                         progress=False)
    trainer.train()
    whole = load_file(str(tmp_path / "whole" / "lora" / "pytorch_lora_weights.safetensors"))
    cut = load_file(str(tmp_path / "cut" / "lora" / "pytorch_lora_weights.safetensors"))
    assert whole.keys() == cut.keys() and all(k.startswith("transformer.") for k in whole)
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    assert any(float(v.abs().max()) > 0 for k, v in whole.items() if "lora_B" in k)  # it trained
    # diffusers' own pipeline loads the LoRA and predicts what the trained policy predicts
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_path), text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(str(tmp_path / "cut" / "lora"))
    backbone = trainer.backbone
    cond = backbone.encode_prompts(["a red circle"], with_negative=False)
    x = torch.randn(1, *backbone.latent_shape, generator=torch.Generator().manual_seed(0))
    t = backbone.schedule(6).timesteps[2]
    with torch.no_grad():
        ours = backbone.predict(x, t, cond, 1.0)
        theirs = pipe.transformer(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=cond.prompt_embeds,
                                  pooled_projections=cond.pooled, return_dict=False)[0]
        with backbone.reference_model():
            base = backbone.predict(x, t, cond, 1.0)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, base, atol=1e-6)  # the reference (adapters off) differs


def test_spm_training_noises_the_flow_way(tiny_sd3_path: Path, tiny_clip_path: Path, pickapic_path: Path,
                                          tmp_path: Path) -> None:
    """`spo train-spm` on a flow backbone: x_t = (1 - s) x0 + s eps and x0-hat = x - s v."""
    from spo.training.spm_trainer import SPMTrainer, noised_x0_images

    config = load_config("sd3", [
        f"model.pretrained={tiny_sd3_path}", "model.resolution=32", "model.device=cpu",
        f"preference.pretrained={tiny_clip_path}", f"preference.processor={tiny_clip_path}",
        "preference.variant=step_aware", f"spm.data={pickapic_path}", "spm.steps=2", "spm.batch_size=4",
        "spm.validate_every=100", "spm.validation_pairs=8", "spm.validation_timesteps=[100,900]",
        "logging.tensorboard=false",
    ])
    trainer = SPMTrainer(config, tmp_path / "spm", progress=False)
    result = trainer.train()
    assert result.steps == 2 and set(result.validation) == {100, 900}
    backbone = trainer.backbone
    images = torch.rand(1, 2, 3, 32, 32) * 2 - 1
    cond = backbone.encode_prompts(["a cat"], with_negative=True)
    noise = torch.randn(1, *backbone.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1000.0 * 0.999])  # s ~ 1: x0-hat = x - s v from nearly pure noise
    got = noised_x0_images(backbone, images, cond, t, noise, 1.0, torch.Generator().manual_seed(1))
    latents = backbone.encode_images(images.flatten(0, 1), torch.Generator().manual_seed(1))
    x_t = 0.001 * latents.float() + 0.999 * noise.repeat(2, 1, 1, 1)
    v = backbone.predict(x_t, t.repeat(2), cond.repeat_interleave(2), 1.0)
    expected = backbone.decode(x_t - 0.999 * v).view(1, 2, 3, 32, 32)
    assert torch.allclose(got, expected, atol=1e-4)


def test_mspo_on_sd3_starts_at_log_2(tiny_sd3_path: Path, prompts_file: Path, tmp_path: Path) -> None:
    """MSPO (each branch runs j - 1 more SDE steps before scoring) on the flow model, unchanged."""
    config = _config(tiny_sd3_path, prompts_file, "train.rounds=1", "pools.inner_steps=2", "pools.k=2")
    trainer = SPOTrainer(config, tmp_path / "run", scorer=brightness, progress=False)
    rollout = trainer.method.sampler.rollout(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
    records = rollout.records
    shared = int(records.shared_x_t.sum())  # the branching transitions; the inner ones start from the branch
    assert 0 < shared < len(records), (shared, len(records))
    trainer.train()
    steps = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if m["type"] == "step"]
    assert steps and steps[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)
