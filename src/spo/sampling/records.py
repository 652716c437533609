"""Records: the training data a round produces (SPO's win/lose transitions, and the base the
other methods' records share)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..backbones import Conditioning

class Records:
    """Base of the training data a method's round produces: a dataclass whose fields are a
    ``cond`` (:class:`Conditioning`) and tensors with one row per record. Indexing, moving,
    concatenating and the flat tensor dict (for gathering across processes) come from the fields,
    so a method's records are one small dataclass.
    """

    cond: Conditioning

    @classmethod
    def tensor_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "cond")  # type: ignore[arg-type]

    def __len__(self) -> int:
        return int(getattr(self, self.tensor_fields()[0]).shape[0])

    def index(self, rows: Tensor | Sequence[int]):  # type: ignore[no-untyped-def]
        idx = torch.as_tensor(rows, dtype=torch.long)
        values = {f: getattr(self, f).index_select(0, idx.to(getattr(self, f).device)) for f in self.tensor_fields()}
        return type(self)(cond=self.cond.index(idx), **values)

    def to(self, device: torch.device | str):  # type: ignore[no-untyped-def]
        values = {f: getattr(self, f).to(device) for f in self.tensor_fields()}
        return type(self)(cond=self.cond.to(device), **values)

    def replace(self, **values: Tensor):  # type: ignore[no-untyped-def]
        return dataclasses.replace(self, **values)  # type: ignore[type-var]

    @classmethod
    def cat(cls, items: Sequence["Records"]):  # type: ignore[no-untyped-def]
        items = [r for r in items if len(r) > 0] or list(items[:1])
        if not items:
            raise ValueError("cannot concatenate an empty list of records")
        values = {f: torch.cat([getattr(r, f) for r in items]) for f in cls.tensor_fields()}
        return cls(cond=Conditioning.cat([r.cond for r in items]), **values)

    def tensors(self) -> dict[str, Tensor | None]:
        """Every tensor by name (conditioning fields prefixed ``cond.``), for gathering and saving."""
        out: dict[str, Tensor | None] = {f: getattr(self, f) for f in self.tensor_fields()}
        for f in dataclasses.fields(Conditioning):
            out[f"cond.{f.name}"] = getattr(self.cond, f.name)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor | None]):  # type: ignore[no-untyped-def]
        cond = Conditioning(**{f.name: tensors[f"cond.{f.name}"] for f in dataclasses.fields(Conditioning)})
        return cls(cond=cond, **{f: tensors[f] for f in cls.tensor_fields()})


@dataclass
class TransitionRecords(Records):
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

    @property
    def shared_x_t(self) -> Tensor:
        """Per record: do win and lose start from the same x_t (then one UNet pass serves both)?"""
        if len(self) == 0:
            return torch.zeros(0, dtype=torch.bool)
        return (self.x_t_win == self.x_t_lose).flatten(1).all(dim=1)
