"""Data sources: prompt lists (and, later, preference pairs)."""

from .prompts import PromptsError, load_prompts

__all__ = ["PromptsError", "load_prompts"]
