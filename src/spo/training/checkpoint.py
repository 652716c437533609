"""Checkpoints written atomically: a complete directory appears, or none does.

Layout of ``RUN_DIR/checkpoints/round-000012/`` (after 12 completed rounds):
``trainable.safetensors`` (the trainable weights: LoRA adapters, or the whole UNet),
``optimizer.pt``, ``lr_scheduler.pt``, ``rng-{rank}.pt`` (one per process) and
``trainer_state.json`` (counters). Everything is written to a hidden temporary directory,
then renamed; the ``.pt`` files hold only tensors and plain types and are read back with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .seeding import rng_state, set_rng_state

_NAME = re.compile(r"^(round|step)-(\d{6,})$")
STATE_FILE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit this run."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path, kind: str = "round") -> list[Path]:
    """Complete checkpoints (those with a trainer state) named ``{kind}-NNNNNN``, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        match = _NAME.match(p.name)
        if p.is_dir() and match and match.group(1) == kind and (p / STATE_FILE).exists():
            found.append((int(match.group(2)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path, kind: str = "round") -> Path | None:
    found = list_checkpoints(run_dir, kind)
    return found[-1] if found else None


def save_checkpoint(
    accelerator: Any,
    run_dir: str | Path,
    done: int,
    *,
    trainable: dict[str, torch.Tensor],
    optimizer: Any,
    lr_scheduler: Any,
    state: dict[str, Any],
    keep: int = 2,
    kind: str = "round",
) -> Path:
    """Write the checkpoint after ``done`` rounds (or steps: ``kind="step"``) on every process."""
    root = checkpoint_dir(run_dir)
    final = root / f"{kind}-{done:06d}"
    tmp = root / f".tmp-{kind}-{done:06d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        if getattr(accelerator, "scaler", None) is not None:  # fp16 loss scale: resume exactly
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({**state, f"{kind}s_done": done}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir, kind)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    accelerator: Any,
    path: str | Path,
    *,
    trainable: dict[str, torch.Tensor],
    optimizer: Any,
    lr_scheduler: Any,
) -> dict[str, Any]:
    """Restore weights, optimiser, scheduler and this process's RNG; returns the trainer state."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.exists():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    state = json.loads(state_file.read_text())
    saved = load_file(str(path / "trainable.safetensors"))
    missing, unexpected = sorted(set(trainable) - set(saved)), sorted(set(saved) - set(trainable))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(saved[name].to(param.device, param.dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    lr_scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", weights_only=True))
    if getattr(accelerator, "scaler", None) is not None and (path / "scaler.pt").exists():
        accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    rng_file = path / f"rng-{accelerator.process_index}.pt"
    if not rng_file.exists():
        raise CheckpointError(f"checkpoint {path} has no RNG state for process {accelerator.process_index}")
    set_rng_state(torch.load(rng_file, weights_only=True))
    return state
