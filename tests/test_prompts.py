"""Prompt files: formats and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from spo.data import PromptsError, load_prompts


def test_text_and_json_formats(tmp_path: Path) -> None:
    text = tmp_path / "p.txt"
    text.write_text("a cat\n\n  a dog  \n")
    assert load_prompts(text) == ["a cat", "a dog"]
    js = tmp_path / "p.json"
    js.write_text('["a cat", "", "a dog"]')
    assert load_prompts(js) == ["a cat", "a dog"]


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("empty.txt", "\n \n", "no prompt"),
        ("bad.json", "[1, 2]", "list of strings"),
        ("broken.json", "[\"a\", ", "not valid JSON"),
        ("latin1.txt", b"\xff\xfe\x00bad", "could not be read"),
    ],
)
def test_bad_files(tmp_path: Path, name: str, content: str | bytes, match: str) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(PromptsError, match=match):
        load_prompts(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(PromptsError, match="does not exist"):
        load_prompts(tmp_path / "nope.txt")
    with pytest.raises(PromptsError, match="not a file"):
        load_prompts(tmp_path)
