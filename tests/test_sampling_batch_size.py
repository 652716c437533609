"""``sampling.batch_size``: the denoiser runs on at most that many images per call while sampling
(each two rows under CFG), and what that changes. On this CPU a smaller batch rounds differently
in the UNet's kernels, so the lever is *not* bit-exact: the same pairs are drawn (same record
count, same layout), with values within 1e-4."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fixed_scorers import brightness
from spo.config import ConfigError, load_config
from spo.training import SPOTrainer


def _collect(tiny_sd15_path: Path, prompts_file: Path, run: Path,
             batch_size: int | None) -> tuple[dict, list[int], list[int]]:
    config = load_config("sd15", [
        f"model.pretrained={tiny_sd15_path}", "model.resolution=32", "model.device=cpu", "model.dtype=float32",
        "train.mixed_precision=no", f"data.prompts={prompts_file}", "train.rounds=1", "train.prompts_per_round=2",
        "sampling.num_inference_steps=6", "pools.divert_start_step=2", "pools.threshold=0.0",
        "logging.tensorboard=false", f"sampling.batch_size={'null' if batch_size is None else batch_size}"])
    trainer = SPOTrainer(config, run, scorer=brightness, progress=False)
    rows: list[int] = []
    forward = trainer.backbone._forward

    def counted(net, x, *args):  # noqa: ANN001, ANN002, ANN202
        if not torch.is_grad_enabled():
            rows.append(x.shape[0])
        return forward(net, x, *args)

    trainer.backbone._forward = counted
    records = trainer.sample_round(0).records
    sampled = list(rows)
    rows.clear()
    trainer.train_on(records, 0)  # the training passes: the reference's runs without gradients too
    return records.tensors(), sampled, rows


def test_sampling_in_smaller_batches_draws_the_same_pairs(tiny_sd15_path: Path, prompts_file: Path,
                                                            tmp_path: Path) -> None:
    whole, whole_rows, whole_training = _collect(tiny_sd15_path, prompts_file, tmp_path / "whole", None)
    assert max(whole_rows) > 2 * 3  # the pool pass: 2 prompts x k 4 candidates x 2 (CFG) rows
    assert whole_training and max(whole_training) > 2  # the reference pass is one call per micro-batch
    for size in (1, 3):
        chunked, rows, training = _collect(tiny_sd15_path, prompts_file, tmp_path / f"b{size}", size)
        # training is never chunked: under FSDP / ZeRO-3 every call is a collective, and the
        # reference's batch can differ between processes (MSPO)
        assert training == whole_training
        assert max(rows) == 2 * size and sum(rows) == sum(whole_rows)  # the same rows, in calls of <= size images
        assert chunked.keys() == whole.keys()
        for name, value in whole.items():
            if value is None:
                assert chunked[name] is None
                continue
            assert chunked[name].shape == value.shape, name  # the same pairs drawn
            assert torch.allclose(chunked[name].double(), value.double(), atol=1e-4, rtol=0), name


def test_sampling_batch_size_is_checked() -> None:
    with pytest.raises(ConfigError, match="sampling.batch_size"):
        load_config("sd15", ["sampling.batch_size=0"])
