"""Pick-a-Pic-format preference pairs: caption, jpg_0, jpg_1 (encoded image bytes), label_0, label_1.

Loaded with ``datasets`` from a directory written by ``save_to_disk`` or from parquet files.
Images are decoded lazily; an undecodable image or an unusable label makes its row *bad*: it is
skipped and counted, never a crash mid-epoch.
"""

from __future__ import annotations

import glob
import io
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..errors import SPOError

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")


class PreferenceDataError(SPOError, ValueError):
    """Preference data that cannot be used (missing path, split or columns, nothing usable)."""


def _parquet_files(path: str) -> list[str]:
    p = Path(path).expanduser()
    if p.is_dir():
        return sorted(str(f) for f in p.rglob("*.parquet"))
    if p.is_file():
        return [str(p)]
    return sorted(glob.glob(path))


def _split_files(path: str, split: str | None, what: str) -> list[str]:
    """The parquet files of ``split`` under ``path`` (all of them when none is named for a split)."""
    files = _parquet_files(path)
    if not files:
        raise PreferenceDataError(f"{what}: {path!r} is neither a saved dataset nor parquet files")
    if split is not None:
        named = [f for f in files if Path(f).name.startswith(split)]
        if named:
            return named
        if any(Path(f).name.startswith(("train", "validation", "test")) for f in files):
            raise PreferenceDataError(f"{what}: {path}: no parquet files for split {split!r}")
    return files


def _is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and any((p / f).exists() for f in ("dataset_dict.json", "dataset_info.json", "state.json"))


def is_preference_data(path: str | Path) -> bool:
    """Whether ``path`` looks like Pick-a-Pic-format data (a saved dataset or parquet files)."""
    p = Path(path).expanduser()
    return _is_saved_dataset(p) or (p.is_file() and p.suffix == ".parquet") or (p.is_dir() and any(p.rglob("*.parquet")))


def load_captions(path: str, split: str | None = "validation_unique", what: str = "--prompts") -> list[str]:
    """The captions of one split of Pick-a-Pic-format data, in order, duplicates dropped (the
    paper evaluates on the first 500 of ``validation_unique``). Only the caption column is read."""
    import datasets

    p = Path(path).expanduser()
    if _is_saved_dataset(p):
        try:
            loaded = datasets.load_from_disk(str(p))
        except Exception as err:  # noqa: BLE001 - datasets raises several kinds on damaged directories
            raise PreferenceDataError(f"{what}: {path}: could not load the saved dataset ({type(err).__name__}: {err})") from err
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise PreferenceDataError(f"{what}: {path}: no split {split!r}; available: {sorted(loaded)}")
            loaded = loaded[split]
        if "caption" not in loaded.column_names:
            raise PreferenceDataError(f"{what}: {path}: no 'caption' column")
        captions = loaded.select_columns(["caption"])["caption"]
    else:
        import pyarrow.parquet as pq

        captions = []
        for f in _split_files(path, split, what):
            try:
                table = pq.read_table(f, columns=["caption"])
            except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid, KeyError, OSError
                raise PreferenceDataError(f"{what}: {f}: could not read a 'caption' column ({type(err).__name__}: {err})") from err
            captions += table.column("caption").to_pylist()
    unique = list(dict.fromkeys(c.strip() for c in captions if isinstance(c, str) and c.strip()))
    if not unique:
        raise PreferenceDataError(f"{what}: {path} ({split}): no caption")
    return unique


def load_preference_split(path: str, split: str | None, what: str = "spm.data") -> Any:
    """One split of Pick-a-Pic-format data as a ``datasets.Dataset`` (columns checked).

    ``path``: a ``save_to_disk`` directory (a ``Dataset`` or a ``DatasetDict``), or parquet files
    (a file, a directory or a glob; in a directory, files whose name starts with the split name
    form that split, else all files form a single split).
    """
    import datasets

    p = Path(path).expanduser()
    if _is_saved_dataset(p):
        try:
            loaded = datasets.load_from_disk(str(p))
        except Exception as err:  # noqa: BLE001 - datasets raises IndexError on an empty split
            raise PreferenceDataError(
                f"{path}: could not load the saved dataset ({type(err).__name__}: {err}); is a split empty "
                "or the directory damaged?"
            ) from err
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise PreferenceDataError(f"{path}: no split {split!r}; available: {sorted(loaded)}")
            data = loaded[split]
        else:
            data = loaded
    else:
        data = datasets.load_dataset("parquet", data_files=_split_files(path, split, what), split="train")
    missing = [c for c in REQUIRED_COLUMNS if c not in data.column_names]
    if missing:
        raise PreferenceDataError(
            f"{path} ({split}): missing columns {missing}; Pick-a-Pic format needs {list(REQUIRED_COLUMNS)}"
        )
    if len(data) == 0:
        raise PreferenceDataError(f"{path} ({split}): the split is empty")
    return data


def decode_image(data: Any, resolution: int) -> Tensor | None:
    """Encoded image bytes -> (3, resolution, resolution) in [-1, 1] (resize short side, centre
    crop); ``None`` when the bytes do not decode."""
    try:
        raw = data["bytes"] if isinstance(data, dict) else data
        if isinstance(raw, Image.Image):
            image = raw
        else:
            image = Image.open(io.BytesIO(raw))
            image.load()
        image = image.convert("RGB")
    except Exception:  # noqa: BLE001 - any undecodable content is a bad row
        return None
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1
    h, w = x.shape[-2:]
    scale = resolution / min(h, w)
    size = (max(resolution, round(h * scale)), max(resolution, round(w * scale)))
    x = F.interpolate(x[None], size=size, mode="bicubic", align_corners=False, antialias=True)[0]
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return x[:, top : top + resolution, left : left + resolution].clamp(-1, 1)


def parse_labels(label_0: Any, label_1: Any) -> tuple[float, float] | None:
    """Normalised (label_0, label_1), or ``None`` if unusable (missing, negative, zero sum)."""
    try:
        a, b = float(label_0), float(label_1)
    except (TypeError, ValueError):
        return None
    if not (a >= 0 and b >= 0 and a + b > 0):
        return None
    return a / (a + b), b / (a + b)


NUM_EXAMPLES_COLUMN = "num_example_per_prompt"


def caption_weights(data: Any) -> list[float]:
    """The example weight 1 / n of each row: n from the ``num_example_per_prompt`` column where
    the data has it (Pick-a-Pic v1; what the release's criterion divides by), else the number of
    rows of the split sharing the caption. A missing or non-positive n counts the caption."""
    captions = data["caption"]
    counts = Counter(captions)
    given = data[NUM_EXAMPLES_COLUMN] if NUM_EXAMPLES_COLUMN in data.column_names else [None] * len(captions)
    weights = []
    for caption, n in zip(captions, given):
        try:
            n = float(n) if n is not None else 0.0
        except (TypeError, ValueError):
            n = 0.0
        weights.append(1.0 / n if n > 0 else 1.0 / counts[caption])
    return weights


def load_pair(data: Any, index: int, resolution: int) -> dict[str, Any] | None:
    """Row ``index`` as tensors, or ``None`` for a bad row."""
    try:  # an image column that datasets itself decodes can fail right here
        row = data[int(index)]
    except Exception:  # noqa: BLE001 - any unreadable row is a bad row
        return None
    labels = parse_labels(row["label_0"], row["label_1"])
    caption = row["caption"]
    if labels is None or not isinstance(caption, str):
        return None
    image_0, image_1 = decode_image(row["jpg_0"], resolution), decode_image(row["jpg_1"], resolution)
    if image_0 is None or image_1 is None:
        return None
    return {"caption": caption, "images": torch.stack([image_0, image_1]), "labels": labels}


#: the LRM release's pseudo-preference file of Pick-a-Pic v1 (``step_sd_hf_dataset.py``)
PSEUDO_PREFERENCE_COLUMNS = ("different_flag", "aesthetic_gap", "clipscore_gap", "vqascore_gap")
#: ``filter_strategy`` -> the aesthetic gap a decided pair must exceed (the release's rules 1, 2, 3)
AESTHETIC_FLOOR = {1: 0.0, 2: -0.5, 3: -1.0}


def _csv_number(text: str | None) -> float:
    """A CSV cell as pandas reads it for a comparison: a number, ``True`` / ``False`` as 1 / 0,
    an empty cell (or ``nan``) as NaN, which no comparison accepts."""
    value = (text or "").strip()
    if value.lower() in ("true", "false"):
        return 1.0 if value.lower() == "true" else 0.0
    if value == "":
        return float("nan")
    return float(value)  # ValueError for anything else


def pseudo_preference_filter(path: str, strategy: int, what: str = "spm.pseudo_preference") -> list[bool]:
    """Which rows of the training split the LRM release's pseudo-preference rule keeps: the CSV
    at ``path`` (one row per training row, header with :data:`PSEUDO_PREFERENCE_COLUMNS`), read
    as the release reads it with pandas (row i is training row i). A decided pair
    (``different_flag == 1``) is kept when its CLIP-score and VQA-score gaps are > 0 and its
    aesthetic gap exceeds :data:`AESTHETIC_FLOOR` of ``strategy``; a tie (``different_flag == 0``)
    when the aesthetic gap < 0.2, the CLIP-score gap < 0.03 and the VQA-score gap < 0.07. An
    unreadable file, a missing column or a cell that is no number is a :class:`PreferenceDataError`."""
    import csv

    if strategy not in AESTHETIC_FLOOR:
        raise PreferenceDataError(f"spm.filter_strategy: expected one of {sorted(AESTHETIC_FLOOR)}, got {strategy!r}")
    floor = AESTHETIC_FLOOR[strategy]
    try:
        with open(Path(path).expanduser(), newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in PSEUDO_PREFERENCE_COLUMNS if c not in header]
            if missing:
                raise PreferenceDataError(f"{what}: {path}: missing columns {missing}; the pseudo-preference "
                                          f"file needs {list(PSEUDO_PREFERENCE_COLUMNS)}")
            keep = []
            for line, row in enumerate(reader, start=2):
                row = {(k or "").strip(): v for k, v in row.items()}
                values = []
                for column in PSEUDO_PREFERENCE_COLUMNS:
                    try:
                        values.append(_csv_number(row.get(column)))
                    except ValueError:
                        raise PreferenceDataError(f"{what}: {path} line {line}: {column} is not a number: "
                                                  f"{row.get(column)!r}") from None
                flag, aes, clip, vqa = values
                decided = flag == 1 and aes > floor and clip > 0 and vqa > 0
                tie = flag == 0 and aes < 0.2 and clip < 0.03 and vqa < 0.07
                keep.append(decided or tie)
    except OSError as err:
        raise PreferenceDataError(f"{what}: cannot read {str(path)!r}: {err.strerror or err}") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise PreferenceDataError(f"{what}: {path} is not a readable CSV file ({type(err).__name__})") from None
    if not keep:
        raise PreferenceDataError(f"{what}: {path} has no rows")
    return keep

