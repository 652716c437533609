"""``logging.wandb=true`` in wandb's offline mode: a short SPO run on the tiny SD-1.5 pipeline, and
what the offline run directory holds checked against ``metrics.jsonl``.

How the logged history is read back: wandb writes an offline run as one transaction log,
``wandb/offline-run-*/run-ID.wandb``, the stream ``wandb sync`` later replays. Offline, nothing
else holds the history: no ``wandb-summary.json`` is written (that file comes with syncing), and
wandb >= 0.2x has no Python reader of the log any more (``wandb.sdk.internal.datastore`` went with
the Go core). The log's framing is LevelDB's log format behind a 7-byte header (``:W&B``, magic
0xBEE1, version 0: 32 KiB blocks of records ``crc32c | length | type | data``, a record split over
blocks as FIRST / MIDDLE / LAST), and each record is wandb's own protobuf ``Record``
(``wandb.proto.wandb_internal_pb2``). :func:`read_history` reads exactly that and fails on another
header version, so a format change shows up as a clear failure, not as a silently empty history.
"""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest

from fixed_scorers import brightness
from spo.config import load_config
from spo.training import SPOTrainer, read_metrics

pytest.importorskip("wandb", reason="wandb is not installed (pip install -e '.[dev]' installs it)")

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
#: another agent's preview images (``logging.sample_every``): asserted once that module exists
HAS_PREVIEWS = importlib.util.find_spec("spo.training.previews") is not None


def read_records(path: Path) -> list[Any]:
    """The protobuf ``Record``s of a ``.wandb`` transaction log, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[: len(HEADER)] == HEADER, f"{path}: not a version-0 wandb transaction log: {data[:7]!r}"
    records, pending, pos = [], b"", len(HEADER)
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a record header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero fill to the end of the block
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def read_history(records: list[Any]) -> list[dict[str, Any]]:
    """Each history row of the log as ``{key: value}`` (nested keys joined with ``/``)."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def tracked(entry: dict[str, Any], prefix: str) -> dict[str, float]:
    """What MetricsLog sends to the trackers for one metrics.jsonl line: its numbers (non-finite
    ones are strings in the JSON), not ``type``, not booleans, not lists."""
    out = {}
    for k, v in entry.items():
        if k == "type" or isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[f"{prefix}/{k}"] = float(v)
        elif v in ("nan", "inf", "-inf"):
            out[f"{prefix}/{k}"] = float(v)
    return out


def same(a: Any, b: float) -> bool:
    if isinstance(a, str):  # wandb writes NaN / Infinity as JSON tokens json.loads reads as floats
        a = float(a)
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=1e-9)


def test_wandb_offline_run_holds_the_metrics(tiny_sd15_path: Path, prompts_file: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                        "WANDB_DIR": str(tmp_path / "wandb-dir"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
                        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
                        "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "wandb-dir").mkdir()
    # one preview (after the last round) of two prompts, plus the base model's reference grid
    previews = ["logging.sample_every=2", "logging.sample_count=2"] if HAS_PREVIEWS else []
    config = load_config("sd15", [
        f"model.pretrained={tiny_sd15_path}", "model.resolution=32", "model.device=cpu", "model.dtype=float32",
        "train.mixed_precision=no", f"data.prompts={prompts_file}", "train.rounds=2", "train.prompts_per_round=2",
        "train.batch_size=8", "sampling.num_inference_steps=10", "pools.threshold=0.0", "optimizer.lr=1e-3",
        "logging.tensorboard=false", "logging.wandb=true", "logging.checkpoint_every=100", *previews,
    ])
    run = tmp_path / "run"
    SPOTrainer(config, run, scorer=brightness, progress=False).train()

    logs = list((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1, logs
    records = read_records(logs[0])
    history = read_history(records)
    logged = set().union(*history)

    entries = read_metrics(run / "metrics.jsonl")
    steps = [e for e in entries if e["type"] == "step"]
    rounds = [e for e in entries if e["type"] == "round"]
    assert len(steps) == 4 and [r["round"] for r in rounds] == [0, 1]
    expected = set().union(*(tracked(e, "train") for e in steps), *(tracked(e, "round") for e in rounds))
    assert "train/loss" in expected and "round/valid_pair_rate" in expected
    assert expected <= logged, f"not in the wandb run: {sorted(expected - logged)}"
    # every line arrived with its values: each step line in the row of its step, each round line
    # (logged at the last optimizer step, as wandb's step never goes back) in a row with its round
    for lines, prefix, axis in ((steps, "train", "step"), (rounds, "round", "round")):
        for entry in lines:
            want = tracked(entry, prefix)
            rows = [r for r in history if r.get(f"{prefix}/{axis}") == entry[axis]]
            assert rows, f"no wandb row with {prefix}/{axis} = {entry[axis]}"
            bad = {k: (rows[-1].get(k), v) for k, v in want.items() if not same(rows[-1].get(k), v)}
            assert not bad, f"{prefix} line {entry[axis]}: wandb vs metrics.jsonl {bad}"
    # round curves are drawn against the round
    metrics = [r.metric for r in records if r.WhichOneof("record_type") == "metric"]
    assert any(m.glob_name == "round/*" and m.step_metric == "round/round" for m in metrics), metrics

    # ---- PREVIEWS (active when spo.training.previews exists: logging.sample_every above) ----
    if HAS_PREVIEWS:
        # an image is logged as a dict that wandb flattens: KEY/_type, KEY/filenames, ...
        images = {k.rsplit("/", 1)[0]: row for row in history for k, v in row.items()
                  if k.endswith("/_type") and v in ("image-file", "images/separated")}
        assert images, "logging.sample_every logged no preview image to wandb"
        run_files = logs[0].parent / "files"
        for key, row in images.items():
            names = row.get(f"{key}/filenames") or [row.get(f"{key}/path")]
            assert all(name and (run_files / name).is_file() for name in names), (key, names)
