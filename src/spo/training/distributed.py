"""Moving a round's records between processes with accelerate's collectives."""

from __future__ import annotations

from typing import Any, TypeVar

import torch

from ..errors import SPOError
from ..sampling.records import Records

R = TypeVar("R", bound=Records)


def gather_counts(accelerator: Any, count: int) -> list[int]:
    """Every process's record count, in rank order (identical on all processes)."""
    local = torch.tensor([count], device=accelerator.device, dtype=torch.long)
    return accelerator.gather(local).cpu().tolist()


def gather_records(accelerator: Any, records: R, counts: list[int]) -> R:
    """All processes' records, concatenated in rank order, on every process.

    Processes find different numbers of valid pairs, so each tensor is padded to the largest
    count, gathered, and the padding dropped using ``counts`` (from :func:`gather_counts`).
    """
    if accelerator.num_processes == 1:
        return records
    largest = max(counts)
    gathered: dict[str, torch.Tensor | None] = {}
    for name, tensor in records.tensors().items():
        if tensor is None:
            gathered[name] = None
            continue
        padded = accelerator.pad_across_processes(tensor.contiguous(), dim=0)
        if padded.shape[0] != largest:
            raise RuntimeError(f"padding of {name} gave {padded.shape[0]} rows, expected {largest}")
        every = accelerator.gather(padded).view(accelerator.num_processes, largest, *tensor.shape[1:])
        gathered[name] = torch.cat([every[rank, :n] for rank, n in enumerate(counts)])
    return type(records).from_tensors(gathered)


def reduce_log(accelerator: Any, log: dict[str, Any], weight: float) -> dict[str, Any]:
    """A round's statistics over all processes, the same on every process: integers are summed
    (counts), floats averaged weighted by ``weight`` (each process's units, e.g. its pools) with
    NaNs left out, and ``{t: value}`` dicts averaged per key the same way. Every process must
    log the same keys (and the same dict keys); anything else is kept as this process's."""
    if accelerator.num_processes == 1:
        return log
    slots: list[tuple[str, Any, str]] = []  # (key, dict key or None, "sum" | "mean")
    for key in sorted(log):
        value = log[key]
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            slots.append((key, None, "sum"))
        elif isinstance(value, float):
            slots.append((key, None, "mean"))
        elif isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()):
            slots += [(key, sub, "mean") for sub in sorted(value, key=str)]
    local = torch.tensor([float(log[k] if sub is None else log[k][sub]) for k, sub, _ in slots] + [float(weight)],
                         dtype=torch.float64, device=accelerator.device)
    every = accelerator.gather(local[None]).view(accelerator.num_processes, -1).cpu()
    values, weights = every[:, :-1], every[:, -1:]
    finite = torch.isfinite(values)
    weighted = torch.where(finite, values * weights, torch.zeros_like(values)).sum(dim=0)
    total = torch.where(finite, weights.expand_as(values), torch.zeros_like(values)).sum(dim=0)
    out = dict(log)
    for i, (key, sub, how) in enumerate(slots):
        if how == "sum":
            result: Any = int(values[:, i].sum())
        else:
            result = float(weighted[i] / total[i]) if total[i] > 0 else float("nan")
        if sub is None:
            out[key] = result
        else:
            out[key] = {**out[key], sub: result}  # a new dict: the caller's log is not changed
    return out


def process_count_problem(requested: int | None, launched: int) -> str | None:
    """Why ``train.num_processes`` (``requested``; None: whatever was launched) cannot be honoured
    by a launch of ``launched`` processes, or ``None``. It is refused, never overwritten."""
    if requested is None or requested == launched:
        return None
    return (f"train.num_processes: {requested} processes were asked for, but this run has {launched}; start it "
            f"with `accelerate launch --num_processes {requested} ...`, or leave train.num_processes null")


class WriteError(SPOError, RuntimeError):
    """A write (checkpoint, final weights, config, log) failed on some process; every process
    raises this with the same message instead of waiting for the failed one. Not the user's input
    (the disk or the file system): the CLI exits 1."""

    exit_code = 1


def write_everywhere(accelerator: Any, what: str, write: Any, *, main_only: bool = True) -> Any:
    """Run ``write()`` on the main process (``main_only``) or on every process, then tell every
    process whether it worked: a failure anywhere raises :class:`WriteError` with the same
    message on all of them. This is also a barrier. Without it, a main-process write that fails
    (a full disk, a lost mount) leaves the other processes waiting at the next collective
    forever. Returns what ``write`` returned (``None`` where it did not run)."""
    result, message, cause = None, None, None
    if accelerator.is_main_process or not main_only:
        try:
            result = write()
        except Exception as err:  # noqa: BLE001 - reported to every process below
            cause = err
            where = "the main process" if accelerator.is_main_process else f"process {accelerator.process_index}"
            message = f"{what} failed on {where}: {type(err).__name__}: {err}"
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        message = next((m for m in gather_object([message]) if m is not None), None)
    if message is not None:
        raise WriteError(message) from cause
    return result
