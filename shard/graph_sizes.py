"""`--cuda-graphs` (env CUDA_GRAPHS, TGI's name and format), parsed in one place.

Free of torch on purpose: the launcher validates the flag with this same function before it
starts anything, and must not pay torch's import to do so.
"""

from __future__ import annotations


def parse_cuda_graphs(value: str | None) -> tuple[int, ...] | None:
    """Comma-separated positive batch sizes (sorted, deduplicated), "0" for none (→ ()), or
    None / "" for the shard's default (→ None). ValueError for anything else."""
    if value is None or not value.strip():
        return None
    parts = [part.strip() for part in value.split(",")]
    if parts == ["0"]:
        return ()
    if not all(part.isdigit() and int(part) > 0 for part in parts):
        raise ValueError(f"--cuda-graphs must be positive batch sizes separated by commas, or 0 (got {value!r})")
    return tuple(sorted({int(part) for part in parts}))
