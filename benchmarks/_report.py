"""Shared by the benchmark scripts: print a result and, when asked, write it as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(result: Any, output: Path | None, shown: Any = None) -> None:
    """Print ``shown`` (default: ``result``) as JSON; write ``result`` to ``output`` if given."""
    print(json.dumps(result if shown is None else shown, indent=2))
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")


def write_partial(result: dict[str, Any], output: Path, started: float) -> None:
    """Write ``result`` (with ``wall_seconds`` since ``started``, a ``time.perf_counter`` value) to
    ``output`` through a temporary file: a run cut short leaves the last complete JSON."""
    import time

    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(output.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(output)
