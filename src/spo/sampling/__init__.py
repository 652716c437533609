"""Rollouts: plain DDIM sampling and candidate-pool rollouts (SPO / MSPO) producing records."""

from .pairs import PairChoice, choose_continuation, choose_pairs, softmax_gap
from .plain import Trajectory, ddim_sample
from .pools import (PoolSampler, PoolScorer, Rollout, RolloutStats, branch_steps, divert_index, pool_segments,
                    without_autocast)
from .records import Records, TransitionRecords

__all__ = [
    "PairChoice",
    "PoolSampler",
    "PoolScorer",
    "Rollout",
    "RolloutStats",
    "Records",
    "TransitionRecords",
    "Trajectory",
    "branch_steps",
    "pool_segments",
    "choose_continuation",
    "choose_pairs",
    "ddim_sample",
    "divert_index",
    "softmax_gap",
    "without_autocast",
]
