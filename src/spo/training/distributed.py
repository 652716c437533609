"""Moving a round's records between processes with accelerate's collectives."""

from __future__ import annotations

from typing import Any, TypeVar

import torch

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
