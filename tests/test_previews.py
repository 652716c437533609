"""Previews while training (``logging.sample_every``, spo.training.previews) on the tiny SD-1.5
pipeline: when they are drawn, the reference once, fixed noise, TensorBoard, resume, and that
they change nothing of the training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixed_scorers import PROMPTS, brightness
from spo.config import ConfigError, load_config
from spo.training import SPOTrainer, read_metrics
from spo.training import previews as previews_module
from spo.training.previews import PreviewError, Previews, preview_prompts


def _config(model: Path, prompts: Path, *overrides: str):  # noqa: ANN202
    return load_config(
        "sd15",
        [
            f"model.pretrained={model}", "model.resolution=32", "model.device=cpu", "model.dtype=float32",
            "train.mixed_precision=no", f"data.prompts={prompts}", "train.rounds=3", "train.prompts_per_round=2",
            "train.batch_size=8", "sampling.num_inference_steps=6", "pools.k=2", "pools.threshold=0.0",
            "optimizer.lr=1e-3", "logging.tensorboard=false", "logging.checkpoint_every=1", "logging.sample_count=2",
            "lora.dropout=0.1",  # training draws dropout masks from the global generator: previews must not move it
            *overrides,
        ],
    )


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "lora" / "pytorch_lora_weights.safetensors"))


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


class DrawCounter:
    """Counts the previews' sampler calls, policy and reference apart."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        real = previews_module.ddim_sample

        def counted(backbone, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            self.calls.append("reference" if backbone._reference_active else "policy")
            return real(backbone, *args, **kwargs)

        monkeypatch.setattr(previews_module, "ddim_sample", counted)


def test_previews_rounds_reference_tensorboard_and_identical_training(
    tiny_sd15_path: Path, prompts_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    counter = DrawCounter(monkeypatch)
    on, off = tmp_path / "on", tmp_path / "off"
    SPOTrainer(_config(tiny_sd15_path, prompts_file, "logging.sample_every=2", "logging.tensorboard=true"), on,
               scorer=brightness, progress=False).train()
    # after round 2 (every 2) and after the last (3); the reference once
    assert sorted(p.name for p in (on / "samples").iterdir()) == ["reference.png", "round-000002.png",
                                                                   "round-000003.png"]
    assert counter.calls == ["reference", "policy", "policy"]
    rounds = [e for e in read_metrics(on / "metrics.jsonl") if e["type"] == "round"]
    assert ["preview_seconds" in r for r in rounds] == [False, True, True]
    assert all(r["preview_seconds"] > 0 for r in rounds[1:])
    # one column of 2 captioned 128 px cells; the policy has moved from the reference
    grid = _pixels(on / "samples" / "round-000003.png")
    assert grid.shape[1] == 6 + 128 + 6 and grid.shape[0] > 2 * 128
    assert not np.array_equal(grid, _pixels(on / "samples" / "reference.png"))
    # TensorBoard holds the grids at their rounds
    event_file = min((on / "logs").rglob("events.out.tfevents*"), key=lambda p: len(p.parts))  # not hparams'
    events = EventAccumulator(str(event_file), size_guidance={IMAGES: 0})
    events.Reload()
    assert {"previews/policy", "previews/reference"} <= set(events.Tags()["images"])
    policy = events.Images("previews/policy")
    assert [e.step for e in policy] == [2, 3] and (policy[0].width, policy[0].height) == grid.shape[1::-1]
    assert len(events.Images("previews/reference")) == 1
    # the same run without previews: nothing written, the very same weights
    counter.calls.clear()
    SPOTrainer(_config(tiny_sd15_path, prompts_file, "logging.sample_every=0"), off, scorer=brightness,
               progress=False).train()
    assert counter.calls == [] and not (off / "samples").exists()
    assert not any("preview_seconds" in e for e in read_metrics(off / "metrics.jsonl"))
    a, b = _weights(on), _weights(off)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_pixels_and_resume_draws_only_what_is_missing(
    tiny_sd15_path: Path, prompts_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = DrawCounter(monkeypatch)
    config = _config(tiny_sd15_path, prompts_file, "logging.sample_every=1", "train.rounds=2")
    full, cut = tmp_path / "full", tmp_path / "cut"
    SPOTrainer(config, full, scorer=brightness, progress=False).train()
    assert counter.calls == ["reference", "policy", "policy"]
    counter.calls.clear()
    SPOTrainer(config, cut, scorer=brightness, progress=False).train(stop_after=1)
    assert counter.calls == ["reference", "policy"]
    (cut / "samples" / "reference.png").unlink()
    counter.calls.clear()
    SPOTrainer(config, cut, scorer=brightness, resume=True, progress=False).train()
    assert counter.calls == ["reference", "policy"]  # round 1's preview is not drawn again
    # a second run with the same seed: the same noise, the same pixels (reference and policy)
    for name in ("reference.png", "round-000001.png", "round-000002.png"):
        assert np.array_equal(_pixels(full / "samples" / name), _pixels(cut / "samples" / name)), name
    # drawn again in a fresh trainer: the same images, draw after draw; another seed: other noise
    same = SPOTrainer(config, tmp_path / "again", scorer=brightness, progress=False)
    first = same.previews.sample(reference=True)
    assert torch.equal(first, same.previews.sample(reference=True))
    grid = np.asarray(same.previews.grid(first, "reference"))
    assert np.array_equal(grid, _pixels(full / "samples" / "reference.png"))
    other = SPOTrainer(_config(tiny_sd15_path, prompts_file, "logging.sample_every=1", "seed=7"), tmp_path / "seed7",
                       scorer=brightness, progress=False)
    assert not torch.equal(first, other.previews.sample(reference=True))


def test_preview_prompts_and_checks(tiny_sd15_path: Path, prompts_file: Path, tmp_path: Path) -> None:
    config = _config(tiny_sd15_path, prompts_file)
    assert config.logging.sample_every == 0 and config.logging.sample_count == 2
    assert preview_prompts(config, PROMPTS) == PROMPTS[:2]
    evaluation = tmp_path / "eval.txt"
    evaluation.write_text("one\ntwo\nthree\n")
    with_eval = _config(tiny_sd15_path, prompts_file, f"eval.prompts={evaluation}")
    assert preview_prompts(with_eval, PROMPTS) == ["one", "two"]
    given = _config(tiny_sd15_path, prompts_file, f"eval.prompts={evaluation}", "logging.sample_prompts=[a cat]")
    assert preview_prompts(given, PROMPTS) == ["a cat"]
    with pytest.raises(PreviewError, match="sample_prompts"):
        preview_prompts(config, [])
    with pytest.raises(ConfigError, match="logging.sample_count"):
        _config(tiny_sd15_path, prompts_file, "logging.sample_count=0")
    with pytest.raises(ConfigError, match="logging.sample_prompts"):
        _config(tiny_sd15_path, prompts_file, "logging.sample_prompts=[]")
    # nothing due without previews; with them: every N rounds and after the last
    off = Previews(config, None, None, tmp_path, [])  # type: ignore[arg-type]
    assert not any(off.due(r) for r in range(5))
    every_2 = _config(tiny_sd15_path, prompts_file, "logging.sample_every=2", "train.rounds=5")
    on = Previews(every_2, None, None, tmp_path, ["x"])  # type: ignore[arg-type]
    assert [r for r in range(6) if on.due(r)] == [2, 4, 5]
