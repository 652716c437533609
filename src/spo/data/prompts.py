"""Prompt lists: a text file with one prompt per line, a JSON list (of strings, or of objects with a
``caption`` as the release's ``4k_training_prompts.json``), or JSON Lines with a ``caption``."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SPOError


class PromptsError(SPOError, ValueError):
    """A prompts file is missing, unreadable, empty or malformed."""


CAPTION_KEY = "caption"


def load_prompts(path: str | Path) -> list[str]:
    """Read prompts from ``path``:

    - a JSON list (``.json``, or text starting with ``[``) of strings, or of objects each holding a
      ``"caption"`` string: the authors' release ships its 4k Pick-a-Pic training prompts as
      ``[{"caption": ..., "trainset_idx": ...}, ...]`` and reads ``caption``;
    - JSON Lines (``.jsonl``, or text whose first line is a JSON object): one object with a
      ``"caption"`` per line;
    - else plain text, one prompt per line.

    Blank prompts are skipped; order and duplicates are kept (the release's data set keeps
    them). Any problem raises :class:`PromptsError` naming the file (and the entry). The built-in
    sets ``toy:training-prompts`` and ``toy:validation-prompts`` are the toy grammar's.
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
    suffix = p.suffix.lower()
    if suffix == ".jsonl" or (suffix not in (".json", ".txt") and _first_line_is_object(stripped)):
        entries = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise PromptsError(f"prompts file {str(p)!r}, line {number}: not valid JSON: {err}") from None
        prompts = _captions(entries, p, "line")
    elif suffix == ".json" or stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PromptsError(f"prompts file {str(p)!r} is not valid JSON: {err}") from err
        if not isinstance(data, list):
            raise PromptsError(f"prompts file {str(p)!r} must hold a JSON list of strings or of objects with "
                               f"a {CAPTION_KEY!r}")
        prompts = _captions(data, p, "entry")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptsError(f"prompts file {str(p)!r} holds no prompt")
    return prompts


def _first_line_is_object(text: str) -> bool:
    """Whether the first line of ``text`` is a JSON object (a JSON Lines file without the suffix)."""
    try:
        return isinstance(json.loads(text.split("\n", 1)[0]), dict)
    except json.JSONDecodeError:
        return False


def _captions(entries: list[object], path: Path, unit: str) -> list[str]:
    """The prompts of JSON entries: strings as they are, objects by their ``caption`` (entries
    numbered from 1 in errors, as lines are)."""
    prompts = []
    for number, entry in enumerate(entries, start=1):
        if isinstance(entry, dict):
            entry = entry.get(CAPTION_KEY)
            if not isinstance(entry, str):
                raise PromptsError(f"prompts file {str(path)!r}, {unit} {number}: an object needs a string "
                                   f"{CAPTION_KEY!r} (the release's format: {{\"caption\": ...}})")
        elif not isinstance(entry, str):
            raise PromptsError(f"prompts file {str(path)!r}, {unit} {number}: expected a string or an object with "
                               f"a {CAPTION_KEY!r}, got {type(entry).__name__}")
        if entry.strip():
            prompts.append(entry.strip())
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

