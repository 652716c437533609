"""Training methods on one backbone interface and one trainer: SPO, Diffusion-DPO, D3PO, DDPO.

Each method is one module named after it, holding its loss as a pure function of log-probs or
per-sample errors (tested by hand) and its :class:`Method` (what a round collects, the loss of
a batch). :func:`method_class` finds a method by ``objective.name``.
"""

from __future__ import annotations

import importlib

from .base import Collected, LossOutput, Method
from .spo import SPOLossOutput, SPOMethod, SPOObjective, spo_loss, transition_log_probs

#: every ``objective.name``, each a module of this package
METHODS = ("spo", "diffusion_dpo", "d3po", "ddpo")


def method_class(name: str) -> type[Method]:
    """The :class:`Method` subclass of ``objective.name`` (its module's ``METHOD``)."""
    if name not in METHODS:
        raise ValueError(f"unknown objective.name {name!r}; expected one of {list(METHODS)}")
    return importlib.import_module(f".{name}", __name__).METHOD  # type: ignore[no-any-return]


__all__ = [
    "METHODS",
    "Collected",
    "LossOutput",
    "Method",
    "SPOLossOutput",
    "SPOMethod",
    "SPOObjective",
    "method_class",
    "spo_loss",
    "transition_log_probs",
]
