"""Checkpoints written atomically: a complete directory appears, or none does.

Layout of ``RUN_DIR/checkpoints/round-000012/`` (after 12 completed rounds):
``trainable.safetensors`` (the trainable weights: LoRA adapters, or the whole UNet),
``optimizer.pt``, ``lr_scheduler.pt``, ``rng-{rank}.pt`` (one per process), ``grads-{rank}.safetensors``
(only while gradients are accumulating across rounds: each process's own, not yet reduced; under
DeepSpeed ``replay-{rank}.safetensors`` instead, the open accumulation's micro-batches) and
``trainer_state.json`` (counters), and ``manifest.json`` (each file's size and sha256, written
after every other file but the state). Everything is written to a hidden temporary directory,
then renamed; the ``.pt`` files hold only tensors and plain types and are read back with
``torch.load(weights_only=True)``. On resume, :func:`latest_good_checkpoint` checks the
manifest and falls back to the previous checkpoint, with a warning, when the latest one was
truncated or damaged after it was written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import SPOError
from .engines import (DEEPSPEED, FSDP, engine_of, full_optimizer_state, full_state, load_full_optimizer_state,
                      load_full_state, load_loss_scale_state, loss_scale_state, set_local_grads)
from .seeding import rng_state, set_rng_state

_NAME = re.compile(r"^(round|step)-(\d{6,})$")
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"


class CheckpointError(SPOError, RuntimeError):
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_problem(path: str | Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be trusted (a file missing, of the wrong size or
    with the wrong hash against its manifest), or ``None`` when it is intact. A checkpoint
    written before manifests existed is taken as it is."""
    path = Path(path)
    manifest_file = path / MANIFEST
    if not manifest_file.exists():
        return None
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, ValueError) as err:
        return f"{MANIFEST} is unreadable ({type(err).__name__})"
    for name, entry in sorted(manifest.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != entry.get("bytes"):
            return f"{name} is {size} bytes, the manifest says {entry.get('bytes')}"
        if _sha256(file) != entry.get("sha256"):
            return f"{name} does not match its sha256 in the manifest"
    return None


def latest_good_checkpoint(run_dir: str | Path, kind: str = "round", warn: Any = None) -> Path | None:
    """The newest intact checkpoint; each newer damaged one is reported through ``warn`` (one
    line each). Raises :class:`CheckpointError` when checkpoints exist but none is intact."""
    found = list_checkpoints(run_dir, kind)
    problems = []
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            for line in problems:
                (warn or print)(f"warning: {line}; resuming from {path.name}")
            return path
        problems.append(f"checkpoint {path.name} is damaged: {problem}")
    if found:
        raise CheckpointError(f"no intact checkpoint in {checkpoint_dir(run_dir)}: " + "; ".join(
            p.removeprefix("checkpoint ") for p in problems))
    return None


class _OneProcess:
    """What the checkpoint functions need of an accelerator, for single-process loops (the toy
    world's pretraining) that have none."""

    is_main_process = True
    process_index = 0
    num_processes = 1
    scaler = None


ONE_PROCESS = _OneProcess()


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
    grads: dict[str, torch.Tensor] | None = None,
    model: torch.nn.Module | None = None,
    replay: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the checkpoint after ``done`` rounds (or steps: ``kind="step"``) on every process
    (``accelerator``: :data:`ONE_PROCESS` for a loop without one; ``lr_scheduler`` may be None).

    ``model``: the prepared module ``trainable`` belongs to. With it, the weights and the
    optimiser state are gathered whole under any engine (:mod:`~spo.training.engines`: FSDP's
    shards included; every process must call this) and the optimiser state is keyed by
    parameter name; without it (single-process loops), they are written as they are.

    Each stage ends with :func:`~spo.training.distributed.write_everywhere`, so a failed write
    on any process (a full disk) stops every process with the same :class:`WriteError`, and the
    previous checkpoint stays the latest. ``grads``: this process's accumulated gradients, when an
    optimiser step is still open (``train.carry_accumulation``), restored by
    :func:`load_checkpoint`. ``replay``: instead of them (DeepSpeed), this process's micro-batches
    of the open accumulation as tensors, ``replay-{rank}.safetensors``, handed back by
    :func:`load_checkpoint` as the state's ``replay_tensors`` for the trainer to backpropagate
    again."""
    from .distributed import write_everywhere

    if model is not None:  # collectives: every process, before any write (engines.full_state)
        trainable = full_state(accelerator, model, list(trainable))
        optimizer_state = full_optimizer_state(accelerator, model, optimizer)
    else:
        optimizer_state = optimizer.state_dict() if accelerator.is_main_process else {}
    scale = loss_scale_state(accelerator, optimizer) if accelerator.is_main_process else None
    root = checkpoint_dir(run_dir)
    final = root / f"{kind}-{done:06d}"
    tmp = root / f".tmp-{kind}-{done:06d}"
    what = f"writing checkpoint {final}"

    def start() -> None:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)

    def files() -> None:
        torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
        if grads:
            save_file({k: v.detach().contiguous().cpu() for k, v in grads.items()},
                      str(tmp / f"grads-{accelerator.process_index}.safetensors"))
        if replay:
            save_file({k: v.detach().contiguous().cpu() for k, v in replay.items()},
                      str(tmp / f"replay-{accelerator.process_index}.safetensors"))
        if accelerator.is_main_process:
            save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
            torch.save(optimizer_state, tmp / "optimizer.pt")
            if lr_scheduler is not None:
                torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
            if scale is not None:  # fp16 loss scale: resume exactly
                torch.save(scale, tmp / "scaler.pt")

    def finish() -> None:
        written = sorted(p for p in tmp.iterdir() if p.is_file())
        (tmp / MANIFEST).write_text(json.dumps({p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                                                for p in written}, indent=2))
        keys = {"optimizer_keys": "name"} if model is not None else {}
        (tmp / STATE_FILE).write_text(json.dumps({**state, **keys, f"{kind}s_done": done}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir, kind)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    try:
        write_everywhere(accelerator, what, start)
        write_everywhere(accelerator, what, files, main_only=False)
        write_everywhere(accelerator, what, finish)
    except Exception:
        if accelerator.is_main_process:  # the half-written copy goes; the previous checkpoint is untouched
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_checkpoint(
    accelerator: Any,
    path: str | Path,
    *,
    trainable: dict[str, torch.Tensor],
    optimizer: Any,
    lr_scheduler: Any,
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Restore weights, optimiser, scheduler, this process's RNG and its accumulated gradients
    (when the checkpoint holds them); returns the trainer state. ``model``: as for
    :func:`save_checkpoint` (then a collective: every process calls it)."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.exists():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    state = json.loads(state_file.read_text())
    with safe_open(str(path / "trainable.safetensors"), framework="pt") as f:
        names = set(f.keys())
    missing, unexpected = sorted(set(trainable) - names), sorted(names - set(trainable))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    engine = engine_of(accelerator) if model is not None else None
    reads = engine != FSDP or accelerator.is_main_process  # FSDP: the main process's copy is broadcast
    saved = load_file(str(path / "trainable.safetensors")) if reads else {}
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu") if reads else {}
    by_name = state.get("optimizer_keys") == "name"  # else optimizer.state_dict()'s numbering
    if engine in (FSDP, DEEPSPEED) and not by_name:
        raise CheckpointError(f"checkpoint {path} numbers its optimizer state by position (written before "
                              "checkpoints named parameters): resume it without FSDP or DeepSpeed")
    if model is None:
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(saved[name].to(param.device, param.dtype))
    else:
        load_full_state(accelerator, model, saved)
    if by_name:
        load_full_optimizer_state(accelerator, model, optimizer, optimizer_state)
    else:
        optimizer.load_state_dict(optimizer_state)
    del saved, optimizer_state
    grads_file = path / f"grads-{accelerator.process_index}.safetensors"
    if grads_file.exists() and engine == DEEPSPEED:  # (ZeRO's buffers take no .grad)
        raise CheckpointError(f"checkpoint {path} was written inside an open gradient accumulation by another engine "
                              "(it holds gradients, not the micro-batches DeepSpeed replays): resume it under the "
                              "engine that wrote it")
    if grads_file.exists():
        set_local_grads(trainable, load_file(str(grads_file)))
    replay_file = path / f"replay-{accelerator.process_index}.safetensors"
    if replay_file.exists():
        state["replay_tensors"] = load_file(str(replay_file))
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", weights_only=True))
    if (path / "scaler.pt").exists():
        load_loss_scale_state(accelerator, optimizer, torch.load(path / "scaler.pt", weights_only=True))
    rng_file = path / f"rng-{accelerator.process_index}.pt"
    if not rng_file.exists():
        raise CheckpointError(f"checkpoint {path} has no RNG state for process {accelerator.process_index}")
    set_rng_state(torch.load(rng_file, weights_only=True))
    return state
