"""Timing summaries and fixed-width tables shared by the benchmarks (shard-level and HTTP load)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's
    default), so p50 of an even-sized sample is the mean of the two middle values."""
    if not samples:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class Stats:
    """Summary of one latency sample set (same unit as the samples)."""

    count: int
    mean: float
    min: float
    max: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        if not samples:
            return cls(0, *(math.nan,) * 6)
        return cls(
            count=len(samples), mean=sum(samples) / len(samples), min=min(samples), max=max(samples),
            p50=percentile(samples, 50), p90=percentile(samples, 90), p99=percentile(samples, 99),
        )

    def to_dict(self) -> dict:
        return asdict(self)


def format_number(value: float | int | str | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:,.{digits}f}"
    return f"{value:,}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], digits: int = 1) -> str:
    """A fixed-width text table: right-aligned columns, a header and a dashed rule."""
    cells = [[format_number(v, digits) if not isinstance(v, str) else v for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda values: " | ".join(v.rjust(w) for v, w in zip(values, widths))  # noqa: E731
    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])
