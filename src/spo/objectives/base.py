"""What every training method provides to the one trainer: records for a round, and a loss.

A method is one module of this package named after it (``spo``, ``diffusion_dpo``, ``d3po``,
``ddpo``) whose ``METHOD`` is a :class:`Method` subclass, found by ``objective.name`` through
:data:`spo.registry.METHODS` (a method from elsewhere registers with ``METHODS.register``). The
module declares everything of the method: its settings (``config_class``, a subclass of
:class:`~spo.config.schema.ObjectiveConfig` with its range checks), its loss, its diagnostics
(``metric_names``) and their plots in the report (``curves``). The trainer (``spo.training.SPOTrainer``) owns everything else:
the round loop, gathering records across processes, micro-batches, the optimiser, checkpoints.

One round of any method, on every process:

1. ``collect(items, generator)``: this process's items of the round (prompts, or preference
   rows for an offline method) -> :class:`Collected` records;
2. the trainer gathers every process's records; ``prepare(records)`` runs on the gathered
   records, identically on every process (DDPO's advantages are computed here);
3. the trainer shuffles and splits them, and calls ``loss(batch)`` per micro-batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..backbones import Backbone
from ..config import ObjectiveConfig, SPOConfig
from ..diffusion import Schedule
from ..sampling.records import Records


@dataclass(frozen=True)
class Curve:
    """One training plot of ``spo report``: the first of ``keys`` that the run's metrics hold.

    ``source``: ``"auto"`` plots step lines when they hold the keys (falls back to round
    lines), ``"round"`` plots round lines only. ``reference``: a horizontal line (chance, 0, 1).
    """

    plot_id: str
    title: str
    ylabel: str
    keys: tuple[str, ...]
    source: str = "auto"
    reference: float | None = None
    smooth: bool = True


@dataclass
class LossOutput:
    """A micro-batch's loss (a scalar with gradient) and float diagnostics named in
    :attr:`Method.metric_names`."""

    loss: Tensor
    metrics: dict[str, float]


@dataclass
class Collected:
    """One process's share of a round: its records, how many units it drew (pools, trajectory
    pairs, trajectories or preference rows) and how many of them gave training records, plus
    round-level numbers to log (floats, or dicts of floats per timestep)."""

    records: Records
    units: int
    valid: int
    log: dict[str, Any] = field(default_factory=dict)


class Method(ABC):
    """A post-training method on the shared backbone interface.

    Args:
        config: the resolved configuration (``objective.*`` holds the method's settings).
        backbone: the diffusion model, adapters attached (policy on, reference = adapters off).
        scorer: the reward / preference model (``None`` for methods with ``needs_scorer = False``).
    """

    #: ``objective.name``
    name: ClassVar[str]
    #: the method's settings: the ``objective`` section when ``objective.name`` is :attr:`name`
    config_class: ClassVar[type[ObjectiveConfig]]
    #: the per-step diagnostics of :meth:`loss` (``loss`` first), averaged into the round's log
    metric_names: ClassVar[tuple[str, ...]]
    #: the report's plots of those diagnostics (the loss and the round numbers are the report's own)
    curves: ClassVar[tuple[Curve, ...]] = ()
    #: does the method score its samples (a preference or reward model must be configured)?
    needs_scorer: ClassVar[bool] = True
    #: does a round draw prompts (``data.prompts``), or rows of preference data?
    needs_prompts: ClassVar[bool] = True
    #: does the loss use the log-probabilities of sampled DDIM steps (then sampling.eta must be > 0)?
    needs_stochastic_steps: ClassVar[bool] = True
    #: what the trainer's progress bar shows beside the loss
    progress_metric: ClassVar[str] = "loss"

    def __init__(self, config: SPOConfig, backbone: Backbone, scorer: Any = None) -> None:
        self.config = config
        self.backbone = backbone
        self.scorer = scorer

    @classmethod
    def check_inputs(cls, config: SPOConfig) -> None:
        """Fail on unusable inputs (missing data, ...) with a clear error before any model loads."""

    def schedule(self) -> Schedule:
        """The backbone's sampling schedule (DDIM, or the flow SDE), also that of the log-probabilities."""
        return self.backbone.schedule(self.config.sampling.num_inference_steps)

    def items(self, prompts: Sequence[str]) -> Sequence[Any]:
        """What rounds draw from in seeded epochs: the prompts (online methods)."""
        return prompts

    @abstractmethod
    def collect(self, items: Sequence[Any], generator: torch.Generator) -> Collected:
        """Sample (or read) this process's share of a round."""

    def prepare(self, records: Records) -> Records:
        """Runs on the round's gathered records, identically on every process."""
        return records

    @abstractmethod
    def loss(self, backbone: Backbone, schedule: Schedule, records: Records) -> LossOutput:
        """The loss of a micro-batch of records (policy with gradient, reference without)."""

    def state_dict(self) -> dict[str, Any]:
        """State carried from round to round (JSON-serialisable), saved in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` on resume."""
