"""Atomic writes: a reader (or a rerun after a kill) sees the old content or the new, never half a file.

The new content goes to a temporary file beside the target, hidden and named
``.NAME.XXXXXXXX.tmp`` (so globs such as ``*.png`` or ``*.json`` never see it), which
:func:`os.replace` then puts in place in one step (atomic within a file system). If the writer
fails, the temporary file is removed and the previous content stays. The temporary file is made
with mode ``0o666`` less the umask, as a plain ``open`` makes it, so the result is as readable as
any file. ``fsync=True`` also flushes the content to the disk before the rename (a crash of the
machine then leaves the old or the new content, not an empty file).

- :func:`atomic_write_text` / :func:`atomic_write_bytes`: the whole content at once;
- :func:`atomic_path`: a temporary path for writers that take a path (``torch.save``,
  ``safetensors.torch.save_file``, ``PIL.Image.save``);
- :func:`atomic_directory`: the same for a directory (``save_pretrained``, ``shutil.copytree``):
  built at ``NAME.partial``, then put in place with one rename.

This module is on the lowest floor: it imports nothing from ``spo``. Every temporary-file-then-
rename in the package goes through it (``tests/test_files.py`` checks).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_directory", "atomic_path", "atomic_write_bytes", "atomic_write_text"]


def _temporary_file(path: Path) -> Path:
    """Create a new, empty temporary file beside ``path`` and return its path."""
    while True:
        tmp = path.with_name(f".{path.name[:200]}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync: bool = False, parents: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (an empty file, there already) for the caller to write;
    when the block ends without an exception, the file replaces ``path`` in one rename; when it
    raises, the file is removed, ``path`` is left as it was and the exception goes on.

    ``fsync``: flush the file to the disk before the rename. ``parents``: create missing parent
    directories first."""
    path = Path(path)
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_file(path)
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8", fsync: bool = False,
                      parents: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`); return the path."""
    with atomic_path(path, fsync=fsync, parents=parents) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = False, parents: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); return the path."""
    with atomic_path(path, fsync=fsync, parents=parents) as tmp:
        tmp.write_bytes(data)
    return Path(path)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], *, parents: bool = True) -> Iterator[Path]:
    """Yield ``path`` with ``.partial`` appended to its name, not there yet (a leftover from a killed
    run is removed), for the caller to create and fill; when the block ends without an exception,
    the old ``path`` (if any) is removed and the new directory renamed to it; when it raises, the
    partial directory is removed and ``path`` is left as it was.

    Directories cannot be swapped in one step: between the removal and the rename ``path`` is
    missing, so readers look for a file the writer puts in last, not for the directory."""
    path = Path(path)
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        yield partial
        shutil.rmtree(path, ignore_errors=True)
        partial.rename(path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
