"""Data sources: prompt lists and Pick-a-Pic-format preference pairs."""

from .pickapic import (
    REQUIRED_COLUMNS,
    PreferenceDataError,
    caption_weights,
    decode_image,
    load_pair,
    load_preference_split,
    parse_labels,
)
from .prompts import PromptsError, load_prompts

__all__ = [
    "REQUIRED_COLUMNS",
    "PreferenceDataError",
    "PromptsError",
    "caption_weights",
    "decode_image",
    "load_pair",
    "load_preference_split",
    "load_prompts",
    "parse_labels",
]
