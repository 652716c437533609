"""The evaluation scorer interface: images (and their prompts) in, one number per image out.

A scorer is one module of :mod:`spo.evaluation.scorers`, found by name through
:data:`spo.registry.SCORERS`: ``scorer_class("hpsv2")`` imports ``spo.evaluation.scorers.hpsv2``
and reads its ``SCORER``. Scorers that live elsewhere register with ``SCORERS.register`` (or the
``spo.scorers`` entry-point group); the toy world's oracles, which need no weights, are handed to
the evaluator directly.

On the command line a scorer is ``NAME=WEIGHTS[,OPTION=VALUE...]``: ``WEIGHTS`` is a local path or
a hub id, never pickled code (safetensors, or ``torch.load(weights_only=True)``); the options
name the auxiliary parts a checkpoint does not carry (a tokenizer, a processor, a CLIP tower).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...errors import ModelLoadError, SPOError
from ...registry import SCORERS, RegistryError


class ScorerSpecError(SPOError, ValueError):
    """A ``--scorer`` value that names no scorer, no weights or an unknown option."""


class Scorer(ABC):
    """Scores a batch of images against their prompts: ``score(images, prompts) -> (B,)``.

    Class attributes document the metric: ``name`` (registry key and metric key), ``label`` (for
    tables), ``expected_range`` (what typical values look like, with the source), ``weights_help``
    (what ``WEIGHTS`` is), ``options`` (option name -> (default or None, help)), and
    ``higher_is_better``.
    """

    name: ClassVar[str]
    label: ClassVar[str]
    expected_range: ClassVar[str] = ""
    weights_help: ClassVar[str] = ""
    options: ClassVar[dict[str, tuple[str | None, str]]] = {}
    higher_is_better: ClassVar[bool] = True

    @classmethod
    @abstractmethod
    def load(cls, weights: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             **options: str) -> "Scorer":
        """Load from ``weights`` (a local path or hub id) and ``options`` (strings, see
        :attr:`options`); raise :class:`~spo.errors.ModelLoadError` with a one-line message naming
        the offending path or id."""

    @abstractmethod
    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """``images``: (B, 3, H, W) floats in [-1, 1] (any size, any device); ``prompts``: B
        strings. Returns (B,) scores on the CPU (float32 or float64; calling the scorer returns
        float64), computed without gradients."""

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")
        with torch.no_grad():
            return self.score(images, list(prompts)).detach().cpu().double()


@dataclass
class ScorerSpec:
    """A parsed ``NAME=WEIGHTS[,OPTION=VALUE...]``."""

    name: str
    weights: str
    options: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "ScorerSpec":
        name, sep, rest = text.partition("=")
        name = name.strip()
        if not name or not sep or not rest.strip():
            raise ScorerSpecError(f"--scorer {text!r}: expected NAME=WEIGHTS[,OPTION=VALUE...]")
        weights, *pairs = rest.split(",")
        options: dict[str, str] = {}
        for pair in pairs:
            key, eq, value = pair.partition("=")
            if not eq or not key.strip():
                raise ScorerSpecError(f"--scorer {text!r}: option {pair!r} is not OPTION=VALUE")
            options[key.strip()] = value.strip()
        spec = cls(name, weights.strip(), options)
        klass = scorer_class(name)
        unknown = sorted(set(options) - set(klass.options))
        if unknown:
            raise ScorerSpecError(f"--scorer {text!r}: unknown option(s) {unknown} for {name}; "
                                  f"known: {sorted(klass.options) or 'none'}")
        return spec

    def load(self, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Scorer:
        """The scorer, its networks in ``dtype`` (embeddings normalised, heads and scores in
        fp32). Below fp32 its metric is named ``NAME@DTYPE`` (``pickscore@bfloat16``), so that
        its scores are never mixed with, or taken for, the fp32 ones (stored scores are reused
        by metric name)."""
        klass = scorer_class(self.name)
        options = {k: d for k, (d, _) in klass.options.items() if d is not None}
        options.update(self.options)
        scorer = klass.load(self.weights, device=device, dtype=dtype, **options)
        if dtype != torch.float32:
            precision = str(dtype).removeprefix("torch.")
            scorer.name = f"{klass.name}@{precision}"  # type: ignore[misc]  (an instance's own metric key)
            scorer.label = f"{klass.label} ({precision})"  # type: ignore[misc]
        return scorer


def available_scorers() -> list[str]:
    """The names of the scorers: modules of :mod:`spo.evaluation.scorers` and plugins."""
    return SCORERS.names()


def scorer_class(name: str) -> type[Scorer]:
    """The :class:`Scorer` subclass called ``name`` (:data:`spo.registry.SCORERS`: the module
    ``spo.evaluation.scorers.<name>``'s ``SCORER``, or a registered one)."""
    try:
        return SCORERS.get(name)  # type: ignore[no-any-return]
    except RegistryError:
        raise ScorerSpecError(f"unknown scorer {name!r}; available: {available_scorers()}") from None


def load_scorers(specs: Sequence[ScorerSpec], *, wanted: Sequence[str] | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 log: Any = print) -> list[Scorer]:
    """Load every spec; for each name in ``wanted`` without a spec, ``log`` one line saying it is
    skipped (no weights given) instead of failing."""
    given = {s.name for s in specs}
    for name in wanted or ():
        if name not in given:
            klass = scorer_class(name)
            log(f"skipped {klass.label}: no weights given (--scorer {name}=PATH_OR_HUB_ID; {klass.weights_help})")
    return [spec.load(device=device, dtype=dtype) for spec in specs]


__all__ = ["ModelLoadError", "Scorer", "ScorerSpec", "ScorerSpecError", "available_scorers", "load_scorers", "scorer_class"]
