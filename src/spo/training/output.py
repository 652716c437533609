"""Checks on a run's ``--output`` before anything is written there."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: what a run leaves in its directory: a directory holding one of these is another run's
RUN_FILES = ("checkpoints", "metrics.jsonl", "lora", "unet", "spm", "reward", "logs", "eval.json")


def output_problem(run_dir: str | Path, *, resume: bool) -> str | None:
    """Why ``run_dir`` cannot be a run's output, or ``None``: it is a file, lies under a file,
    cannot be written, or (without ``resume``) already holds another run's files. Other files
    (a config the user keeps there) do not count."""
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        return f"--output {str(path)!r} is a file, not a directory"
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"--output {str(path)!r} lies under {str(existing)!r}, which is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"--output {str(path)!r}: {str(existing)!r} is not writable"
    if not resume and path.is_dir():
        found = [name for name in RUN_FILES if (path / name).exists()]
        if found:
            return (f"--output {str(path)!r} holds another run ({', '.join(found)}); pass --resume to continue it, "
                    "or choose another --output")
    return None


@contextmanager
def removed_on_failure(run_dir: str | Path, main_process: bool = True) -> Iterator[None]:
    """A start that fails inside this block leaves nothing behind: the main process removes the
    run directory when the block created it, or else what the block added to it."""
    path = Path(run_dir)
    created = not path.exists()
    found = set() if created or not path.is_dir() else {p.name for p in path.iterdir()}
    try:
        yield
    except BaseException:
        if main_process and path.is_dir():
            if created:
                shutil.rmtree(path, ignore_errors=True)
            else:
                for added in (p for p in path.iterdir() if p.name not in found):
                    if added.is_dir():
                        shutil.rmtree(added, ignore_errors=True)
                    else:
                        added.unlink(missing_ok=True)
        raise
