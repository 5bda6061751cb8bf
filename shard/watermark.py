"""The watermark's parameters: torch-free, so the launcher checks its flags with the same rule."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Watermark:
    """The watermark's parameters for every request that asks for one (`watermark: true`): the
    share of the vocabulary on the green list and the logit bonus its tokens get. The launcher's
    --watermark-gamma / --watermark-delta, as WATERMARK_GAMMA / WATERMARK_DELTA (TGI's names and
    defaults); read once into ShardConfig."""

    gamma: float = 0.5
    delta: float = 2.0

    def __post_init__(self) -> None:
        if not 0.0 < self.gamma < 1.0:
            raise ValueError(f"watermark gamma must be in (0, 1) (got {self.gamma})")
        if not self.delta >= 0.0:
            raise ValueError(f"watermark delta must be >= 0 (got {self.delta})")
