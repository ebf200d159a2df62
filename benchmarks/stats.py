"""The arithmetic of the benchmark: percentiles, medians over repeats, spreads and ratios."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Spread", "added", "percentile", "ratio", "spread"]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation between ranks, as numpy's
    default; None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, not {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Spread:
    """One metric over the repeats of a measurement: the median and the range around it."""

    median: float
    low: float
    high: float
    n: int

    @property
    def relative(self) -> float:
        """The range as a fraction of the median (0 for a single repeat)."""
        return (self.high - self.low) / abs(self.median) if self.median else 0.0


def spread(values: Sequence[float | None]) -> Spread | None:
    """Median and range of the repeats that produced a value; None if none did."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    median = percentile(present, 50)
    assert median is not None
    return Spread(median, min(present), max(present), len(present))


def added(system: float | None, floor: float | None) -> float | None:
    """What a system adds over the floor (a direct call); None if either is unknown."""
    if system is None or floor is None:
        return None
    return system - floor


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``; None when a side is unknown or the denominator is not
    positive (an added latency within the noise of zero makes no meaningful ratio)."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator
