"""The step-aware preference model: identity init, release checkpoints, scoring, SPM training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spo.config import load_config
from spo.data import PreferenceDataError, load_preference_split
from spo.errors import ModelLoadError
from spo.preference import (
    CLIPScorer,
    StepAwarePreferenceModel,
    clip_preprocess,
    pair_accuracy,
    spm_preprocess,
    preference_pair_loss,
    timestep_embedding,
)
from spo.training.spm_trainer import SPMTrainer, noised_x0_images

PROMPTS = ["a red circle", "a blue square", "two green stars"]


def _images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 40, 48, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _perturb(spm: StepAwarePreferenceModel, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in spm.named_parameters():
            if "adaLN" in name or "t_embedder" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("variant", ["step_aware", "step_agnostic", "clean"])
def test_identity_init_equals_the_base_clip(tiny_clip_path: Path, variant: str) -> None:
    base = CLIPScorer.from_pretrained(str(tiny_clip_path), preprocessing="release")  # the SPM's image path
    spm = StepAwarePreferenceModel.from_pretrained(str(tiny_clip_path), variant=variant)  # type: ignore[arg-type]
    images = _images()
    expected = base(images, PROMPTS)
    for t in [0, 1, 251, 501, 999]:
        torch.testing.assert_close(spm(images, PROMPTS, torch.full((3,), t)), expected, rtol=1e-5, atol=1e-5)
    width = spm.model.config.vision_config.hidden_size
    bias = spm.model.vision_model.encoder.layers[0].adaLN_modulation[1].bias
    assert bias[:2 * width].abs().max() == 0 and bool((bias[2 * width:3 * width] == 1).all())
    assert bias[3 * width:5 * width].abs().max() == 0 and bool((bias[5 * width:] == 1).all())


def test_variants_after_training_the_time_modules(tiny_clip_path: Path) -> None:
    images = _images()
    aware = StepAwarePreferenceModel.from_pretrained(str(tiny_clip_path))
    _perturb(aware)
    s0, s9 = aware(images, PROMPTS, torch.zeros(3)), aware(images, PROMPTS, torch.full((3,), 900))
    assert float((s0 - s9).abs().max()) > 1e-3  # step-aware: the score depends on t
    agnostic = StepAwarePreferenceModel.from_pretrained(str(tiny_clip_path), variant="step_agnostic")
    agnostic.load_state_dict(aware.state_dict())
    torch.testing.assert_close(agnostic(images, PROMPTS, torch.zeros(3)), agnostic(images, PROMPTS, torch.full((3,), 900)))
    torch.testing.assert_close(agnostic(images, PROMPTS, torch.full((3,), 700)), s0)  # = t fixed at 0
    clean = StepAwarePreferenceModel.from_pretrained(str(tiny_clip_path), variant="clean")
    clean.load_state_dict(aware.state_dict())
    base = CLIPScorer.from_pretrained(str(tiny_clip_path), preprocessing="release")
    torch.testing.assert_close(clean(images, PROMPTS, torch.zeros(3)), base(images, PROMPTS))


def test_modulation_chunk_order(tiny_clip_path: Path) -> None:
    """Release order: (shift, scale, gate) for attention, then for the MLP. Zeroing only chunk 2
    (the attention gate) must remove every attention branch: compare with a hand-written forward
    of the base CLIP without attention; then scale chunk 4 (MLP scale) only."""
    base = CLIPScorer.from_pretrained(str(tiny_clip_path))
    spm = StepAwarePreferenceModel.from_pretrained(str(tiny_clip_path))
    width = spm.model.config.vision_config.hidden_size
    with torch.no_grad():
        for layer in spm.model.vision_model.encoder.layers:
            layer.adaLN_modulation[1].bias[2 * width : 3 * width] = 0.0
    images = _images()
    vision = base.model.vision_model
    pixels = spm_preprocess(images, base.size, base.mean, base.std)
    with torch.no_grad():
        h = vision.pre_layrnorm(vision.embeddings(pixels))
        for layer in vision.encoder.layers:
            h = h + layer.mlp(layer.layer_norm2(h))  # no attention branch
        emb = base.model.visual_projection(vision.post_layernorm(h[:, 0]))
        emb = emb / emb.norm(dim=-1, keepdim=True)
        txt = base.text_embeddings(PROMPTS)
        expected = base.model.logit_scale.exp() * (emb * txt).sum(-1)
    torch.testing.assert_close(spm(images, PROMPTS, torch.full((3,), 500)), expected, rtol=1e-4, atol=1e-4)
    spm2 = StepAwarePreferenceModel.from_pretrained(str(tiny_clip_path))
    with torch.no_grad():
        for layer in spm2.model.vision_model.encoder.layers:
            layer.adaLN_modulation[1].bias[4 * width : 5 * width] = 1.0  # MLP LayerNorm output x 2
        h = vision.pre_layrnorm(vision.embeddings(pixels))
        for layer in vision.encoder.layers:
            h = h + layer.self_attn(hidden_states=layer.layer_norm1(h))[0]
            h = h + layer.mlp(layer.layer_norm2(h) * 2.0)
        emb = base.model.visual_projection(vision.post_layernorm(h[:, 0]))
        emb = emb / emb.norm(dim=-1, keepdim=True)
        expected = base.model.logit_scale.exp() * (emb * txt).sum(-1)
    torch.testing.assert_close(spm2(images, PROMPTS, torch.zeros(3)), expected, rtol=1e-4, atol=1e-4)


def test_timestep_embedding_closed_form() -> None:
    t = torch.tensor([0.0, 10.0, 999.0])
    emb = timestep_embedding(t, 8)
    freqs = [math.exp(-math.log(10_000) * i / 4) for i in range(4)]
    expected = [[math.cos(v * f) for f in freqs] + [math.sin(v * f) for f in freqs] for v in t.tolist()]
    torch.testing.assert_close(emb, torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_release_checkpoint_layout_loads_and_reproduces(tiny_clip_path: Path, tmp_path: Path) -> None:
    trained = StepAwarePreferenceModel.from_pretrained(str(tiny_clip_path))
    _perturb(trained)
    with torch.no_grad():
        trained.model.visual_projection.weight.mul_(1.1)
    state = trained.state_dict()
    layers = len(trained.model.vision_model.encoder.layers)
    keys = set(state)
    assert {"model.t_embedder.mlp.0.weight", "model.t_embedder.mlp.2.bias",
            "model.vision_model.adaLN_modulation.1.weight", "model.logit_scale",
            "model.visual_projection.weight"} <= keys
    assert all(f"model.vision_model.encoder.layers.{i}.adaLN_modulation.1.bias" in keys for i in range(layers))
    # a release .bin (as saved by an older transformers, with position_ids buffers)
    release = {**state, "model.text_model.embeddings.position_ids": torch.arange(77)[None]}
    torch.save(release, tmp_path / "spm.bin")
    loaded = StepAwarePreferenceModel.from_pretrained(str(tiny_clip_path), checkpoint=str(tmp_path / "spm.bin"))
    images, t = _images(), torch.tensor([0, 400, 900])
    torch.testing.assert_close(loaded(images, PROMPTS, t), trained(images, PROMPTS, t))
    # and through the config, as `spo train` builds its scorer
    from spo.training import build_scorer

    config = load_config("sd15", [f"preference.pretrained={tiny_clip_path}", f"preference.checkpoint={tmp_path / 'spm.bin'}"])
    torch.testing.assert_close(build_scorer(config, torch.device("cpu"))(images, PROMPTS, t), trained(images, PROMPTS, t))
    # a state dict that does not fit names the keys
    broken = {k: v for k, v in state.items() if "adaLN" not in k}
    broken["model.extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.bin")
    with pytest.raises(ModelLoadError, match="missing keys.*adaLN.*unexpected keys.*model.extra.weight"):
        StepAwarePreferenceModel.from_pretrained(str(tiny_clip_path), checkpoint=str(tmp_path / "broken.bin"))
    with pytest.raises(ModelLoadError, match="no such file"):
        StepAwarePreferenceModel.from_pretrained(str(tiny_clip_path), checkpoint=str(tmp_path / "none.bin"))


def test_pickled_code_is_refused(tiny_clip_path: Path, tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (print, ("pwned",))

    torch.save({"model.logit_scale": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(ModelLoadError, match="only tensors are read, never pickled code"):
        StepAwarePreferenceModel.from_pretrained(str(tiny_clip_path), checkpoint=str(tmp_path / "evil.bin"))


def test_own_format_round_trip(tiny_clip_path: Path, tmp_path: Path) -> None:
    spm = StepAwarePreferenceModel.from_pretrained(str(tiny_clip_path))
    _perturb(spm)
    spm.save(tmp_path / "spm")
    again = StepAwarePreferenceModel.from_pretrained(str(tmp_path / "spm"))
    images, t = _images(), torch.tensor([5, 505, 905])
    torch.testing.assert_close(again(images, PROMPTS, t), spm(images, PROMPTS, t))
    half = StepAwarePreferenceModel.from_pretrained(str(tmp_path / "spm"), dtype=torch.bfloat16)
    assert half.model.dtype == torch.bfloat16
    torch.testing.assert_close(half(images, PROMPTS, t), spm(images, PROMPTS, t), rtol=0.05, atol=0.3)


def test_preprocessing_matches_clip_image_processor() -> None:
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    rng = np.random.default_rng(0)
    smooth = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
    pil = Image.fromarray(smooth).resize((80, 60), Image.BILINEAR)
    reference = torch.as_tensor(np.array(processor(images=pil, return_tensors="np")["pixel_values"]))
    x = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    ours = clip_preprocess(x, 32, processor.image_mean, processor.image_std)
    assert ours.shape == reference.shape
    # PIL's and torch's bicubic resampling differ slightly (and PIL rounds to uint8); normalisation,
    # short-side resize and centre crop must agree: near-perfect correlation, small mean error
    corr = torch.corrcoef(torch.stack([ours.flatten(), reference.flatten().float()]))[0, 1]
    assert float(corr) > 0.98 and float((ours - reference).abs().mean()) < 0.15
    flipped = clip_preprocess(x.flip(-1), 32, processor.image_mean, processor.image_std)
    assert float(torch.corrcoef(torch.stack([flipped.flatten(), reference.flatten().float()]))[0, 1]) < 0.9


def test_text_cache_and_gradients(tiny_clip_path: Path) -> None:
    spm = StepAwarePreferenceModel.from_pretrained(str(tiny_clip_path))
    spm.model.requires_grad_(True)
    images = _images()
    spm(images, PROMPTS, torch.zeros(3))
    assert set(spm._text_cache) == set(PROMPTS)
    spm.score(images, PROMPTS, torch.zeros(3)).sum().backward()
    assert spm.model.text_model.embeddings.token_embedding.weight.grad is not None
    assert spm.model.vision_model.encoder.layers[0].adaLN_modulation[1].weight.grad.abs().max() > 0


def test_loss_matches_hand_computation() -> None:
    s0 = torch.tensor([2.0, 0.5, 1.0, -1.0], dtype=torch.float64)
    s1 = torch.tensor([1.0, 0.5, 3.0, 0.0], dtype=torch.float64)
    labels = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    weights = torch.tensor([1.0, 0.5, 0.5, 1 / 3], dtype=torch.float64)
    expected, total = 0.0, 0.0
    for a, b, (y0, y1), w in zip(s0.tolist(), s1.tolist(), labels.tolist(), weights.tolist()):
        p0 = math.exp(a) / (math.exp(a) + math.exp(b))
        ce = -(y0 * math.log(p0) + y1 * math.log(1 - p0))
        if y0 == y1:
            ce += math.log(0.5)
        expected += w * ce
        total += w
    assert float(preference_pair_loss(s0, s1, labels, weights)) == pytest.approx(expected / total, rel=1e-12)
    # a perfect tie costs nothing
    assert float(preference_pair_loss(s0[1:2], s1[1:2], labels[1:2])) == pytest.approx(0.0, abs=1e-12)
    assert pair_accuracy(s0, s1, labels) == (2, 2)


def test_noising_path_shares_t_and_noise_within_a_pair(tiny_sd15_path: Path) -> None:
    from spo.backbones import SD15Backbone

    backbone = SD15Backbone.from_pretrained(str(tiny_sd15_path), device="cpu")
    seen: list[torch.Tensor] = []
    backbone.unet.register_forward_hook(lambda m, a, o: seen.append(torch.stack([a[0], a[1].float()[:, None, None, None].expand_as(a[0])])))
    images = torch.rand(2, 2, 3, 32, 32) * 2 - 1
    cond = backbone.encode_prompts(["a", "b"])
    t, noise = torch.tensor([700, 300]), torch.randn(2, 4, 16, 16)
    out = noised_x0_images(backbone, images, cond, t, noise, 5.0, torch.Generator().manual_seed(0))
    x_t, t_rows = seen[0][0][4:], seen[0][1][4:, 0, 0, 0]  # conditional half of the CFG batch
    assert t_rows.tolist() == [700, 700, 300, 300]
    abar = backbone.schedule(1).alphas_cumprod[700]
    z = backbone.encode_images(images[0], generator=torch.Generator().manual_seed(0))
    # the noise cancels in the difference: x_t^0 - x_t^1 = sqrt(abar) (z^0 - z^1)
    torch.testing.assert_close(x_t[0] - x_t[1], abar.sqrt() * (z[0] - z[1]), rtol=1e-4, atol=1e-4)
    assert out.shape == (2, 2, 3, 32, 32)


def _spm_config(model: Path, clip: Path, data: Path, *overrides: str):  # noqa: ANN202
    return load_config("sd15", [
        f"model.pretrained={model}", "model.resolution=32", "model.device=cpu", "model.dtype=float32",
        f"preference.pretrained={clip}", "preference.checkpoint=null", f"spm.data={data}", "spm.steps=40", "spm.lr=1e-3", "spm.batch_size=8",
        "spm.validate_every=1000", "spm.checkpoint_every=1000", "logging.tensorboard=false",
        "spm.weight_decay=0", "spm.lr_schedule=constant", "spm.mixed_precision=no", "spm.validate_on_start=false",
        "spm.validation_ties=skip", "seed=0",
        *overrides,
    ])


def test_training_raises_validation_accuracy(tiny_sd15_fitted_vae_path: Path, tiny_clip_path: Path,
                                             pickapic_path: Path, tmp_path: Path) -> None:
    trainer = SPMTrainer(_spm_config(tiny_sd15_fitted_vae_path, tiny_clip_path, pickapic_path), tmp_path / "run", progress=False)
    before = trainer.validate()
    result = trainer.train()
    after = result.validation
    low = [0, 251]
    assert sum(after[t] for t in low) / 2 > 0.7, (before, after)
    assert sum(after[t] for t in low) > sum(before[t] for t in low) + 0.2
    assert result.skipped_rows > 0  # the corrupt rows were met, skipped and counted
    assert (tmp_path / "run" / "spm" / "spm.safetensors").exists()
    reloaded = StepAwarePreferenceModel.from_pretrained(str(tmp_path / "run" / "spm"))
    images, t = _images(), torch.tensor([0, 251, 501])
    torch.testing.assert_close(reloaded(images, PROMPTS, t), trainer.spm(images, PROMPTS, t), rtol=1e-5, atol=1e-5)


def test_spm_resume_is_exact(tiny_sd15_path: Path, tiny_clip_path: Path, pickapic_path: Path, tmp_path: Path) -> None:
    overrides = ("spm.steps=4", "spm.checkpoint_every=2", "spm.batch_size=4", "spm.validation_pairs=4",
                 "spm.lr_schedule=warmup_decay", "spm.warmup_steps=3", "spm.weight_decay=0.3")  # the schedule resumes too
    config = _spm_config(tiny_sd15_path, tiny_clip_path, pickapic_path, *overrides)
    SPMTrainer(config, tmp_path / "full", progress=False).train()
    SPMTrainer(config, tmp_path / "cut", progress=False).train(stop_after=3)
    resumed = SPMTrainer(config, tmp_path / "cut", resume=True, progress=False)
    assert resumed.step == 2
    resumed.train()
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "spm" / "spm.safetensors"))
    b = load_file(str(tmp_path / "cut" / "spm" / "spm.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_spm_resume_refuses_a_changed_configuration(tiny_sd15_path: Path, tiny_clip_path: Path, pickapic_path: Path,
                                                    tmp_path: Path) -> None:
    """As ``spo train``: a resumed SPM run keeps its configuration (it was not checked before)."""
    from spo.training.checkpoint import CheckpointError

    overrides = ("spm.steps=4", "spm.checkpoint_every=2", "spm.batch_size=4", "spm.validation_pairs=4",
                 "spm.lr_schedule=warmup_decay", "spm.warmup_steps=3")
    SPMTrainer(_spm_config(tiny_sd15_path, tiny_clip_path, pickapic_path, *overrides), tmp_path / "cut",
               progress=False).train(stop_after=3)
    with pytest.raises(CheckpointError, match="spm.lr differ"):
        SPMTrainer(_spm_config(tiny_sd15_path, tiny_clip_path, pickapic_path, *overrides, "spm.lr=5e-4"),
                   tmp_path / "cut", resume=True, progress=False)
    with pytest.raises(CheckpointError, match="reshape the warmup_decay"):
        SPMTrainer(_spm_config(tiny_sd15_path, tiny_clip_path, pickapic_path, *overrides[1:], "spm.steps=6"),
                   tmp_path / "cut", resume=True, progress=False)
    resumed = SPMTrainer(_spm_config(tiny_sd15_path, tiny_clip_path, pickapic_path, *overrides, "logging.log_every=2"),
                         tmp_path / "cut", resume=True, progress=False)  # logging may change
    assert resumed.step == 2


def test_bad_data(tiny_sd15_path: Path, tiny_clip_path: Path, pickapic_path: Path, tmp_path: Path) -> None:
    import datasets

    with pytest.raises(PreferenceDataError, match="no split 'nope'.*train"):
        load_preference_split(str(pickapic_path), "nope")
    broken = datasets.Dataset.from_dict({"caption": ["a"], "jpg_0": [b"x"], "label_0": [1.0]})
    broken.save_to_disk(str(tmp_path / "broken"))
    with pytest.raises(PreferenceDataError, match=r"missing columns \['jpg_1', 'label_1'\]"):
        load_preference_split(str(tmp_path / "broken"), "train")
    empty = datasets.Dataset.from_dict({c: [] for c in ["caption", "jpg_0", "jpg_1", "label_0", "label_1"]})
    empty.save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(PreferenceDataError, match="empty"):
        load_preference_split(str(tmp_path / "empty"), "train")
    # parquet works too; every image corrupt: a clear error, not a crash
    rows = {"caption": ["a", "b"] * 4, "jpg_0": [b"junk"] * 8, "jpg_1": [b"junk"] * 8, "label_0": [1.0] * 8, "label_1": [0.0] * 8}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "junk.parquet"))
    config = _spm_config(tiny_sd15_path, tiny_clip_path, tmp_path / "junk.parquet", "spm.validation_split=null",
                         "spm.steps=2", "spm.batch_size=2")
    trainer = SPMTrainer(config, tmp_path / "run", progress=False)
    with pytest.raises(PreferenceDataError, match="no usable pair"):
        trainer.train()
    with pytest.raises(PreferenceDataError, match="spm.data"):
        SPMTrainer(_spm_config(tiny_sd15_path, tiny_clip_path, tmp_path / "nothing-here"), tmp_path / "run2", progress=False)


def test_cli_train_spm(tiny_sd15_path: Path, tiny_clip_path: Path, pickapic_path: Path, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    from spo.cli import main

    args = ["train-spm", "sd15", "--output", str(tmp_path / "run"), f"model.pretrained={tiny_sd15_path}",
            "model.resolution=32", "model.dtype=float32", "model.device=cpu", f"preference.pretrained={tiny_clip_path}",
            "preference.checkpoint=null",
            f"spm.data={pickapic_path}", "spm.steps=2", "spm.batch_size=4", "spm.validation_pairs=8",
            "spm.validation_timesteps=[0,501]", "logging.tensorboard=false"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "before" in out and "accuracy" in out and "501" in out and "preference.pretrained=" in out


def test_release_recipe_in_the_trainer(tiny_sd15_path: Path, tiny_clip_path: Path, pickapic_path: Path,
                                       tmp_path: Path) -> None:
    """The release's SPM recipe as the trainer runs it: AdamW with spm.weight_decay, DeepSpeed's
    warm-up-then-decay rate per step (the first step at the peak), validation at t = 0 on the
    clean images (no UNet call), relabelled validation labels with ties left out, and the
    relabel rule 'a winner only where the gap exceeds the threshold'."""
    from spo.training.spm_trainer import warmup_decay_factor

    config = _spm_config(tiny_sd15_path, tiny_clip_path, pickapic_path, "spm.steps=3", "spm.batch_size=4",
                         "spm.weight_decay=0.3", "spm.lr_schedule=warmup_decay", "spm.warmup_steps=2",
                         "spm.validation_pairs=8", "spm.validation_timesteps=[0,501]", "spm.validation_ties=auto",
                         "spm.validate_every=1000")
    trainer = SPMTrainer(config, tmp_path / "run", progress=False)
    assert {g["weight_decay"] for g in trainer.optimizer.optimizer.param_groups} == {0.3}
    seen_t: list[float] = []
    trainer.backbone.unet.register_forward_hook(lambda m, a, o: seen_t.extend(a[1].float().reshape(-1).tolist()))
    trainer.validate()
    assert seen_t and set(seen_t) == {501.0}  # t = 0 scored the clean images: no UNet call
    for _ in range(3):
        trainer.train_step()
    lrs = [e["lr"] for e in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
           if e["type"] == "step"]
    assert lrs == pytest.approx([1e-3 * warmup_decay_factor(s, 2, 3) for s in range(3)]) == [1e-3, 0.0, 1e-3]
    # relabelling: equal scores are a tie even at threshold 0 (the release: winner only if gap > threshold)
    trainer.relabeler = lambda images, prompts, t: torch.zeros(images.shape[0])
    trainer.config.spm.relabel, trainer.config.spm.relabel_threshold = "stub", 0.0
    relabelled = trainer._relabel(torch.zeros(2, 2, 3, 32, 32), ["a", "b"], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert relabelled.tolist() == [[0.5, 0.5], [0.5, 0.5]]
    with pytest.raises(PreferenceDataError, match="no usable non-tied pair"):  # validation labels relabelled too
        trainer.validate()


def test_example_weights_use_the_data_set_column_when_present() -> None:
    """The release divides by Pick-a-Pic's num_example_per_prompt column; without it the
    captions of the split are counted."""
    import datasets

    from spo.data import caption_weights

    rows = {"caption": ["a", "a", "b"], "jpg_0": [b""] * 3, "jpg_1": [b""] * 3, "label_0": [1.0] * 3, "label_1": [0.0] * 3}
    assert caption_weights(datasets.Dataset.from_dict(rows)) == [0.5, 0.5, 1.0]
    with_column = datasets.Dataset.from_dict({**rows, "num_example_per_prompt": [4, 4, 0]})
    assert caption_weights(with_column) == [0.25, 0.25, 1.0]  # 0: not usable, counted instead
