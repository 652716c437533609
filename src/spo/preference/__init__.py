"""Preference models: CLIP scoring, the step-aware preference model (SPM) and its training."""

from .clip_scorer import CLIPScorer, load_clip_parts
from .loss import pair_accuracy, preference_pair_loss
from .preprocess import clip_preprocess, spm_preprocess
from .spm import StepAwarePreferenceModel, TimestepEmbedder, add_time_modules, reset_time_modules, timestep_embedding

__all__ = [
    "CLIPScorer",
    "StepAwarePreferenceModel",
    "TimestepEmbedder",
    "add_time_modules",
    "clip_preprocess",
    "load_clip_parts",
    "pair_accuracy",
    "preference_pair_loss",
    "reset_time_modules",
    "spm_preprocess",
    "timestep_embedding",
]
