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

