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
        ("bad.json", "[1, 2]", "entry 1: expected a string or an object"),
        ("dict.json", '{"caption": "a cat"}', "JSON list of strings or of objects"),
        ("nocaption.json", '[{"caption": "a cat"}, {"text": "a dog"}]', "entry 2: an object needs a string 'caption'"),
        ("broken.jsonl", '{"caption": "a cat"}\n{"caption": ', "line 2: not valid JSON"),
        ("number.jsonl", '{"caption": 3}', "line 1: an object needs a string 'caption'"),
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


def test_caption_objects_and_json_lines(tmp_path: Path) -> None:
    """The release's format (a JSON list of {"caption", "trainset_idx"}) and JSON Lines with a
    caption read the captions in order, duplicates kept; a text file whose prompt starts with a
    brace stays text."""
    js = tmp_path / "objects.json"
    js.write_text('[{"caption": "a cat", "trainset_idx": 3}, {"caption": " "}, {"caption": "a cat"}, "a dog"]')
    assert load_prompts(js) == ["a cat", "a cat", "a dog"]
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"caption": "a cat", "id": 1}\n\n{"caption": "a dog"}\n')
    assert load_prompts(lines) == ["a cat", "a dog"]
    unsuffixed = tmp_path / "prompts"
    unsuffixed.write_text('{"caption": "a fox"}\n')
    assert load_prompts(unsuffixed) == ["a fox"]
    text = tmp_path / "braces.txt"
    text.write_text("{a cat} in a hat\n")
    assert load_prompts(text) == ["{a cat} in a hat"]


def test_the_release_prompt_file_reads_as_the_release_reads_it() -> None:
    """Parity: the release's own 4k training prompt file gives the 4000 captions its
    PromptDataset reads (``info["caption"]`` per entry, in order)."""
    from release_oracle import TRAINING, require_release

    require_release()
    release_prompts = TRAINING / "assets" / "prompts" / "4k_training_prompts.json"
    import json

    captions = [entry["caption"] for entry in json.loads(release_prompts.read_text())]
    assert load_prompts(release_prompts) == captions
    assert len(captions) == 4000
