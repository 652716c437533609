"""Markdown tables from the JSON of ``fullsize.py``, ``release_side_by_side.py`` and
``eval_cost.py``, for docs/benchmarks.md and the README: every absolute number with the device
it was measured on, every ratio from within one run (as the JSON holds it).

    python benchmarks/tables.py benchmarks/results/fullsize-lowmem-sd15.json benchmarks/results/release-side-by-side-sd15.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _num(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _cell(text: Any, limit: int = 80) -> str:
    """Free text for a table cell: one line, no column separators."""
    return " ".join(str(text).split()).replace("|", "/")[:limit]


def _peak(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "-"
    return " / ".join(_num(entry.get(phase)) for phase in ("sampling", "training"))


def fullsize_table(result: dict[str, Any]) -> str:
    """One row per model x variant: round time (sampling + training), ratio to the run's base,
    allocated and reserved peaks per phase, the memory cap it ran under, its status."""
    lines = [f"`fullsize.py` on {result['device']} ({result.get('mode', '')}), torch {result.get('torch')}, "
             f"diffusers {result.get('diffusers')}:", "",
             "| model | variant | round s (sampling + training) | x base | peak GiB sampling / training | "
             "reserved GiB | cap GiB | status |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model, entry in result.get("models", {}).items():
        for name, r in entry.get("variants", {}).items():
            if r.get("status") != "ok":
                note = r.get("error") or r.get("note") or ""
                lines.append(f"| {model} | {name} | - | - | - | - | {_num(r.get('memory_cap_gib'))} | "
                             f"{r.get('status')}: {_cell(note)} |")
                continue
            ratio = r.get("ratio_to_baseline", {})
            # results before ratio_base existed compared with the baseline only
            base = f" ({r.get('ratio_base', 'baseline')})" if ratio else ""
            lines.append(
                f"| {model} | {name} | {_num(r['round_seconds'], 1)} ({_num(r['sampling_seconds'], 1)} + "
                f"{_num(r['training_seconds'], 1)}) | {_num(ratio.get('round'))}{base} | {_peak(r.get('peak_gib'))} | "
                f"{_peak(r.get('reserved_gib'))} | {_num(r.get('memory_cap_gib'))} | ok |")
    return "\n".join(lines)


def side_by_side_table(result: dict[str, Any]) -> str:
    """One row per model x side: the median round after the first, the peak, and ours / theirs."""
    lines = [f"`release_side_by_side.py` on {result['device']} ({result.get('mode', '')}), "
             f"{result.get('rounds_per_side')} rounds per side:", "",
             "| model | side | round s (sampling + training) | peak GiB | reserved GiB | round / release | "
             "peak / release | records a round |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model, entry in result.get("models", {}).items():
        for name, side in entry.get("sides", {}).items():
            steady = side.get("steady")
            if side.get("status") != "ok" or not steady:
                lines.append(f"| {model} | {name} | {side.get('status')}: {_cell(side.get('error') or side.get('note') or '')} "
                             "| - | - | - | - | - |")
                continue
            ratio = side.get("ratio_to_release", {})
            lines.append(
                f"| {model} | {name} | {_num(steady['round_seconds'], 1)} ({_num(steady['sampling_seconds'], 1)} + "
                f"{_num(steady['training_seconds'], 1)}) | {_num(steady.get('peak_gib'))} | "
                f"{_num(steady.get('reserved_gib'))} | {_num(ratio.get('round'))} | {_num(ratio.get('peak'))} | "
                f"{', '.join(str(n) for n in steady['records_per_round'])} |")
    return "\n".join(lines)


def eval_cost_table(result: dict[str, Any]) -> str:
    """Each scorer's throughput in fp32 and in 16 bits, and the 16-bit scores against fp32's."""
    lines = [f"`eval_cost.py` on {result['device']}:", "",
             "| scorer | dtype | images/s | x fp32 | peak GiB | max abs diff to fp32 | fp32 score range | same ranking |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key in sorted(k for k in result if k.startswith("scorers_")):
        for scorer, r in result[key].items():
            lines.append(f"| {scorer} | {key.removeprefix('scorers_')} | {_num(r['images_per_s'], 1)} | "
                         f"{_num(r.get('speedup_over_fp32'))} | {_num(r.get('peak_gib'))} | "
                         f"{_num(r.get('max_abs_diff_to_fp32'), 4)} | {_num(r.get('fp32_score_range'), 3)} | "
                         f"{_num(r.get('same_ranking_as_fp32'))} |")
    return "\n".join(lines)


def table(result: dict[str, Any]) -> str:
    if result.get("benchmark") == "fullsize":
        return fullsize_table(result)
    if result.get("benchmark") == "release_side_by_side":
        return side_by_side_table(result)
    if any(k.startswith("scorers_") for k in result):
        return eval_cost_table(result)
    raise SystemExit("error: not a fullsize, release_side_by_side or eval_cost result")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+")
    args = parser.parse_args()
    for path in args.results:
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SystemExit(f"error: {path}: {err}") from None
        print(table(result) + "\n")


if __name__ == "__main__":
    main()
