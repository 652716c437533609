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
