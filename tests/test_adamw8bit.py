"""``optimizer.name=adamw8bit``: bitsandbytes' 8-bit AdamW (the release's ``use_8bit_adam``). It
keeps AdamW's moments of the large weights in 8 bits, changes the training numbers (not the
sampling), checkpoints and resumes exactly, and is refused where it cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (it comes with the dev extra)")

from fixed_scorers import brightness  # noqa: E402
from spo.config import load_config  # noqa: E402
from spo.training import SPOTrainer, TrainingError  # noqa: E402


def _config(tiny_sd15_path: Path, prompts_file: Path, name: str) -> object:
    return load_config("sd15", [
        f"model.pretrained={tiny_sd15_path}", "model.resolution=32", "model.device=cpu", "model.dtype=float32",
        "model.finetune=full", "train.mixed_precision=no", f"data.prompts={prompts_file}", "train.rounds=2",
        "train.prompts_per_round=2", "sampling.num_inference_steps=6", "pools.divert_start_step=2",
        "pools.threshold=0.0", "optimizer.lr=1e-3", "logging.tensorboard=false", "logging.checkpoint_every=1",
        f"optimizer.name={name}"])


def _weights(trainer: SPOTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.backbone.unet.named_parameters()}


def test_adamw8bit_trains_checkpoints_and_resumes_exactly(tiny_sd15_path: Path, prompts_file: Path,
                                                           tmp_path: Path) -> None:
    import bitsandbytes

    plain = SPOTrainer(_config(tiny_sd15_path, prompts_file, "adamw"), tmp_path / "plain", scorer=brightness,
                       progress=False)
    plain.train()
    eight = SPOTrainer(_config(tiny_sd15_path, prompts_file, "adamw8bit"), tmp_path / "eight", scorer=brightness,
                       progress=False)
    start = _weights(eight)
    assert isinstance(eight.optimizer.optimizer, bitsandbytes.optim.AdamW8bit)
    eight.train()
    assert eight.step == plain.step > 0
    states = [s for s in eight.optimizer.optimizer.state.values() if s]
    assert any(s["state1"].dtype == torch.uint8 for s in states)  # the large weights' moments in 8 bits
    a, b = _weights(plain), _weights(eight)
    assert max(float((b[n] - start[n]).abs().max()) for n in b) > 1e-4  # it trained
    assert max(float((b[n] - a[n]).abs().max()) for n in a) > 0  # 8-bit moments change the training numbers

    resumed_dir = tmp_path / "resumed"
    first = SPOTrainer(_config(tiny_sd15_path, prompts_file, "adamw8bit"), resumed_dir, scorer=brightness,
                       progress=False)
    first.train(stop_after=1)
    del first
    second = SPOTrainer(_config(tiny_sd15_path, prompts_file, "adamw8bit"), resumed_dir, scorer=brightness,
                        progress=False, resume=True)
    second.train()
    c = _weights(second)
    assert all(torch.equal(c[n], b[n]) for n in b)


def test_adamw8bit_needs_bitsandbytes(tiny_sd15_path: Path, prompts_file: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    with pytest.raises(TrainingError, match="pip install bitsandbytes"):
        SPOTrainer(_config(tiny_sd15_path, prompts_file, "adamw8bit"), tmp_path / "run", scorer=brightness,
                   progress=False)
    assert not (tmp_path / "run").exists()


def test_adamw8bit_is_refused_under_sharded_engines() -> None:
    from types import SimpleNamespace

    from spo.training.setup import _optimizer_problem
    from spo.training.trainer import SPO_RUN

    config = load_config("sd15", ["optimizer.name=adamw8bit"])
    for kind, name in (("DistributedType.FSDP", "fsdp"), ("DistributedType.DEEPSPEED", "deepspeed")):
        acc = SimpleNamespace(distributed_type=kind, num_processes=2)
        assert f"not supported under {name}" in _optimizer_problem(config, acc, SPO_RUN)
    assert _optimizer_problem(config, SimpleNamespace(distributed_type="DistributedType.MULTI_CPU", num_processes=2),
                              SPO_RUN) is None
