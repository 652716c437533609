"""Means with 95% intervals, and paired differences, for evaluation tables."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Estimate:
    """Mean with a normal-approximation 95% interval: mean +- 1.96 * sd / sqrt(n).

    With paired values (model - base on the same prompt and seed) it is the paired difference's
    interval; ``n`` counts images (prompts x seeds), so prompts and seeds are treated alike."""

    mean: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Estimate":
        arr = np.asarray(values, dtype=np.float64)
        if arr.size == 0:
            return cls(float("nan"), float("nan"), float("nan"), 0)
        half = 1.96 * arr.std(ddof=1) / math.sqrt(len(arr)) if len(arr) > 1 else float("nan")
        return cls(float(arr.mean()), float(arr.mean() - half), float(arr.mean() + half), len(arr))

    @property
    def excludes_zero(self) -> bool:
        return bool(self.low > 0 or self.high < 0)

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def signed(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"
