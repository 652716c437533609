"""The layering contract (docs of the target: /work/shared/design/layering.md, issue 22): each part
of ``src/spo`` imports only from its own floor or below, and no two modules import each other.

Every import counts: at module level and inside functions, ``import spo.x`` and ``from .x import
y`` alike. A top-level module that :data:`FLOORS` does not name stands on floor 1 (it may import
nothing of the project); give it a floor here when it needs one.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import spo

SRC = Path(spo.__file__).parent
PACKAGE = "spo"

#: floor -> the parts of ``spo`` (top-level packages and modules) standing on it; a part imports
#: only parts of its floor or below
FLOORS: dict[int, tuple[str, ...]] = {
    1: ("diffusion", "config", "errors", "images", "registry", "files"),
    2: ("backbones", "weights", "builtin"),
    3: ("sampling", "preference", "data"),
    4: ("objectives",),
    5: ("training",),
    6: ("evaluation",),
    7: ("toy",),
    8: ("cli", "__main__"),
}
FLOOR_OF = {part: floor for floor, parts in FLOORS.items() for part in parts}
DEFAULT_FLOOR = 1
ROOT_FLOOR = 0  # spo/__init__.py: imports nothing of the project


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, e.g. "spo.training.trainer"
    target: str  # the imported module, e.g. "spo.preference.spm"
    file: Path
    line: int
    text: str  # the statement as written

    def where(self) -> str:
        return f"{self.file.relative_to(SRC.parent)}:{self.line}: {self.text}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    """Whether the dotted ``name`` (``spo.x.y``) is a module or package of ``src/spo``."""
    path = SRC.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path) -> Iterator[Import]:
    source = module_name(path)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):  # module level and inside functions and classes
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    yield Import(source, alias.name, path, node.lineno, ast.unparse(node))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = source.split(".") if is_package else source.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not (module == PACKAGE or module.startswith(PACKAGE + ".")):
                continue
            for alias in node.names:  # `from . import x` / `from .pkg import module` import modules
                target = f"{module}.{alias.name}"
                yield Import(source, target if is_module(target) else module, path, node.lineno, ast.unparse(node))


def all_imports() -> list[Import]:
    """Every import of a module of ``spo`` by a module of ``spo`` (one per statement and target)."""
    return list(dict.fromkeys(imp for path in sorted(SRC.rglob("*.py")) for imp in _imports(path)))


def part_of(module: str) -> str | None:
    """``spo.training.trainer`` -> ``training``; ``spo`` itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def floor_of(module: str) -> int:
    part = part_of(module)
    return ROOT_FLOOR if part is None else FLOOR_OF.get(part, DEFAULT_FLOOR)


def test_the_walk_sees_every_kind_of_import() -> None:
    """The walk itself: relative and absolute, module level and inside functions."""
    found = {(i.source, i.target) for i in all_imports()}
    assert ("spo.training.trainer", "spo.training.setup") in found  # from .setup import ...
    assert ("spo.training.trainer", "spo.preference.spm") in found  # from ..preference.spm import ...
    assert any(i.source == "spo.cli" and part_of(i.target) == "training" for i in all_imports())  # in a function
    assert len({path for path in SRC.rglob("*.py")}) > 50


def test_no_import_runs_up_a_floor() -> None:
    upward = [i for i in all_imports() if floor_of(i.target) > floor_of(i.source)]
    message = "\n".join(
        f"{i.where()}  ({part_of(i.source) or PACKAGE}, floor {floor_of(i.source)} -> "
        f"{part_of(i.target)}, floor {floor_of(i.target)})" for i in upward
    )
    assert not upward, f"{len(upward)} imports run up the floors (tests/test_layers.py FLOORS):\n{message}"


def test_no_two_modules_import_each_other() -> None:
    imports = all_imports()
    edges: dict[tuple[str, str], Import] = {}
    for i in imports:
        if i.source != i.target:
            edges.setdefault((i.source, i.target), i)
    pairs = sorted({tuple(sorted(pair)) for pair in edges if (pair[1], pair[0]) in edges})
    message = "\n".join(f"{a} <-> {b}:\n  {edges[(a, b)].where()}\n  {edges[(b, a)].where()}" for a, b in pairs)
    assert not pairs, f"{len(pairs)} pairs of modules import each other:\n{message}"


def test_every_part_has_a_floor() -> None:
    """A new top-level module stands on floor 1 unless FLOORS says otherwise; a new package must be named."""
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    assert packages <= set(FLOOR_OF), f"packages without a floor in tests/test_layers.py: {sorted(packages - set(FLOOR_OF))}"
