"""Errors with messages meant for users (the CLI prints them without a traceback)."""


class ModelLoadError(RuntimeError):
    """A model could not be loaded from the given directory, file or hub id."""
