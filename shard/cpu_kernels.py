"""Native CPU kernels, compiled once per machine with the local C++ compiler.

One kernel today: decode attention over the paged K/V cache (csrc/paged_attention.cpp). torch's
SDPA path first gathers every sequence's K/V into a padded copy; on the bundled model at batch 32
with 200-token contexts that gather plus SDPA took ~48 % of an int8 decode step, and the kernel
does the same attention ~10x faster (benchmarks/attention_bench.py).

Built with torch.utils.cpp_extension (ninja + the system g++), -O3 and the widest x86-64 level the
CPU reports, into `<cache>/kernels/paged_attention-<key>`: the key hashes the source, torch's
version and the flags, so a new torch, an edited kernel or another CPU never loads a stale build.
The first start on a machine compiles (~25 s on 2 cores); later starts load the cached library.
Without a compiler or ninja the shard logs why and keeps torch's SDPA (correct, slower).

    python -m shard.cpu_kernels [CACHE_DIR]   # build now (`make run` / `make test` do this first)
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"
PagedDecode = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

# x86-64 micro-architecture levels as /proc/cpuinfo names their features (lzcnt appears as "abm").
_X86_64_V3 = frozenset({"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"})
_X86_64_V4 = _X86_64_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


def isa_flags(cpu_flags: frozenset[str], machine: str) -> list[str]:
    """Compiler flags for the widest vector level this CPU has. Not -march=native: the cache key
    must name what the build assumes."""
    if machine not in {"x86_64", "AMD64"}:
        return []
    if _X86_64_V4 <= cpu_flags:
        return ["-march=x86-64-v4"]
    if _X86_64_V3 <= cpu_flags:
        return ["-march=x86-64-v3"]
    return []


def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def build_key(source: bytes, flags: list[str]) -> str:
    digest = hashlib.sha256(source)
    digest.update(f"{torch.__version__}|{sys.version_info[:2]}|{' '.join(flags)}".encode())
    return digest.hexdigest()[:12]


def load_paged_decode(cache_dir: Path) -> PagedDecode | None:
    """The compiled kernel, building it first if this machine has no build yet; None (logged) when
    it cannot be built here."""
    from torch.utils import cpp_extension

    flags = ["-O3", "-fopenmp", *isa_flags(_cpu_flags(), platform.machine())]
    text = SOURCE.read_bytes()
    key = build_key(text, flags)
    build_dir = cache_dir / "kernels" / f"paged_attention-{key}"
    start = time.monotonic()
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        # Compile a copy inside the build folder: torch rebuilds when the source *path* changes,
        # so two installs (venvs, checkouts) sharing one cache would otherwise rebuild in turn.
        source = build_dir / SOURCE.name
        if not source.exists() or source.read_bytes() != text:
            staged = build_dir / f".{SOURCE.name}.{os.getpid()}"
            staged.write_bytes(text)
            os.replace(staged, source)  # atomic: a concurrent shard sees the old or the new file
        module = cpp_extension.load(
            name=f"pytgi_paged_attention_{key}", sources=[str(source)], extra_cflags=flags,
            extra_ldflags=["-fopenmp"], build_directory=str(build_dir), verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, a read-only cache: SDPA still serves
        lines = str(error).strip().splitlines() or [type(error).__name__]
        log.warning("CPU paged-attention kernel unavailable (%s); using torch SDPA", lines[-1][:200])
        return None
    log.info("CPU paged-attention kernel ready (%.1f s, %s)", time.monotonic() - start, build_dir)
    return module.paged_decode_attention


def main(argv: list[str] | None = None) -> int:
    from shard.config import default_cache_dir

    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cache_dir = Path(args[0]) if args else default_cache_dir()
    return 0 if load_paged_decode(cache_dir) is not None else 1


if __name__ == "__main__":
    sys.exit(main())
