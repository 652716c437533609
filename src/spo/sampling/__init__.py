"""Rollouts: plain DDIM sampling (and, later, candidate pools)."""

from .plain import ddim_sample

__all__ = ["ddim_sample"]
