"""Checkpoints of the toy world's own training loops (``spo toy pretrain``, the toy CLIP stage of
``spo toy build``), so that an interrupted one resumes and ends with the weights an
uninterrupted one would have.

They are the trainers' checkpoints (:mod:`spo.training.checkpoint`: atomic, with a manifest,
a damaged latest one falls back to the previous) in ``RUN_DIR/checkpoints/step-NNNNNN``, for
one process: the model's weights and any extra tensors (an EMA), the optimiser, the global RNG
states, and in ``trainer_state.json`` the loop's settings, its numpy ``Generator`` state (the
data stream) and its history (losses, seconds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import SPOError
from ..training.checkpoint import ONE_PROCESS, CheckpointError, latest_good_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


class ToyTrainingError(SPOError, RuntimeError):
    """A toy training loop cannot start or resume as asked (nothing was written)."""


def resume_point(run_dir: Path, resume: bool, what: str) -> Path | None:
    """The checkpoint to resume ``what`` from, or ``None`` to start afresh. Checkpoints left by an
    earlier run are never overwritten without ``resume``."""
    found = list_checkpoints(run_dir, "step")
    if found and not resume:
        raise ToyTrainingError(f"{run_dir} holds checkpoints of an earlier {what} ({found[-1].name}); "
                               "pass --resume to continue it, or choose another --output")
    if not resume:
        return None
    try:
        return latest_good_checkpoint(run_dir, "step")
    except CheckpointError as err:
        raise ToyTrainingError(str(err)) from None


def save_loop(run_dir: Path, step: int, *, tensors: dict[str, torch.Tensor], optimizer: Any,
              rng: np.random.Generator, settings: dict[str, Any], history: dict[str, Any], keep: int = 2) -> Path:
    """Checkpoint after ``step`` steps."""
    state = {"settings": settings, "numpy_generator": rng.bit_generator.state, "history": history}
    return save_checkpoint(ONE_PROCESS, run_dir, step, trainable=tensors, optimizer=optimizer, lr_scheduler=None,
                           state=state, keep=keep, kind="step")


def load_loop(path: Path, *, tensors: dict[str, torch.Tensor], optimizer: Any, rng: np.random.Generator,
              settings: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Restore a :func:`save_loop` checkpoint into ``tensors``, ``optimizer``, ``rng`` and the
    global RNGs; returns (steps done, history). Refuses one written with other settings."""
    try:
        state = load_checkpoint(ONE_PROCESS, path, trainable=tensors, optimizer=optimizer, lr_scheduler=None)
    except CheckpointError as err:
        raise ToyTrainingError(str(err)) from None
    saved = state.get("settings")
    if saved != settings:
        changed = sorted(k for k in set(saved or {}) | set(settings) if (saved or {}).get(k) != settings.get(k))
        raise ToyTrainingError(f"{path} was written with other settings ({', '.join(changed)} differ); "
                               "resume with the same settings, or choose another --output")
    rng.bit_generator.state = state["numpy_generator"]
    return int(state["steps_done"]), state["history"]
