"""A small Pick-a-Pic-format data set with a learnable preference: the image whose bright square
sits in the left half wins (spatial layout survives the tiny random VAE; colour does not)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

CAPTIONS = ["a red circle", "a blue square", "two green stars", "a yellow cat", "an orange dog", "a purple tree"]


def _png(rng: np.random.Generator, left: bool, size: int = 32) -> bytes:
    pixels = np.clip(rng.normal(0.1, 0.05, size=(size, size, 3)), 0, 1)
    side = size // 3
    top = int(rng.integers(0, size - side))
    col = int(rng.integers(0, size // 2 - side)) + (0 if left else size // 2)
    pixels[top : top + side, col : col + side] = rng.uniform(0.7, 1.0, size=3)
    buffer = io.BytesIO()
    Image.fromarray((pixels * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_rows(n: int, seed: int, ties: int = 0, corrupt: int = 0) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    for i in range(n):
        first_wins = bool(rng.integers(0, 2))
        rows["caption"].append(CAPTIONS[i % len(CAPTIONS)])
        rows["jpg_0"].append(_png(rng, left=first_wins))
        rows["jpg_1"].append(_png(rng, left=not first_wins))
        tie = i < ties
        rows["label_0"].append(0.5 if tie else float(first_wins))
        rows["label_1"].append(0.5 if tie else float(not first_wins))
    for i in range(corrupt):
        rows["jpg_1"][n - 1 - i] = b"not an image"
    return rows


def save_pickapic(directory: Path, train: int = 48, validation: int = 24, ties: int = 4, corrupt: int = 2) -> Path:
    """A ``DatasetDict`` (train, validation_unique) saved with ``save_to_disk``."""
    import datasets

    data = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(make_rows(train, seed=0, ties=ties, corrupt=corrupt)),
        "validation_unique": datasets.Dataset.from_dict(make_rows(validation, seed=1)),
    })
    data.save_to_disk(str(directory))
    return directory
