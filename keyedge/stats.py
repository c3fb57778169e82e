"""Summaries of repeated measurements: the median and 10th-90th percentile of per-round ratios.

Timing on a shared machine is noisy; keyedge compares two things measured side by side
in one run, round by round, and reports the spread of the per-round ratios.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Spread:
    """Median and 10th/90th percentile of a sample."""

    median: float
    p10: float
    p90: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.median:.3f} [{self.p10:.3f}-{self.p90:.3f}]"


def spread(values: Sequence[float]) -> Spread:
    """The :class:`Spread` of ``values`` (at least one)."""
    if not len(values):
        raise ValueError("spread of an empty sample")
    lo, hi = np.percentile(np.asarray(values, dtype=np.float64), [10, 90])
    return Spread(float(statistics.median(values)), float(lo), float(hi))


def ratio_spread(numerators: Sequence[float], denominators: Sequence[float]) -> Spread:
    """The :class:`Spread` of per-round ratios ``numerators[i] / denominators[i]`` (pairs up to the shorter)."""
    return spread([a / b for a, b in zip(numerators, denominators)])


def binomial_se(p: float, n: int) -> float:
    """Standard error of a share ``p`` measured on ``n`` independent trials (NaN when ``n`` is 0)."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")
