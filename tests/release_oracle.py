"""The authors' release as a test oracle: its own modules, imported from ../shared/reference.

The release (RockeyCoss/SPO at 27a8642, MIT) is read where the workplace keeps it, never copied
into the project. Its Python package is also called ``spo``, so its modules are imported here
under the package name ``spo_release``. Only modules that import in this project's environment
are loaded this way (the DDIM step with log-prob, the candidate-pool pipelines, the pair rule);
the time-conditioned CLIP needs transformers 4.x and is compared through fixtures instead
(tools/release_parity).

``SPO_RELEASE_DIR`` overrides where the release is looked for. Where it is missing, the parity
tests skip, saying so, unless ``SPO_REQUIRE_RELEASE=1`` (set by ``.ci/run``): then they fail.
"""

from __future__ import annotations

import ast
import importlib
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
RELEASE = Path(os.environ.get("SPO_RELEASE_DIR", REPO.parent / "shared" / "reference" / "spo-release"))
TRAINING = RELEASE / "spo_training_and_inference"
PACKAGE = "spo_release"


def require_release() -> Path:
    """The release's directory; skips (or, with ``SPO_REQUIRE_RELEASE=1``, fails) without it."""
    if not (TRAINING / "spo").is_dir():
        message = f"the authors' release is not at {RELEASE} (set SPO_RELEASE_DIR)"
        if os.environ.get("SPO_REQUIRE_RELEASE") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return RELEASE


def _package(name: str, path: Path) -> types.ModuleType:
    """A namespace for one of the release's packages without running its ``__init__`` (which
    imports mmengine, torchvision and transformers 4.x for modules not needed here)."""
    if name in sys.modules:
        return sys.modules[name]
    module = types.ModuleType(name)
    module.__path__ = [str(path)]  # type: ignore[attr-defined]
    sys.modules[name] = module
    return module


class _Registry:
    """Stands in for mmengine's ``Registry`` (the release's builders only register functions)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def register_module(self, *args: Any, **kwargs: Any) -> Any:
        return lambda obj: obj


def release_module(dotted: str) -> types.ModuleType:
    """Import ``spo.<dotted>`` of the release as ``spo_release.<dotted>``.

    ``custom_diffusers`` is imported as the release has it (its ``__init__`` loads both pool
    pipelines); ``preference_models`` without its ``__init__`` and with a stand-in ``builder``
    (the registry the pair rule registers itself in)."""
    require_release()
    root = TRAINING / "spo"
    _package(PACKAGE, root)
    if dotted.startswith("preference_models"):
        _package(f"{PACKAGE}.preference_models", root / "preference_models")
        stub_builder(f"{PACKAGE}.preference_models.builder")
    return importlib.import_module(f"{PACKAGE}.{dotted}")


def stub_builder(name: str) -> None:
    """Register a stand-in for a release's ``preference_models.builder`` module (mmengine's
    registries, in which its compare functions and model builders register themselves)."""
    if name not in sys.modules:
        stub = types.ModuleType(name)
        stub.COMPARE_FUNCS = _Registry("compare_funcs")  # type: ignore[attr-defined]
        stub.PREFERENCE_MODEL_FUNC_BUILDERS = _Registry("preference_model_func_builders")  # type: ignore[attr-defined]
        sys.modules[name] = stub


def release_statements(script: str, first_target: str, last_target: str) -> tuple[str, int, int]:
    """The source of the statements of the release's ``script`` (relative to
    spo_training_and_inference) from the assignment to ``first_target`` through the one to
    ``last_target`` (inclusive), found by parsing the script (not by line numbers), with their
    line span: lines of the release run as they are written there."""
    require_release()
    path = TRAINING / script
    source = path.read_text()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        names = [_target(s) for s in body]
        if first_target in names and last_target in names:
            start, end = body[names.index(first_target)], body[names.index(last_target)]
            lines = source.splitlines()[start.lineno - 1 : end.end_lineno]
            indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
            return "\n".join(line[indent:] for line in lines), start.lineno, end.end_lineno or start.lineno
    raise AssertionError(f"{path}: no block assigning {first_target!r} ... {last_target!r}")


def _target(statement: ast.stmt) -> str | None:
    if isinstance(statement, ast.Assign) and len(statement.targets) == 1 and isinstance(statement.targets[0], ast.Name):
        return statement.targets[0].id
    return None
