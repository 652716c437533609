"""spo.files: the one atomic-write helper (a temporary file beside the target, then one rename),
and a check that no other module of spo writes its own temporary file and renames it."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

from spo.files import atomic_directory, atomic_path, atomic_write_bytes, atomic_write_text

SRC = Path(__file__).resolve().parents[1] / "src" / "spo"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_writes_creates_parents_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "out.json"
    assert atomic_write_text(path, "first\n") == path
    assert path.read_text() == "first\n"
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()  # as readable as a plainly written file
    atomic_write_text(path, "second: \u00e9\n", fsync=True)
    assert path.read_text(encoding="utf-8") == "second: \u00e9\n"
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert os.listdir(path.parent) == ["out.json"]  # no temporary file left
    with pytest.raises(FileNotFoundError):
        atomic_write_text(tmp_path / "missing" / "x.txt", "x", parents=False)
    assert not (tmp_path / "missing").exists()


def test_a_reader_sees_the_old_content_until_the_rename(tmp_path: Path) -> None:
    path = tmp_path / "pools.pt"
    atomic_write_text(path, "old")
    with atomic_path(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".pools.pt.") and tmp.suffix == ".tmp"
        assert tmp.exists()  # reserved: two writers never share a temporary file
        torch.save({"x": torch.arange(3)}, tmp)
        assert path.read_text() == "old"
    assert torch.load(path, weights_only=True)["x"].tolist() == [0, 1, 2]
    assert os.listdir(tmp_path) == ["pools.pt"]


def test_a_failing_writer_keeps_the_previous_content(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    atomic_write_text(path, "good")
    with pytest.raises(RuntimeError, match="writer broke"), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer broke")
    assert path.read_text() == "good" and os.listdir(tmp_path) == ["config.yaml"]


def test_a_failing_rename_keeps_the_previous_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "eval.json"
    atomic_write_text(path, "good")

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new", fsync=True)
    assert path.read_text() == "good" and os.listdir(tmp_path) == ["eval.json"]


def test_atomic_directory(tmp_path: Path) -> None:
    target = tmp_path / "models" / "base"
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "base.partial").mkdir()  # a killed run's leftover
    (tmp_path / "models" / "base.partial" / "stale").write_text("x")
    with atomic_directory(target) as partial:
        assert partial == target.with_name("base.partial") and not partial.exists()
        partial.mkdir()
        (partial / "model.json").write_text("1")
    assert os.listdir(target) == ["model.json"] and os.listdir(target.parent) == ["base"]
    with pytest.raises(RuntimeError, match="save broke"), atomic_directory(target) as partial:
        partial.mkdir()
        (partial / "model.json").write_text("2")
        raise RuntimeError("save broke")
    assert (target / "model.json").read_text() == "1" and os.listdir(target.parent) == ["base"]
    with atomic_directory(target) as partial:  # replaces a directory that is there
        partial.mkdir()
        (partial / "other.json").write_text("3")
    assert os.listdir(target) == ["other.json"]


# ------------------------------------------------------------------ no hand-written copies of it
#: Renames that are not a single writer's temporary file and so stay where they are:
#: ``training/checkpoint.py`` builds a checkpoint directory in stages on every process
#: (``write_everywhere``: the main process makes ``.tmp-round-N``, every process writes its
#: files into it, the main process writes the manifest and renames it), which the one-process
#: :func:`spo.files.atomic_directory` cannot express (``list_checkpoints`` ignores a ``.tmp-``
#: leftover).
ALLOWED = {("training/checkpoint.py", "os.replace"), ("training/checkpoint.py", "'.tmp-'")}


def _own_renames(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for each rename, temporary file or ``.tmp``/``.partial`` name in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            name = node.func.attr
            if owner in ("os", "shutil", "tempfile") and name in (
                "replace", "rename", "renames", "move", "mkstemp", "NamedTemporaryFile"
            ):
                found.append((node.lineno, f"{owner}.{name}"))
            elif name == "rename" and owner not in ("os", "shutil"):
                found.append((node.lineno, ".rename"))  # Path.rename
            # Path.replace(target): one argument, no keywords (str.replace takes two;
            # dataclasses.replace and Records.replace take keywords)
            elif name == "replace" and len(node.args) == 1 and not node.keywords and owner != "dataclasses":
                found.append((node.lineno, ".replace"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if ".tmp" in node.value or ".partial" in node.value:
                found.append((node.lineno, repr(node.value)))
    return found


def test_no_module_writes_its_own_temporary_file_and_renames_it() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == "files.py":
            continue
        for line, what in _own_renames(ast.parse(path.read_text(encoding="utf-8"))):
            if (rel, what) not in ALLOWED:
                offenders.append(f"src/spo/{rel}:{line}: {what}")
    assert not offenders, "write through spo.files (atomic_write_text / atomic_path / atomic_directory):\n" + "\n".join(offenders)


def test_the_check_finds_a_hand_written_copy() -> None:
    source = '''
import os
tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
tmp.write_text(text)
tmp.replace(path)
os.replace(a, b)
staging.rename(target)
x = "a b".replace("a", "b")
y = dataclasses.replace(config, train=1)
'''
    found = [what for _, what in _own_renames(ast.parse(source))]
    assert found.count(".replace") == 1 and "os.replace" in found and ".rename" in found
    assert any(".tmp" in w for w in found)
