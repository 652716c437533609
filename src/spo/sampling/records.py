"""Transition records: the training data SPO's sampler produces."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..backbones import Conditioning

_TENSOR_FIELDS = (
    "timesteps",
    "x_t_win",
    "x_prev_win",
    "x_t_lose",
    "x_prev_lose",
    "score_win",
    "score_lose",
    "step_index",
    "prompt_index",
)


@dataclass
class TransitionRecords:
    """N win/lose transition pairs (x_t^w -> x_{t-1}^w, x_t^l -> x_{t-1}^l) at timesteps t.

    In plain SPO both transitions start from the same x_t (``x_t_win`` equals ``x_t_lose``); in
    MSPO the transitions after the branching step start from the two branches' own states.
    ``cond`` holds each record's prompt conditioning (with its negative for CFG).
    """

    cond: Conditioning
    timesteps: Tensor
    x_t_win: Tensor
    x_prev_win: Tensor
    x_t_lose: Tensor
    x_prev_lose: Tensor
    score_win: Tensor
    score_lose: Tensor
    step_index: Tensor
    prompt_index: Tensor

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def shared_x_t(self) -> Tensor:
        """Per record: do win and lose start from the same x_t (then one UNet pass serves both)?"""
        if len(self) == 0:
            return torch.zeros(0, dtype=torch.bool)
        return (self.x_t_win == self.x_t_lose).flatten(1).all(dim=1)

    def index(self, rows: Tensor | Sequence[int]) -> "TransitionRecords":
        idx = torch.as_tensor(rows, dtype=torch.long)
        values = {f: getattr(self, f).index_select(0, idx.to(getattr(self, f).device)) for f in _TENSOR_FIELDS}
        return TransitionRecords(cond=self.cond.index(idx), **values)

    def to(self, device: torch.device | str) -> "TransitionRecords":
        values = {f: getattr(self, f).to(device) for f in _TENSOR_FIELDS}
        return TransitionRecords(cond=self.cond.to(device), **values)

    @staticmethod
    def cat(items: Sequence["TransitionRecords"]) -> "TransitionRecords":
        items = [r for r in items if len(r) > 0] or list(items[:1])
        if not items:
            raise ValueError("cannot concatenate an empty list of records")
        values = {f: torch.cat([getattr(r, f) for r in items]) for f in _TENSOR_FIELDS}
        return TransitionRecords(cond=Conditioning.cat([r.cond for r in items]), **values)

    def tensors(self) -> dict[str, Tensor | None]:
        """Every tensor by name (conditioning fields prefixed ``cond.``), for gathering and saving."""
        out: dict[str, Tensor | None] = {f: getattr(self, f) for f in _TENSOR_FIELDS}
        for f in dataclasses.fields(Conditioning):
            out[f"cond.{f.name}"] = getattr(self.cond, f.name)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor | None]) -> "TransitionRecords":
        cond = Conditioning(**{f.name: tensors[f"cond.{f.name}"] for f in dataclasses.fields(Conditioning)})
        return cls(cond=cond, **{f: tensors[f] for f in _TENSOR_FIELDS})  # type: ignore[arg-type]
