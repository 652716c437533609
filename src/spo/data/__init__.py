"""Data sources: prompt lists and Pick-a-Pic-format preference pairs."""

from .pickapic import (
    REQUIRED_COLUMNS,
    PreferenceDataError,
    caption_weights,
    decode_image,
    is_preference_data,
    load_captions,
    load_pair,
    load_preference_split,
    parse_labels,
)
from .prompts import PromptsError, load_prompt_set, load_prompts

__all__ = [
    "REQUIRED_COLUMNS",
    "PreferenceDataError",
    "PromptsError",
    "caption_weights",
    "decode_image",
    "is_preference_data",
    "load_captions",
    "load_prompt_set",
    "load_pair",
    "load_preference_split",
    "load_prompts",
    "parse_labels",
]
