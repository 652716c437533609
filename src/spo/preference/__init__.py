"""Preference models: CLIP scoring (and, with the SPM issue, the step-aware preference model)."""

from .clip_scorer import CLIPScorer, load_clip_parts
from .preprocess import clip_preprocess

__all__ = ["CLIPScorer", "clip_preprocess", "load_clip_parts"]
