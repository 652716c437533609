"""`spo train-spm` with preference.kind=latent: training LPO's latent reward model (LRM) on VAE
latents noised at the sampling schedule's timesteps (the LRM release's recipe), its draws, its
resume, its saved directory, and the release's pseudo-preference filter."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spo.config import ConfigError, load_config
from spo.data.pickapic import pseudo_preference_filter
from spo.preference.latent import LatentRewardModel, load_latent_reward_model
from spo.training.spm_trainer import SPMTrainer, pair_noise_rows

#: the 20-step DDIM timesteps of SD's schedule up to 451 (spm.max_timestep=500)
SAMPLING_UP_TO_500 = list(range(1, 452, 50))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # noqa: ANN202
    """These tiny models run as fast on one thread, and many times faster than on two when other
    jobs share the CPU (threads waiting on each other); the session's setting is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _deterministic_vae_copy(source: Path, target: Path) -> Path:
    """The tiny pipeline with a VAE whose posterior is (near) a point and whose latents have about
    unit spread (the random tiny VAE's are ~0.04 of its sampling noise): a preference in the images
    reaches the latents, as with a real VAE."""
    from diffusers import AutoencoderKL

    shutil.copytree(source, target)
    vae = AutoencoderKL.from_pretrained(target / "vae")
    with torch.no_grad():
        half = vae.quant_conv.out_channels // 2
        vae.quant_conv.weight[half:] = 0.0
        vae.quant_conv.bias[half:] = -30.0  # log-variance: std 3e-7
    vae.register_to_config(scaling_factor=25.0)
    vae.save_pretrained(target / "vae")
    return target


@pytest.fixture(scope="module")
def det_sd15(tiny_sd15_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _deterministic_vae_copy(tiny_sd15_path, tmp_path_factory.mktemp("det") / "sd15")


@pytest.fixture(scope="module")
def det_sdxl(tiny_sdxl_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _deterministic_vae_copy(tiny_sdxl_path, tmp_path_factory.mktemp("det") / "sdxl")


def _png(rng: np.random.Generator, red: bool, size: int = 32) -> bytes:
    pixels = np.clip(rng.normal(0.4, 0.1, size=(size, size, 3)), 0, 1)
    pixels[..., 0 if red else 2] = np.clip(pixels[..., 0 if red else 2] + 0.5, 0, 1)
    buffer = io.BytesIO()
    Image.fromarray((pixels * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _colour_rows(n: int, seed: int, identical: bool = False) -> dict[str, list]:
    """Pairs of a reddish and a bluish image, the red one preferred, in random order
    (``identical``: both images of a pair are the same one, still labelled decided)."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    for i in range(n):
        red_first = bool(rng.integers(0, 2))
        first = _png(rng, red_first)
        rows["caption"].append(["a cat", "a dog", "a tree", "a car"][i % 4])
        rows["jpg_0"].append(first)
        rows["jpg_1"].append(first if identical else _png(rng, not red_first))
        rows["label_0"].append(float(red_first))
        rows["label_1"].append(float(not red_first))
    return rows


def _save_pairs(directory: Path, train: int, validation: int, identical: bool = False) -> Path:
    import datasets

    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(_colour_rows(train, 0, identical)),
        "validation_unique": datasets.Dataset.from_dict(_colour_rows(validation, 1, identical)),
    }).save_to_disk(str(directory))
    return directory


@pytest.fixture(scope="module")
def colour_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_pairs(tmp_path_factory.mktemp("colour") / "data", train=24, validation=16)


def _overrides(model: Path, data: Path, *extra: str) -> list[str]:
    return [
        f"model.pretrained={model}", "model.resolution=32", "model.device=cpu", "model.dtype=float32",
        "preference.kind=latent", f"preference.pretrained={model}", "preference.checkpoint=null",
        "preference.processor=null", "preference.text_projection=null", "preference.dtype=float32",
        f"spm.data={data}", "spm.steps=3", "spm.lr=1e-3", "spm.batch_size=4", "spm.validation_pairs=4",
        "spm.validation_timesteps=[1]", "spm.validate_every=1000", "spm.checkpoint_every=1000",
        "spm.weight_decay=0", "spm.lr_schedule=constant", "spm.mixed_precision=no", "spm.validate_on_start=false",
        "spm.validation_ties=skip", "logging.tensorboard=false", "seed=0", *extra,
    ]


def _config(model: Path, data: Path, *extra: str, preset: str = "sd15"):  # noqa: ANN202
    # the SDXL preset's fp16-fix VAE and PickScore relabelling are not the tiny world's
    own_vae = ("model.vae=null", "spm.relabel=null") if preset == "sdxl" else ()
    return load_config(preset, _overrides(model, data, *own_vae, *extra))


def _losses(run: Path) -> list[float]:
    return [e["loss"] for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["type"] == "step"]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_lrm_trains_saves_and_reloads(family: str, det_sd15: Path, det_sdxl: Path, tmp_path: Path) -> None:
    """On pairs of one image twice: with one noise per pair both images score alike (loss log 2
    at any weights), with one noise per image they do not; t comes from the DDIM timesteps up to
    spm.max_timestep, one per pair; the saved LRM directory scores as the trained model."""
    model = det_sd15 if family == "sd15" else det_sdxl
    data = _save_pairs(tmp_path / "same", train=8, validation=4, identical=True)
    config = _config(model, data, "spm.max_timestep=500", preset=family)
    trainer = SPMTrainer(config, tmp_path / "run", progress=False)
    assert (trainer.timestep_mode, trainer.pair_noise) == ("sampling", "independent")  # auto, for an LRM
    assert trainer.candidate_timesteps.tolist() == SAMPLING_UP_TO_500
    trained = dict(trainer.trainable)
    assert any(n.startswith("unet.down_blocks.") for n in trained) and any(n.startswith("text_encoder.") for n in trained)
    assert {"logit_scale", "visual_projection.weight"} <= set(trained)
    assert not any(n.startswith(("unet.up_blocks.", "unet.conv_out.")) for n in trained)  # never reached: frozen
    assert not any(p is q for p in trainer.params for q in trainer.backbone.vae.parameters())

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    score = trainer.spm.score
    trainer.spm.score = lambda latents, prompts, t: (seen.append((latents.detach(), t.detach())), score(latents, prompts, t))[1]
    trainer.pair_noise = "shared"
    first = trainer.train_step()
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # both images of each pair alike
    x_t, t = seen[-1]
    assert torch.equal(t[0::2], t[1::2]) and set(t.tolist()) <= set(SAMPLING_UP_TO_500)
    torch.testing.assert_close(x_t[0::2], x_t[1::2], rtol=0, atol=1e-4)
    trainer.pair_noise = "independent"
    second = trainer.train_step()
    x_t, t = seen[-1]
    assert torch.equal(t[0::2], t[1::2]) and set(t.tolist()) <= set(SAMPLING_UP_TO_500)
    assert float((x_t[0::2] - x_t[1::2]).abs().amax(dim=(1, 2, 3)).min()) > 1e-2  # each image its own noise
    assert abs(second["loss"] - math.log(2)) > 1e-3

    result = trainer.train()
    assert result.model == "lrm" and result.spm_path == tmp_path / "run" / "lrm" and result.steps == 3
    assert (result.spm_path / "lrm.safetensors").is_file() and (result.spm_path / "unet").is_dir()
    card = (result.spm_path / "README.md").read_text()
    assert "Latent reward model" in card and "preference.kind=latent" in card
    reload_config = _config(model, data, f"preference.pretrained={result.spm_path}", preset=family)
    reloaded = load_latent_reward_model(reload_config, "cpu", dtype=torch.float32)
    latents = torch.randn(3, *trainer.backbone.latent_shape, generator=torch.Generator().manual_seed(0))
    prompts, ts = ["a cat", "a dog", "a tree"], torch.tensor([1, 451, 951])
    torch.testing.assert_close(reloaded(latents, prompts, ts), trainer.spm(latents, prompts, ts), rtol=1e-5, atol=1e-5)


def test_lrm_learns_a_fixed_preference(det_sd15: Path, colour_pairs: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The label favours the redder image: validation pair accuracy rises above chance within a
    few steps of `spo train-spm` (which validates before and after)."""
    from spo.cli import main

    run = tmp_path / "run"
    args = ["train-spm", "sd15", "--output", str(run),
            *_overrides(det_sd15, colour_pairs, "spm.steps=5", "spm.batch_size=8", "spm.validation_pairs=16",
                        "spm.validation_timesteps=[1,251]", "spm.max_timestep=251")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"preference.kind=latent preference.pretrained={run / 'lrm'}" in out
    checks = [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["type"] == "validation"]
    before, after = checks[0], checks[-1]
    assert (before["step"], after["step"]) == (0, 5)
    for t in (1, 251):
        assert after[f"accuracy_t{t}"] >= 0.8 and after[f"accuracy_t{t}"] > before[f"accuracy_t{t}"], (before, after)
    assert (run / "lrm" / "README.md").is_file()


def test_lrm_resume_is_exact(tiny_sd15_path: Path, pickapic_path: Path, tmp_path: Path) -> None:
    config = _config(tiny_sd15_path, pickapic_path, "spm.steps=4", "spm.checkpoint_every=2", "spm.batch_size=2",
                     "spm.validation_pairs=2", "spm.lr_schedule=warmup_decay", "spm.warmup_steps=3",
                     "spm.weight_decay=0.3")
    SPMTrainer(config, tmp_path / "full", progress=False).train()
    SPMTrainer(config, tmp_path / "cut", progress=False).train(stop_after=3)
    resumed = SPMTrainer(config, tmp_path / "cut", resume=True, progress=False)
    assert resumed.step == 2
    resumed.train()
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full") and len(_losses(tmp_path / "full")) == 4
    from safetensors.torch import load_file

    for name in ("lrm.safetensors", "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(str(tmp_path / "full" / "lrm" / name)), load_file(str(tmp_path / "cut" / "lrm" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    full = LatentRewardModel.from_pretrained(str(tmp_path / "full" / "lrm"))
    assert not torch.equal(full.unet.conv_in.weight, LatentRewardModel.from_pretrained(str(tiny_sd15_path)).unet.conv_in.weight)


#: (different_flag, aesthetic_gap, clipscore_gap, vqascore_gap) and the strategies that keep the row
PSEUDO_ROWS = [
    ((1, 0.3, 0.01, 0.02), {1, 2, 3}),
    ((1, -0.2, 0.01, 0.02), {2, 3}),
    ((1, -0.7, 0.01, 0.02), {3}),
    ((1, -1.5, 0.01, 0.02), set()),
    ((1, 0.3, 0.0, 0.02), set()),       # CLIP-score gap must be > 0
    ((1, 0.3, 0.01, -0.1), set()),      # VQA-score gap must be > 0
    ((0, 0.1, 0.02, 0.05), {1, 2, 3}),  # a tie with small gaps
    ((0, 0.3, 0.02, 0.05), set()),      # aesthetic gap too large for a tie
    ((0, 0.1, 0.05, 0.05), set()),
    ((0, 0.1, 0.02, 0.09), set()),
    ((0, -2.0, -1.0, -1.0), {1, 2, 3}),  # the tie rule bounds the gaps from above only
    ((1, float("nan"), 0.01, 0.02), set()),
]


def _pseudo_csv(path: Path, rows: list[tuple], columns: tuple[str, ...] = ("different_flag", "aesthetic_gap",
                                                                           "clipscore_gap", "vqascore_gap")) -> Path:
    lines = [",".join(("", *columns))]  # with pandas' index column, as to_csv writes it
    lines += [",".join([str(i), *("" if isinstance(v, float) and math.isnan(v) else str(v) for v in row[:len(columns)])])
              for i, row in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_pseudo_preference_filter_keeps_the_strategy_rows(tiny_sd15_path: Path, tmp_path: Path) -> None:
    rows = PSEUDO_ROWS * 2  # 24 rows: the training split of the colour pairs
    csv = _pseudo_csv(tmp_path / "pseudo.csv", [r for r, _ in rows])
    for strategy in (1, 2, 3):
        kept = pseudo_preference_filter(str(csv), strategy)
        assert [i for i, k in enumerate(kept) if k] == [i for i, (_, keep) in enumerate(rows) if strategy in keep]
    data = _save_pairs(tmp_path / "data", train=24, validation=4)
    trainer = SPMTrainer(_config(tiny_sd15_path, data, f"spm.pseudo_preference={csv}", "spm.filter_strategy=2"),
                         tmp_path / "run", progress=False)
    expected = [0, 1, 6, 10, 12, 13, 18, 22]
    assert trainer.train_rows == expected == [i for i, (_, keep) in enumerate(rows) if 2 in keep]
    assert sorted(trainer._row_at(p) for p in range(len(expected))) == expected  # the epoch draws only these
    assert len(trainer.val_rows) == 4  # validation untouched


def test_bad_pseudo_preference_file_exits_2(tiny_sd15_path: Path, colour_pairs: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from spo.cli import main

    rows = [r for r, _ in PSEUDO_ROWS]
    files = {
        "rows": (_pseudo_csv(tmp_path / "short.csv", rows[:5]), "has 5 rows, the training split 'train'"),
        "column": (_pseudo_csv(tmp_path / "nocol.csv", rows * 2, ("different_flag", "aesthetic_gap", "clipscore_gap")),
                   r"missing columns ['vqascore_gap']"),
        "value": (tmp_path / "text.csv", "line 2: aesthetic_gap is not a number: 'high'"),
        "missing": (tmp_path / "none.csv", "cannot read"),
    }
    (tmp_path / "text.csv").write_text("different_flag,aesthetic_gap,clipscore_gap,vqascore_gap\n1,high,0.1,0.1\n")
    for name, (csv, message) in files.items():
        run = tmp_path / f"run-{name}"
        code = main(["train-spm", "sd15", "--output", str(run),
                     *_overrides(tiny_sd15_path, colour_pairs, f"spm.pseudo_preference={csv}")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, name
        assert len(err) == 1 and err[0].startswith("error: spm.pseudo_preference: ") and message in err[0], err
        assert not run.exists(), name  # nothing written
    with pytest.raises(ConfigError, match="spm.max_timestep must be null"):
        load_config("sd15", ["spm.max_timestep=-1"])


def test_pair_noise_rows() -> None:
    shared, own = torch.randn(3, 4, 2, 2), torch.randn(3, 2, 4, 2, 2)
    assert torch.equal(pair_noise_rows(shared)[0::2], pair_noise_rows(shared)[1::2])
    assert torch.equal(pair_noise_rows(own), own.flatten(0, 1)) and pair_noise_rows(own).shape == (6, 4, 2, 2)


def test_clip_spm_honours_pair_noise_and_sampling_timesteps(tiny_sd15_path: Path, tiny_clip_path: Path,
                                                          pickapic_path: Path, tmp_path: Path) -> None:
    """spm.pair_noise and spm.timesteps mean the same for the SPM (preference.kind=clip): each image
    noised with its own noise, t from the DDIM timesteps up to spm.max_timestep, one per pair."""
    config = load_config("sd15", [
        f"model.pretrained={tiny_sd15_path}", "model.resolution=32", "model.device=cpu", "model.dtype=float32",
        f"preference.pretrained={tiny_clip_path}", "preference.checkpoint=null", f"spm.data={pickapic_path}",
        "spm.steps=1", "spm.batch_size=3", "spm.mixed_precision=no", "logging.tensorboard=false",
        "spm.pair_noise=independent", "spm.timesteps=sampling", "spm.max_timestep=500"])
    trainer = SPMTrainer(config, tmp_path / "run", progress=False)
    assert trainer.candidate_timesteps.tolist() == SAMPLING_UP_TO_500
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    trainer.backbone.unet.register_forward_hook(lambda m, a, o: seen.append((a[0].detach(), a[1].detach())))
    trainer.train_step()
    pairs, _, _ = trainer._micro_batch(0, 0)  # (a corrupt row may leave fewer than 3)
    n = 2 * len(pairs)
    x_t, t = seen[0][0][n:], seen[0][1][n:]  # the conditional half of the CFG batch
    assert torch.equal(t[0::2], t[1::2]) and set(t.tolist()) <= set(SAMPLING_UP_TO_500)
    # the step's draws again, in the trainer's order (t, noise, the VAE posterior): x_t - sqrt(abar) z
    # is each image's own noise, so the two noises of a pair differ
    from spo.training.seeding import generator

    gen = generator(trainer.config.seed, "spm-step", 0, 0, 0)
    assert torch.equal(trainer._training_timesteps(len(pairs), gen).repeat_interleave(2), t)
    noise = trainer._noise(len(pairs), gen)
    assert noise.shape == (len(pairs), 2, *trainer.backbone.latent_shape)
    assert float((noise[:, 0] - noise[:, 1]).abs().max()) > 0.5
    z = trainer._encode_pairs(torch.stack([p["images"] for p in pairs]), gen)
    abar = trainer.backbone.schedule(1).alpha_bar(t.long()).view(-1, 1, 1, 1)
    torch.testing.assert_close((x_t - abar.sqrt() * z) / (1 - abar).sqrt(), noise.flatten(0, 1), rtol=1e-3, atol=1e-3)


def test_toy_references_of_the_lrm_are_resolved() -> None:
    from spo.builtin import resolve_references, resolve_weights

    config = load_config("toy", ["preference.checkpoint=toy:spm", "preference.text_projection=toy:clip"])
    resolved = resolve_references(config).preference
    assert (resolved.checkpoint, resolved.text_projection) == (resolve_weights("toy:spm"), resolve_weights("toy:clip"))
    assert resolve_references(load_config("toy", ["preference.text_projection=null"])).preference.text_projection is None
