"""One way to find a method, a backbone or a scorer by name: :class:`Registry`.

A plugin is a class with a ``name`` (methods, scorers) or ``kind`` (backbones) attribute. It is
found, in this order:

1. registered in the running process: ``METHODS.register(MyMethod)`` (a test module, a notebook,
   a user's script);
2. as a module of its home package named after it that exposes the class as the package's
   attribute (``spo/objectives/ddpo.py`` with ``METHOD = DDPOMethod``): a new built-in is one new
   file, nothing else to edit;
3. through an entry point of the registry's group in an installed package's metadata
   (``[project.entry-points."spo.backbones"] toy = "spo.toy.model:ToyBackbone"``): the toy world
   and third-party packages register this way, without a lower package naming them.

Packages are named here by string and imported on first use, as entry points are: this module
imports nothing of the project, so every floor may ask it.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from importlib import metadata
from typing import Any, Generic, TypeVar

from .errors import SPOError

__all__ = ["BACKBONES", "METHODS", "SCORERS", "Registry", "RegistryError"]

T = TypeVar("T")


class RegistryError(SPOError, ValueError):
    """A name that no plugin of the registry's kind answers to."""

    exit_code = 2


class Registry(Generic[T]):
    """Plugins of one kind, by name.

    Args:
        what: what the name is, for messages (``"objective.name"``).
        package: the home package whose modules are the built-ins (``"spo.objectives"``).
        attribute: the module attribute holding a built-in's class (``"METHOD"``).
        group: the entry-point group of plugins from other packages (``"spo.methods"``).
        key: the class attribute that holds its name (``"name"``, or ``"kind"`` for backbones).
    """

    def __init__(self, what: str, package: str, attribute: str, group: str, key: str = "name") -> None:
        self.what, self.package, self.attribute, self.group, self.key = what, package, attribute, group, key
        self._registered: dict[str, T] = {}
        self._scanned: dict[str, T] | None = None
        self._found: dict[str, T] = {}

    # ------------------------------------------------------------------ registering
    def register(self, plugin: T) -> T:
        """Register ``plugin`` under its own name (usable as a class decorator); a name that is
        already taken by another class is refused."""
        name = getattr(plugin, self.key, None)
        if not isinstance(name, str) or not name:
            raise RegistryError(f"{plugin!r} has no {self.key!r} to register it by")
        current = self._lookup(name)
        if current is not None and current is not plugin:
            raise RegistryError(f"{self.what} {name!r} is already taken by {current!r}")
        self._registered[name] = plugin
        return plugin

    def unregister(self, name: str) -> None:
        """Forget a plugin registered in this process (tests clean up with it)."""
        self._registered.pop(name, None)

    # ------------------------------------------------------------------ finding
    def _builtin(self, name: str) -> T | None:
        if not name.isidentifier():
            return None
        try:
            module = importlib.import_module(f"{self.package}.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"{self.package}.{name}":
                return None
            raise
        return getattr(module, self.attribute, None)

    def _entry_points(self) -> dict[str, Any]:
        return {ep.name: ep for ep in metadata.entry_points(group=self.group)}

    def _lookup(self, name: str) -> T | None:
        if name in self._registered:
            return self._registered[name]
        if name not in self._found:  # a built-in or an entry point, once found, stays (misses are not kept)
            plugin = self._builtin(name)
            if plugin is None:
                entry = self._entry_points().get(name)
                plugin = entry.load() if entry is not None else None
            if plugin is None:
                return None
            self._found[name] = plugin
        return self._found[name]

    def _scan(self) -> dict[str, T]:
        """The built-ins, each module of the home package with the attribute (imported once)."""
        if self._scanned is None:
            package = importlib.import_module(self.package)
            found: dict[str, T] = {}
            for module in pkgutil.iter_modules(package.__path__):
                if not module.name.startswith("_"):
                    plugin = self._builtin(module.name)
                    if plugin is not None:
                        found[module.name] = plugin
            self._scanned = found
        return self._scanned

    def names(self) -> list[str]:
        """Every name: built-ins (sorted), then entry points and registered plugins."""
        names = sorted(self._scan())
        for name in [*sorted(self._entry_points()), *self._registered]:
            if name not in names:
                names.append(name)
        return names

    def get(self, name: str) -> T:
        """The plugin called ``name``; a :class:`RegistryError` naming the choices (and the
        closest one) otherwise."""
        plugin = self._lookup(name) if isinstance(name, str) else None
        if plugin is None:
            raise RegistryError(self.unknown_message(name))
        if getattr(plugin, self.key, None) != name:
            raise RegistryError(f"{self.what} {name!r} is served by {plugin!r}, whose {self.key} is "
                                f"{getattr(plugin, self.key, None)!r}")
        return plugin

    __getitem__ = get

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._lookup(name) is not None

    def unknown_message(self, name: Any) -> str:
        """``{what} must be one of 'a', 'b', got 'x' (str); did you mean 'a'?``: the form of every
        other choice error of the configuration."""
        choices = self.names()
        shown = "null" if name is None else f"{name!r} ({type(name).__name__})"
        message = f"{self.what} must be one of {', '.join(repr(c) for c in choices)}, got {shown}"
        if isinstance(name, str):
            close = difflib.get_close_matches(name, choices, n=1)
            if close:
                message += f"; did you mean '{close[0]}'?"
        return message


#: the training methods (``objective.name``): modules of :mod:`spo.objectives`
METHODS: Registry[Any] = Registry("objective.name", "spo.objectives", "METHOD", "spo.methods")
#: the diffusion backbones (``model.backbone``): modules of :mod:`spo.backbones`, and the toy world's
BACKBONES: Registry[Any] = Registry("model.backbone", "spo.backbones", "BACKBONE", "spo.backbones", key="kind")
#: the evaluation scorers (``--scorer NAME=...``): modules of :mod:`spo.evaluation.scorers`
SCORERS: Registry[Any] = Registry("scorer", "spo.evaluation.scorers", "SCORER", "spo.scorers")
