"""Errors with messages meant for users (the CLI prints them without a traceback)."""


class SPOError(Exception):
    """The base of errors whose message is meant for users: the CLI prints ``error: <message>``
    without a traceback and exits with :attr:`exit_code`.

    Each subclass keeps its builtin base too (``class ConfigError(SPOError, ValueError)``), so
    code that catches ``ValueError`` or ``RuntimeError`` still catches it.
    """

    #: the CLI's exit status: 2 for what the user gave (a config, a path, a prompt file, a model),
    #: 1 for what is not the user's input (a failed write: the disk or the file system)
    exit_code: int = 2


class ModelLoadError(SPOError, RuntimeError):
    """A model could not be loaded from the given directory, file or hub id."""


def local_path(path: str, what: str, error: type[ModelLoadError] = ModelLoadError, noun: str = "directory"):  # noqa: ANN201
    """The local path ``path`` names, or ``None`` when it reads as a hub id (``owner/name``).

    A path reads as local when it is absolute, starts with ``.`` or ``~``, exists, or has more than
    one ``/``; a local path that does not exist raises ``error`` naming ``what`` and the path.
    """
    from pathlib import Path

    p = Path(path).expanduser()
    if not (p.is_absolute() or path.startswith((".", "~")) or p.exists() or path.count("/") > 1):
        return None
    if not p.exists():
        raise error(f"{what}: no such {noun} {str(p)!r}")
    return p
