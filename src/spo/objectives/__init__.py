"""Training methods on one backbone interface and one trainer: SPO, Diffusion-DPO, D3PO, DDPO.

Each method is one module named after it, holding its settings (a ``config_class``), its loss as
a pure function of log-probs or per-sample errors (tested by hand) and its :class:`Method` (what
a round collects, the loss of a batch, the report's curves). :func:`method_class` finds a method
by ``objective.name`` through :data:`spo.registry.METHODS`; a method defined elsewhere is added
with ``METHODS.register(MyMethod)``.
"""

from __future__ import annotations

from ..registry import METHODS
from .base import Collected, Curve, LossOutput, Method
from .spo import SPOLossOutput, SPOMethod, SPOMethodConfig, SPOObjective, spo_loss, transition_log_probs


def method_class(name: str) -> type[Method]:
    """The :class:`Method` subclass called ``name`` (``objective.name``)."""
    return METHODS.get(name)  # type: ignore[no-any-return]


__all__ = [
    "METHODS",
    "Collected",
    "Curve",
    "LossOutput",
    "Method",
    "SPOLossOutput",
    "SPOMethod",
    "SPOMethodConfig",
    "SPOObjective",
    "method_class",
    "spo_loss",
    "transition_log_probs",
]
