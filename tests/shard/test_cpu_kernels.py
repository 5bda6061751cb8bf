"""How the CPU kernel is built and chosen: ISA flags, the cache key, the fallback when it cannot
build, and backend selection (the kernel's numbers are in test_attention.py)."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from shard import cpu_kernels
from shard.attention import PagedCpuBackend, SdpaBackend, plan_attention, select_backend
from shard.config import build_config

V3 = {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"}
V4 = V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


def test_isa_flags_follow_the_cpu():
    assert cpu_kernels.isa_flags(frozenset(V4 | {"sse4_2"}), "x86_64") == ["-march=x86-64-v4"]
    assert cpu_kernels.isa_flags(frozenset(V3 | {"avx512f"}), "x86_64") == ["-march=x86-64-v3"]  # partial AVX-512
    assert cpu_kernels.isa_flags(frozenset({"sse4_2", "avx"}), "x86_64") == []
    assert cpu_kernels.isa_flags(frozenset(V4), "aarch64") == []


def test_build_key_changes_with_source_and_flags():
    key = cpu_kernels.build_key(b"kernel", ["-O3"])
    assert key == cpu_kernels.build_key(b"kernel", ["-O3"])
    assert key != cpu_kernels.build_key(b"kernel v2", ["-O3"])
    assert key != cpu_kernels.build_key(b"kernel", ["-O3", "-march=x86-64-v4"])


def test_a_failed_build_falls_back_with_one_warning(tmp_path, monkeypatch, caplog):
    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension\nc++: command not found")

    monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
    with caplog.at_level(logging.WARNING, logger="shard.cpu_kernels"):
        assert cpu_kernels.load_paged_attention(tmp_path) is None
    assert "c++: command not found" in caplog.text and "using torch SDPA" in caplog.text


def test_the_build_lands_in_a_keyed_cache_folder(paged_kernel):
    from shard.config import default_cache_dir

    folders = list((default_cache_dir() / "kernels").glob("paged_attention-*"))
    assert any(f.is_dir() and any(f.glob("*.so")) for f in folders)


def test_backend_selection(paged_kernel):
    def select(attention, kernel):
        plan = plan_attention(attention, torch.device("cpu"), torch.float32, 64, None, kernel is not None)
        return select_backend(plan, 0.1, kernel)

    assert isinstance(select("paged", paged_kernel), PagedCpuBackend)
    assert type(select("sdpa", paged_kernel)) is SdpaBackend
    assert type(select("paged", None)) is SdpaBackend  # did not build here
    backend = select("paged", paged_kernel).with_scale(0.5)
    assert isinstance(backend, PagedCpuBackend) and backend.scale == 0.5 and backend.kernel is paged_kernel


def test_attention_env_is_validated(monkeypatch):
    kwargs = dict(revision=None, uds_path="/tmp/x", sharded=False, dtype=None, trust_remote_code=False,
                  json_output=False, log_level="info")
    monkeypatch.setenv("ATTENTION", "SDPA")
    assert build_config(None, **kwargs).attention == "sdpa"
    monkeypatch.setenv("ATTENTION", "flashinfer")
    with pytest.raises(ValueError, match="unsupported ATTENTION='flashinfer'; choose one of paged, sdpa"):
        build_config(None, **kwargs)


def test_another_checkout_of_the_same_source_reuses_the_build(paged_kernel, tmp_path):
    """torch rebuilds when the source path changes; the build compiles a copy inside its own
    folder, so two installs sharing one cache do not rebuild in turn. (A fresh process: torch
    keeps per-process state about what it built.)"""
    from shard.config import default_cache_dir

    copy = tmp_path / "csrc" / cpu_kernels.SOURCE.name
    copy.parent.mkdir()
    copy.write_bytes(cpu_kernels.SOURCE.read_bytes())
    libraries = (default_cache_dir() / "kernels").glob("paged_attention-*/*.so")
    before = {lib: lib.stat().st_mtime_ns for lib in libraries}
    script = (
        "import pathlib, sys; from shard import cpu_kernels; from shard.config import default_cache_dir; "
        f"cpu_kernels.SOURCE = pathlib.Path({str(copy)!r}); "
        "sys.exit(cpu_kernels.load_paged_attention(default_cache_dir()) is None)"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    after = (default_cache_dir() / "kernels").glob("paged_attention-*/*.so")
    assert {lib: lib.stat().st_mtime_ns for lib in after} == before  # nothing rebuilt


def test_the_kernel_source_ships_in_the_package():
    """A wheel without csrc/ would leave every installed shard on the SDPA fallback."""
    tomllib = pytest.importorskip("tomllib")
    root = cpu_kernels.SOURCE.parents[2]
    package_data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = package_data["shard"]
    assert any(cpu_kernels.SOURCE.match(f"shard/{pattern}") for pattern in patterns)
