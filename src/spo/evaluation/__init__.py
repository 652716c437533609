"""Generation on prompt sets with fixed seeds (and, later, scoring and reports)."""

from .generate import GenerationResult, generate

__all__ = ["GenerationResult", "generate"]
