"""Native CPU kernels, compiled once per machine with the local C++ compiler.

Two libraries:
* attention over the paged K/V cache for every token of a step (csrc/paged_attention.cpp). torch's
  SDPA path first gathers every sequence's K/V into a padded copy; on the bundled model at batch
  32 with 200-token contexts that gather plus SDPA took ~48 % of an int8 decode step, and the
  kernel does the same attention ~10x faster (benchmarks/attention_bench.py). Prompt tokens go
  through it too, for batch and cache invariance (its header comment).
* fused per-layer elementwise ops (csrc/fused_ops.cpp): residual add + RMSNorm, SiLU(gate) * up,
  rotary on q and k in place: one call each instead of ~8, ~3 and ~10 torch ops. They reproduce
  torch's arithmetic operation by operation (its sum order included), so the model's outputs are
  bit-identical with or without them (benchmarks/op_bench.py measures them).

Built with torch.utils.cpp_extension (ninja + the system g++), -O3 and the widest x86-64 level the
CPU reports, into `<cache>/kernels/<name>-<key>`: the key hashes the source, torch's version and
the flags, so a new torch, an edited kernel or another CPU never loads a stale build.
The first start on a machine compiles (~25 s each on 2 cores); later starts load the cached
library. Without a compiler or ninja the shard logs why and keeps torch ops (correct, slower).

    python -m shard.cpu_kernels [CACHE_DIR]   # build now (`make run` / `make test` do this first)
"""

from __future__ import annotations

import hashlib
import importlib.util
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
FUSED_SOURCE = Path(__file__).parent / "csrc" / "fused_ops.cpp"
# (q, k_cache, v_cache, block_tables, cu_seqlens_q, seqlens_k, scale) -> out; csrc/paged_attention.cpp
PagedAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

# x86-64 micro-architecture levels as /proc/cpuinfo names their features (lzcnt appears as "abm").
_X86_64_V3 = frozenset({"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"})
_X86_64_V4 = _X86_64_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
_X86_64 = frozenset({"x86_64", "AMD64"})  # platform.machine()'s names; the fused kernels are x86-64 only


def isa_flags(cpu_flags: frozenset[str], machine: str) -> list[str]:
    """Compiler flags for the widest vector level this CPU has. Not -march=native: the cache key
    must name what the build assumes."""
    if machine not in _X86_64:
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


def _build(name: str, source_path: Path, flags: list[str], cache_dir: Path, what: str, fallback: str):
    """The compiled extension module for this source and these flags, building it first if this
    machine has no build yet; None (logged) when it cannot be built here."""
    from torch.utils import cpp_extension

    text = source_path.read_bytes()
    key = build_key(text, flags)
    build_dir = cache_dir / "kernels" / f"{name}-{key}"
    start = time.monotonic()
    module = _load_built(f"pytgi_{name}_{key}", build_dir)
    if module is not None:
        return module
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        # Compile a copy inside the build folder: torch rebuilds when the source *path* changes,
        # so two installs (venvs, checkouts) sharing one cache would otherwise rebuild in turn.
        source = build_dir / source_path.name
        if not source.exists() or source.read_bytes() != text:
            staged = build_dir / f".{source_path.name}.{os.getpid()}"
            staged.write_bytes(text)
            os.replace(staged, source)  # atomic: a concurrent shard sees the old or the new file
        module = cpp_extension.load(
            name=f"pytgi_{name}_{key}", sources=[str(source)], extra_cflags=flags,
            extra_ldflags=["-fopenmp"], build_directory=str(build_dir), verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, a read-only cache: torch ops still serve
        lines = str(error).strip().splitlines() or [type(error).__name__]
        log.warning("CPU %s unavailable (%s); using %s", what, lines[-1][:200], fallback)
        return None
    log.info("CPU %s ready (%.1f s, %s)", what, time.monotonic() - start, build_dir)
    return module


def _load_built(module_name: str, build_dir: Path):
    """The library an earlier start built, imported directly. cpp_extension.load would take its
    build lock first, on every start: a shard killed while holding it leaves a lock file that
    makes every later start wait forever. The key names source, torch and flags, so an existing
    library is the right one; one that does not import (a build cut short) is rebuilt."""
    library = build_dir / f"{module_name}.so"
    if not library.exists():
        return None
    try:
        spec = importlib.util.spec_from_file_location(module_name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError) as error:
        log.warning("rebuilding %s (%s)", library, error)
        return None
    return module


def _base_flags() -> list[str]:
    return ["-O3", "-fopenmp", *isa_flags(_cpu_flags(), platform.machine())]


def fused_flags() -> list[str]:
    # fp-contract=off: torch rounds a product before adding it; a contracted FMA would not.
    return [*_base_flags(), "-ffp-contract=off"]


def load_paged_attention(cache_dir: Path) -> PagedAttention | None:
    """The compiled paged-attention kernel; None (logged) when it cannot be built here."""
    module = _build("paged_attention", SOURCE, _base_flags(), cache_dir, "paged-attention kernel", "torch SDPA")
    return None if module is None else module.paged_attention


# torch's vector ISA (torch.backends.cpu.get_cpu_capability()) -> the kernels' Isa enum (fused_ops.cpp)
_TORCH_ISAS = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}


class FusedOps:
    """The fused per-layer kernels of csrc/fused_ops.cpp, bound to what torch's own kernels do
    on this machine: its vector ISA (which exp) and its sum's lane count (found by the
    load-time self-check), so their results are torch's, bit for bit."""

    dtypes = frozenset({torch.float32, torch.bfloat16})  # the activation dtypes the self-check covers

    def __init__(self, module, isa: int, lanes: int):
        self._module = module
        self.isa = isa
        self.lanes = lanes

    def rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """RMSNorm of x + residual (residual updated in place to that sum), or of x alone."""
        return self._module.rms_norm(x, residual, weight, eps, self.lanes)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[.., 2I] (gate, up) -> SiLU(gate) * up [.., I]."""
        return self._module.silu_mul(gate_up, self.isa)

    def rotary_(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """q [T, H, D], k [T, KVH, D] rotated in place by cos, sin [T, 1, D/2]."""
        self._module.rotary_(q, k, cos, sin)


def load_fused_ops(cache_dir: Path) -> FusedOps | None:
    """The fused per-layer kernels; None (logged) when they cannot be built here or do not
    reproduce torch's results bit for bit on this machine."""
    capability = torch.backends.cpu.get_cpu_capability()
    isa = _TORCH_ISAS.get(capability) if platform.machine() in _X86_64 else None
    if isa is None:
        log.warning("fused CPU kernels not used: torch's %s kernels are not mirrored; using torch ops", capability)
        return None
    module = _build("fused_ops", FUSED_SOURCE, fused_flags(), cache_dir, "fused kernels", "torch ops")
    if module is None:
        return None
    if isa > module.compiled_isa():
        log.warning("fused CPU kernels not used: built for ISA %d, torch runs %s; using torch ops",
                    module.compiled_isa(), capability)
        return None
    for lanes in (8, 16):
        ops = FusedOps(module, isa, lanes)
        if _reproduces_torch(ops):
            log.info("CPU fused kernels in use (torch %s kernels, %d-lane sums)", capability, lanes)
            return ops
    log.warning("fused CPU kernels not used: they do not reproduce torch %s bit for bit here; using torch ops",
                torch.__version__)
    return None


def _reproduces_torch(ops: FusedOps) -> bool:
    """Whether every kernel equals its torch reference bit for bit on a probe. torch's sum runs
    its AVX2 kernel on AVX-512 machines (it registers no AVX-512 one), so the lane count of the
    RMSNorm's sum is found here rather than assumed."""
    from shard.layers.activation import gated
    from shard.layers.norm import rms_norm_reference
    from shard.layers.rotary import apply_rotary

    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for rows, n in ((3, 1000), (2, 67)):  # vector body, scalar tail, a cascade level
            x, residual = (torch.randn(rows, n, generator=generator).to(dtype) for _ in range(2))
            weight = (torch.rand(n, generator=generator) + 0.5).to(dtype)
            expected, expected_residual = rms_norm_reference(x, residual, weight, 1e-5)
            normed = ops.rms_norm(x, residual, weight, 1e-5)  # updates residual in place
            if not (torch.equal(normed, expected) and torch.equal(residual, expected_residual)):
                return False
            gate_up = 4 * torch.randn(rows, 2 * n, generator=generator).to(dtype)
            if not torch.equal(ops.silu_mul(gate_up), gated("silu")(gate_up)):
                return False
        q, k = (torch.randn(2, heads, 64, generator=generator).to(dtype) for heads in (5, 2))
        cos, sin = (torch.randn(2, 1, 32, generator=generator).to(dtype) for _ in range(2))
        expected_q, expected_k = apply_rotary(q, k, cos, sin)
        ops.rotary_(q, k, cos, sin)
        if not (torch.equal(q, expected_q) and torch.equal(k, expected_k)):
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    from shard.config import default_cache_dir

    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cache_dir = Path(args[0]) if args else default_cache_dir()
    paged = load_paged_attention(cache_dir)
    fused = load_fused_ops(cache_dir)
    # Elsewhere than x86-64 there are no fused kernels to build: their absence is not a failure.
    return 0 if paged is not None and (fused is not None or platform.machine() not in _X86_64) else 1


if __name__ == "__main__":
    sys.exit(main())
