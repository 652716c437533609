"""Evaluation: images for a prompt set with fixed noise per image (:mod:`.generate`), scorers
(:mod:`.scorers`), base vs fine-tuned comparisons (:mod:`.evaluate`), GenEval's layout
(:mod:`.geneval`) and the HTML report of a run (:mod:`.report`, which needs no torch)."""

from typing import Any

_LAZY = {
    "GenerationResult": ".generate", "generate_images": ".generate",
    "EvalModel": ".evaluate", "Protocol": ".evaluate", "evaluate": ".evaluate", "format_table": ".evaluate",
    "write_report": ".report", "Estimate": ".stats",
}


def __getattr__(name: str) -> Any:  # imported on first use: `spo report` starts without torch
    if name not in _LAZY:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(_LAZY[name], __name__), name)


__all__ = sorted(_LAZY)
