"""Deterministic randomness derived from (seed, purpose, round, rank).

Every random draw of a round comes from a generator seeded by what it is for, so an interrupted
run resumed at round r draws exactly what the uninterrupted run drew at round r.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed from ``seed`` and any keys (stable across processes and Python runs)."""
    text = "/".join([str(seed), *map(str, keys)]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, *keys: object) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


class PromptSchedule:
    """Which prompts each process samples in each round: epochs of shuffled prompts.

    The global batch of round r is positions [r * G, (r + 1) * G) of the infinite sequence
    formed by concatenating one seeded permutation of the prompt list per epoch (G = prompts per
    process x processes); process i takes its i-th slice.
    """

    def __init__(self, prompts: Sequence[str], seed: int, per_process: int, num_processes: int) -> None:
        if not prompts:
            raise ValueError("the prompt list is empty")
        self.prompts = list(prompts)
        self.seed = seed
        self.per_process = per_process
        self.num_processes = num_processes
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            self._perms[epoch] = torch.randperm(len(self.prompts), generator=generator(self.seed, "prompts", epoch)).tolist()
        return self._perms[epoch]

    def prompts_for(self, round_index: int, rank: int) -> list[str]:
        size = len(self.prompts)
        start = (round_index * self.num_processes + rank) * self.per_process
        return [self.prompts[self._perm(pos // size)[pos % size]] for pos in range(start, start + self.per_process)]


def rng_state() -> dict[str, Any]:
    """The global RNG states of this process, as plain types and tensors (safe to reload with
    ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
