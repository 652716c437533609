"""The memory levers that leave a run's numbers as they are: ``PRESET-lowmem`` (any preset with
them), ``model.offload_text_encoders`` (text encoders in host memory between encodes) and
``preference.offload`` (the preference model in host memory outside the sampling phase)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fixed_scorers import brightness
from spo.config import available_presets, config_to_dict, load_config
from spo.config.loading import LOW_MEMORY
from spo.training import SPOTrainer
from spo.training.checkpoint import CheckpointError, latest_checkpoint


@pytest.mark.parametrize("preset", available_presets())
def test_every_preset_has_a_lowmem_form(preset: str) -> None:
    """``NAME-lowmem`` is NAME with exactly the levers changed; overrides still win."""
    base, low = config_to_dict(load_config(preset)), config_to_dict(load_config(f"{preset}-lowmem"))
    for section, values in LOW_MEMORY.items():
        for key, value in values.items():
            assert low[section][key] == value, (section, key)
            base[section][key] = value
    assert low == base
    assert load_config(f"{preset}-lowmem", ["sampling.decode_batch_size=4"]).sampling.decode_batch_size == 4


def _config(tiny_sd15_path: Path, prompts_file: Path, offload: bool):  # noqa: ANN202
    return load_config("sd15", [
        f"model.pretrained={tiny_sd15_path}", "model.resolution=32", "model.device=cpu", "model.dtype=float32",
        "train.mixed_precision=no", f"data.prompts={prompts_file}", "train.rounds=2", "train.prompts_per_round=2",
        "sampling.num_inference_steps=6", "pools.divert_start_step=2", "pools.threshold=0.0",
        "logging.tensorboard=false", f"model.offload_text_encoders={str(offload).lower()}"])


def test_offloaded_text_encoders_move_only_to_encode_and_change_nothing(tiny_sd15_path: Path, prompts_file: Path,
                                                                        tmp_path: Path) -> None:
    plain = SPOTrainer(_config(tiny_sd15_path, prompts_file, False), tmp_path / "plain", scorer=brightness,
                       progress=False)
    plain.train()
    low = SPOTrainer(_config(tiny_sd15_path, prompts_file, True), tmp_path / "low", scorer=brightness, progress=False)
    (encoder,) = low.backbone.text_encoders()
    moves: list[str] = []
    to = encoder.to

    def recorded(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        moves.append(str(args[0] if args else kwargs.get("device")))
        return to(*args, **kwargs)

    encoder.to = recorded
    low.train()
    assert moves and len(moves) % 2 == 0  # in and out, around each uncached encode only
    assert moves[0::2] == [str(low.backbone.device)] * (len(moves) // 2) and set(moves[1::2]) == {"cpu"}
    calls = len(moves)
    low.backbone.encode_prompts(["a red circle"])  # a new prompt list: encoded, moved in and out
    low.backbone.encode_prompts(["a red circle"])  # cached: not moved
    assert len(moves) == calls + 2
    a, b = plain.backbone.unet.state_dict(), low.backbone.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same embeddings: the same training


def test_lowmem_trains_what_the_preset_trains(tiny_sd15_path: Path, prompts_file: Path, tmp_path: Path) -> None:
    """``sd15-lowmem`` (x0-hats decoded one at a time, gradient checkpointing, offloaded text
    encoders) ends 2 rounds with the same LoRA as ``sd15``, bit for bit, on this CPU (a GPU's
    kernels may round differently at another batch size)."""
    weights = {}
    for preset in ("sd15", "sd15-lowmem"):
        config = load_config(preset, [
            f"model.pretrained={tiny_sd15_path}", "model.resolution=32", "model.device=cpu", "model.dtype=float32",
            "train.mixed_precision=no", f"data.prompts={prompts_file}", "train.rounds=2", "train.prompts_per_round=2",
            "sampling.num_inference_steps=6", "pools.divert_start_step=2", "pools.threshold=0.0",
            "logging.tensorboard=false", "optimizer.lr=1e-3"])
        trainer = SPOTrainer(config, tmp_path / preset, scorer=brightness, progress=False)
        low = preset.endswith("-lowmem")
        assert trainer.backbone.unet.is_gradient_checkpointing == low  # the levers really are on
        assert getattr(trainer.backbone, "_offload_text", False) == low
        trainer.train()
        weights[preset] = {n: p.detach().clone() for n, p in trainer.backbone.unet.named_parameters() if p.requires_grad}
    assert max(float(v.abs().max()) for k, v in weights["sd15"].items() if "lora_B" in k) > 1e-3  # it trained
    assert all(torch.equal(weights["sd15"][k], weights["sd15-lowmem"][k]) for k in weights["sd15"])


def test_offloaded_preference_model_is_on_the_device_only_while_sampling(tiny_sd15_path: Path, tiny_clip_path: Path,
                                                                         prompts_file: Path, tmp_path: Path) -> None:
    """Each round: moved in, the round's sampling (the only phase that scores), moved out, then
    training; it is built in host memory; the run trains the same LoRA as without, bit for bit."""
    weights = {}
    for offload in (False, True):
        config = load_config("sd15", [
            f"model.pretrained={tiny_sd15_path}", "model.resolution=32", "model.device=cpu", "model.dtype=float32",
            "train.mixed_precision=no", f"data.prompts={prompts_file}", "train.rounds=2", "train.prompts_per_round=2",
            "sampling.num_inference_steps=6", "pools.divert_start_step=2", "pools.threshold=0.0",
            "logging.tensorboard=false", "optimizer.lr=1e-3", f"preference.pretrained={tiny_clip_path}",
            f"preference.processor={tiny_clip_path}", "preference.checkpoint=null",
            "preference.variant=step_agnostic", f"preference.offload={str(offload).lower()}"])
        trainer = SPOTrainer(config, tmp_path / f"offload-{offload}", progress=False)
        events: list[str] = []
        if offload:
            scorer, to, sample_round, train_on = trainer.scorer, trainer.scorer.to, trainer.sample_round, trainer.train_on

            def moved(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                events.append(f"to {args[0] if args else kwargs.get('device')}")
                return to(*args, **kwargs)

            def sampling(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                events.append("sampling starts")
                out = sample_round(*args, **kwargs)
                events.append("sampling ends")
                return out

            def training(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                events.append("training")
                return train_on(*args, **kwargs)

            scorer.to, trainer.sample_round, trainer.train_on = moved, sampling, training
            assert trainer._scorer_home == trainer.accelerator.device
        trainer.train()
        if offload:
            device = str(trainer.accelerator.device)
            one_round = ["sampling starts", f"to {device}", "to cpu", "sampling ends", "training"]
            assert events == one_round * 2
        weights[offload] = {n: p.detach().clone() for n, p in trainer.backbone.unet.named_parameters() if p.requires_grad}
    assert max(float(v.abs().max()) for k, v in weights[False].items() if "lora_B" in k) > 1e-3  # it trained
    assert all(torch.equal(weights[False][k], weights[True][k]) for k in weights[False])


def test_a_run_resumes_with_the_lowmem_levers(tiny_sd15_path: Path, prompts_file: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """After running out of memory, ``--resume`` may switch a run to ``PRESET-lowmem``: here it
    ends with the LoRA of the uninterrupted run, bit for bit (on this CPU the levers round
    alike), and says that the rounding may differ elsewhere; other changes are still refused."""
    def config(preset: str, *extra: str):  # noqa: ANN202
        return load_config(preset, [
            f"model.pretrained={tiny_sd15_path}", "model.resolution=32", "model.device=cpu", "model.dtype=float32",
            "train.mixed_precision=no", f"data.prompts={prompts_file}", "train.rounds=3", "train.prompts_per_round=2",
            "sampling.num_inference_steps=6", "pools.divert_start_step=2", "pools.threshold=0.0",
            "logging.tensorboard=false", "optimizer.lr=1e-3", "logging.checkpoint_every=1", *extra])

    SPOTrainer(config("sd15"), tmp_path / "full", scorer=brightness, progress=False).train()
    SPOTrainer(config("sd15"), tmp_path / "cut", scorer=brightness, progress=False).train(stop_after=1)
    assert latest_checkpoint(tmp_path / "cut").name == "round-000001"
    with pytest.raises(CheckpointError, match="pools.k"):  # not a memory lever
        SPOTrainer(config("sd15-lowmem", "pools.k=3"), tmp_path / "cut", scorer=brightness, resume=True,
                   progress=False)
    capsys.readouterr()
    resumed = SPOTrainer(config("sd15-lowmem"), tmp_path / "cut", scorer=brightness, resume=True, progress=False)
    note = capsys.readouterr().out
    assert "model.gradient_checkpointing" in note and "sampling.decode_batch_size" in note and "rounding" in note
    assert "offload" not in note  # the offloads change nothing: no note for them
    assert resumed.rounds_done == 1 and resumed.backbone.unet.is_gradient_checkpointing
    resumed.train()
    full = SPOTrainer(config("sd15"), tmp_path / "full", scorer=brightness, resume=True, progress=False)
    a = {n: p for n, p in full.backbone.unet.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.backbone.unet.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_config(str(tmp_path / "cut" / "config.yaml")).model.gradient_checkpointing  # what it ran last
