"""Evaluation scorers, one module each, found by name (see :mod:`.base`): PickScore, HPSv2 and
HPSv2.1, ImageReward, the LAION aesthetic predictor v2."""

from .base import Scorer, ScorerSpec, ScorerSpecError, available_scorers, load_scorers, scorer_class

__all__ = ["Scorer", "ScorerSpec", "ScorerSpecError", "available_scorers", "load_scorers", "scorer_class"]
