"""Run logs: ``metrics.jsonl`` (one JSON object per optimiser step and per round) and trackers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends JSON lines on the main process and forwards numbers to accelerate's trackers.

    Each line has ``"type"``: ``"step"`` (one per optimiser step) or ``"round"`` (one per round).
    """

    def __init__(self, accelerator: Any, path: str | Path) -> None:
        self.accelerator = accelerator
        self.path = Path(path)
        #: the last optimizer step sent to wandb, whose history takes one step that never goes
        #: back (a line logged at an earlier step is dropped): a round line is logged there
        self.wandb_step = 0

    def truncate_after(self, done: int, key: str = "round") -> None:
        """Drop lines written after the checkpoint a run resumes from (``round >= done``, or with
        ``key="step"``: ``step > done``), so a resumed run's log reads as if it never stopped."""
        from .distributed import write_everywhere

        def rewrite() -> None:
            if not self.path.exists():
                return
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the interruption
                value = int(entry.get(key, -1))
                if (value < done) if key == "round" else (value <= done):
                    kept.append(line)
            self.path.write_text("".join(f"{line}\n" for line in kept))

        write_everywhere(self.accelerator, f"rewriting {self.path}", rewrite)

    def write(self, entry: dict[str, Any], tracker_step: int, prefix: str) -> None:
        """Append ``entry`` (main process) and log its numbers; every process calls this, and a
        failed append stops all of them with the same error."""
        from .distributed import write_everywhere

        clean = {k: _json_safe(v) for k, v in entry.items()}

        def append() -> None:
            with self.path.open("a") as f:
                f.write(json.dumps(clean) + "\n")

        write_everywhere(self.accelerator, f"appending to {self.path}", append)
        if not self.accelerator.is_main_process:
            return
        numbers = {
            f"{prefix}/{k}": float(v)
            for k, v in entry.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("type",)
        }
        if not numbers:
            return
        # TensorBoard: each line at its own step (a round line at its round). wandb: one history
        # step for all (it drops a line logged at an earlier step than the last one): a line with
        # a "step" (an optimizer step) is logged at it, any other (a round line) at the last one,
        # its own axis key (round/round) plotted against by ``define_metric`` (Run.start_trackers)
        if "step" in entry and not isinstance(entry["step"], bool):
            self.wandb_step = max(self.wandb_step, int(entry["step"]))
        for tracker in self.accelerator.trackers:
            tracker.log(numbers, step=self.wandb_step if tracker.name == "wandb" else tracker_step)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All entries of a ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
