"""Prompt lists: a text file with one prompt per line, or a JSON list of strings."""

from __future__ import annotations

import json
from pathlib import Path


class PromptsError(ValueError):
    """A prompts file is missing, unreadable, empty or malformed."""


def load_prompts(path: str | Path) -> list[str]:
    """Read prompts from ``path``: a ``.json`` file holding a list of strings, else one per line.

    Blank lines are skipped. Any problem raises :class:`PromptsError` naming the file. The
    built-in sets ``toy:training-prompts`` and ``toy:validation-prompts`` are the toy grammar's.
    """
    from ..builtin import BuiltinError, builtin_prompts, is_builtin

    if is_builtin(path):
        try:
            return builtin_prompts(str(path))
        except BuiltinError as err:
            raise PromptsError(str(err)) from None
    p = Path(path).expanduser()
    if not p.exists():
        raise PromptsError(f"prompts file {str(p)!r} does not exist")
    if not p.is_file():
        raise PromptsError(f"prompts file {str(p)!r} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PromptsError(f"prompts file {str(p)!r} could not be read: {err}") from err
    stripped = text.lstrip()
    if p.suffix.lower() == ".json" or stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PromptsError(f"prompts file {str(p)!r} is not valid JSON: {err}") from err
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise PromptsError(f"prompts file {str(p)!r} must hold a JSON list of strings")
        prompts = [x.strip() for x in data if x.strip()]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptsError(f"prompts file {str(p)!r} holds no prompt")
    return prompts


def load_prompt_set(source: str | Path, *, split: str = "validation_unique", limit: int | None = None) -> list[str]:
    """An evaluation prompt set: a prompts file or built-in set (:func:`load_prompts`), or the
    captions of Pick-a-Pic-format data (a ``save_to_disk`` directory or parquet files: ``split``,
    duplicates dropped, as the paper's 500 ``validation_unique`` prompts). ``limit`` keeps the
    first N."""
    from ..builtin import is_builtin
    from .pickapic import PreferenceDataError, is_preference_data, load_captions

    if limit is not None and limit < 1:
        raise PromptsError(f"--num-prompts {limit}: must be at least 1")
    if not is_builtin(source) and is_preference_data(source):
        try:
            prompts = load_captions(str(source), split)
        except PreferenceDataError as err:
            raise PromptsError(str(err)) from None
    else:
        prompts = load_prompts(source)
    return prompts[:limit] if limit else prompts

