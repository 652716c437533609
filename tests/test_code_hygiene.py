"""Code hygiene of src/spo, checked on its syntax trees: no module imports a private name
(``_name``) defined in another package. A helper that another package needs is public where it
is defined (or moves to where it belongs); inside one package (``spo.toy``'s modules, say) private
helpers may be shared."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module(path: Path, src: Path) -> tuple[str, bool]:
    """(dotted module name, whether it is a package's ``__init__``) of a file under ``src``."""
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _package_of(module: str, src: Path) -> str:
    """The package a module belongs to (a package is its own)."""
    return module if (src / Path(*module.split(".")) / "__init__.py").is_file() else module.rpartition(".")[0]


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(path: Path, source: str, src: Path = SRC) -> list[str]:
    """``file:line: name from module`` for each private name ``path`` imports from a spo module
    of another package than its own."""
    module, is_package = _module(path, src)
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            if origin.split(".")[0] != "spo":
                continue
            for alias in node.names:
                if not _private(alias.name):
                    continue
                # ``from . import _module`` names a module of ``origin``; anything else is defined in ``origin``
                defined_in = _package_of(origin, src)
                if (src / Path(*origin.split("."), alias.name + ".py")).is_file():
                    defined_in = origin
                if defined_in != package:
                    found.append((node.lineno, f"{alias.name} from {origin}"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "spo" and any(_private(p) for p in parts):
                    first = next(i for i, p in enumerate(parts) if _private(p))
                    if ".".join(parts[:first]) != package:
                        found.append((node.lineno, alias.name))
    return [f"{path.relative_to(src.parent).as_posix()}:{line}: {what}" for line, what in sorted(found)]


def test_no_private_name_is_imported_from_another_package() -> None:
    offenders = [hit for path in sorted((SRC / "spo").rglob("*.py"))
                 for hit in private_imports(path, path.read_text(encoding="utf-8"))]
    assert not offenders, "private names imported from another package (make them public):\n" + "\n".join(offenders)


def test_the_check_finds_one(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for package in ("spo", "spo/backbones", "spo/toy"):
        (src / package).mkdir(parents=True)
        (src / package / "__init__.py").write_text("")
    (src / "spo" / "backbones" / "tiny.py").write_text("def _helper(): ...\n")
    (src / "spo" / "toy" / "oracles.py").write_text("def _split(): ...\n")
    model = src / "spo" / "toy" / "model.py"
    source = (
        "from ..backbones.tiny import _helper\n"  # another package: found
        "from spo.backbones.tiny import _helper as h\n"  # absolute: found
        "from .oracles import _split\n"  # the same package: fine
        "from ..backbones import tiny\n"  # public: fine
        "def f():\n    from ..backbones import _private_thing\n"  # inside a function: found
        "import spo.backbones._hidden\n"  # found
    )
    found = private_imports(model, source, src)
    assert [hit.split(": ", 1)[0] for hit in found] == [
        "src/spo/toy/model.py:1", "src/spo/toy/model.py:2", "src/spo/toy/model.py:6", "src/spo/toy/model.py:7"
    ], found
