"""The KV cache budget: TGI's --cuda-memory-fraction (of TOTAL GPU memory) less the warmup's peak,
measured after synchronize + empty_cache; the CPU's MemAvailable rule; the warmup's glue."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

import shard.engine
import shard.kv_cache as kv
from shard.config import build_config
from shard.distributed import TPGroup
from shard.engine import Engine
from shard.models import get_model
from shard.models.base import ModelContext
from pytgi_proto import generate_pb2 as pb
from tests.conftest import make_config

GiB = 2**30
CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
_CUDA_MEMORY_CALLS = ("synchronize", "empty_cache", "mem_get_info", "reset_peak_memory_stats",
                      "memory_allocated", "max_memory_allocated", "set_per_process_memory_fraction")


# -- the pure rules ---------------------------------------------------------------------------


def test_cuda_budget_is_a_share_of_total_memory_as_in_tgi():
    # 141 GiB GPU, 21 GiB in use (weights, context, a neighbour): the process may use all of it
    # (fraction 1.0); a step needs a 2 GiB peak; the KV cache takes 90% of the rest (TGI_WIGGLE_ROOM 0.90).
    total, free = 141 * GiB, 120 * GiB
    assert kv.cuda_kv_budget(free, total, 1.0, 0.9, 2 * GiB) == int((total - 21 * GiB - 2 * GiB) * 0.9)
    # Half the GPU: the share is of the total, not of what is free.
    assert kv.cuda_kv_budget(free, total, 0.5, 0.9, 0) == int((0.5 * total - 21 * GiB) * 0.9)
    # TGI: get_free_memory(device, MEMORY_FRACTION) = free - (1 - fraction) * total, times
    # TGI_WIGGLE_ROOM (its allocator still holds the warmup's peak; ours subtracts it).
    for fraction in (0.3, 0.8, 1.0):
        tgi = max(0.0, free - (1 - fraction) * total) * 0.9
        assert kv.cuda_kv_budget(free, total, fraction, 0.9, 0) == int(tgi)


def test_cuda_budget_never_negative():
    assert kv.cuda_kv_budget(10 * GiB, 80 * GiB, 0.5, 0.9, 0) == 0  # 70 GiB in use > 40 GiB allowed
    assert kv.cuda_kv_budget(70 * GiB, 80 * GiB, 1.0, 0.9, 100 * GiB) == 0  # the peak eats it all


def test_cpu_budget_is_a_share_of_available_ram():
    assert kv.cpu_kv_budget(10 * GiB, 0.1) == GiB
    assert kv.cpu_kv_budget(1001, 0.5) == 500


# -- measuring: CUDA only where it exists, after synchronize + empty_cache -------------------


def _forbid_cuda(monkeypatch):
    for name in _CUDA_MEMORY_CALLS:
        monkeypatch.setattr(torch.cuda, name,
                            lambda *a, _n=name, **k: pytest.fail(f"torch.cuda.{_n} on a CPU shard"))


def test_cpu_measures_ram_and_never_touches_cuda(monkeypatch):
    _forbid_cuda(monkeypatch)
    monkeypatch.setattr(kv, "available_ram", lambda: 8 * GiB)
    assert kv.kv_budget(CPU, 0.25, 0.9, 123) == 2 * GiB  # no margin, no peak: unchanged CPU rule
    assert kv.TransientPeak(CPU).bytes(resident=5) == 0
    kv.cap_process_memory(CPU, 0.5)


class FakeCuda:
    """The caching allocator's counters and calls, recorded in order."""

    def __init__(self, monkeypatch, *, free=60 * GiB, total=80 * GiB, allocated=10 * GiB, peak=13 * GiB):
        self.calls, self.free, self.total, self.allocated, self.peak = [], free, total, allocated, peak
        record = self.calls.append
        fakes = {
            "synchronize": lambda device=None: record(("synchronize", device)),
            "empty_cache": lambda: record(("empty_cache",)),
            "mem_get_info": self.mem_get_info,
            "reset_peak_memory_stats": lambda device=None: record(("reset_peak", device)),
            "memory_allocated": lambda device=None: self.allocated,
            "max_memory_allocated": lambda device=None: self.peak,
            "set_per_process_memory_fraction": lambda share, device=None: record(("cap", share, device)),
        }
        for name, fake in fakes.items():
            monkeypatch.setattr(torch.cuda, name, fake)

    def mem_get_info(self, device=None) -> tuple[int, int]:
        self.calls.append(("mem_get_info", device))
        return self.free, self.total

    def names(self) -> list[str]:
        return [call[0] for call in self.calls]


def test_cuda_budget_measured_after_synchronize_and_empty_cache(monkeypatch):
    fake = FakeCuda(monkeypatch, free=60 * GiB, total=80 * GiB)
    budget = kv.kv_budget(CUDA, 0.9, 0.9, GiB)
    assert fake.names() == ["synchronize", "empty_cache", "mem_get_info"]
    assert fake.calls[0][1] == CUDA and fake.calls[2][1] == CUDA  # this rank's GPU, not cuda:0's default
    assert budget == kv.cuda_kv_budget(60 * GiB, 80 * GiB, 0.9, 0.9, GiB)


def test_transient_peak_above_the_baseline_less_the_warmup_cache(monkeypatch):
    fake = FakeCuda(monkeypatch, allocated=10 * GiB)
    peak = kv.TransientPeak(CUDA)
    assert fake.names() == ["synchronize", "empty_cache", "reset_peak"]  # baseline without the reserve
    fake.peak = 13 * GiB  # weights + 1 GiB warmup cache + 2 GiB activations at the worst moment
    assert peak.bytes(resident=GiB) == 2 * GiB
    assert peak.bytes(resident=5 * GiB) == 0


def test_cap_process_memory_as_tgi(monkeypatch):
    fake = FakeCuda(monkeypatch)
    kv.cap_process_memory(CUDA, 1.0)  # the whole GPU: nothing to cap
    assert fake.calls == []
    kv.cap_process_memory(CUDA, 0.6)
    assert fake.calls == [("cap", 0.6, CUDA)]


# -- configuration: TGI's names and defaults -----------------------------------------------------


def _config(monkeypatch, device: str, **env):
    for name in ("CUDA_MEMORY_FRACTION", "PYTGI_KV_MEMORY_FRACTION", "TGI_WIGGLE_ROOM", "MAX_BATCH_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if device == "cuda":  # a GPU as build_config sees one; nothing is allocated
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    return build_config(None, revision=None, uds_path="/tmp/x", sharded=False, dtype=None,
                        trust_remote_code=False, json_output=False, log_level="INFO", device=device)


def test_config_defaults(monkeypatch):
    cuda = _config(monkeypatch, "cuda")
    assert cuda.memory_fraction == 1.0  # TGI's default: the whole GPU
    assert cuda.wiggle_room == pytest.approx(0.90)  # TGI's TGI_WIGGLE_ROOM default
    assert cuda.max_batch_size is None
    assert _config(monkeypatch, "cpu").memory_fraction == 0.1  # unchanged


def test_config_from_env(monkeypatch):
    config = _config(monkeypatch, "cuda", CUDA_MEMORY_FRACTION="0.5", TGI_WIGGLE_ROOM="0.8",
                     MAX_BATCH_SIZE="32")
    assert config.memory_fraction == 0.5 and config.wiggle_room == pytest.approx(0.8)
    assert config.max_batch_size == 32
    assert _config(monkeypatch, "cpu", PYTGI_KV_MEMORY_FRACTION="0.3").memory_fraction == 0.3


@pytest.mark.parametrize("env", [{"CUDA_MEMORY_FRACTION": "0"}, {"CUDA_MEMORY_FRACTION": "1.5"},
                                 {"TGI_WIGGLE_ROOM": "1"}, {"TGI_WIGGLE_ROOM": "0"}])
def test_config_rejects_fractions_out_of_range(monkeypatch, env):
    name = next(iter(env))
    with pytest.raises(ValueError, match=name):
        _config(monkeypatch, "cuda", **env)


# -- the warmup's glue (CPU engine; the CUDA parts stand in by fakes) ----------------------------


def _engine(folder: Path, **changes) -> Engine:
    config = replace(make_config(str(folder), block_size=4), **changes)
    model = get_model(folder, ModelContext(TPGroup(), config.device, config.dtype, 4))
    return Engine(config, model, TPGroup(), folder)


def _warm_batch() -> pb.Batch:
    return pb.Batch(id=0, size=1, requests=[pb.Request(
        id=0, input_ids=list(range(3, 23)),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=2))])


def test_cpu_warmup_never_touches_cuda(monkeypatch, tiny_llama: Path):
    _forbid_cuda(monkeypatch)
    engine = _engine(tiny_llama)
    response = engine.warmup(pb.WarmupRequest(max_prefill_tokens=20, batch=_warm_batch()))
    assert response.num_blocks > 2


def test_warmup_runs_the_sampler_pass_with_the_warmup_cache_alive(monkeypatch, tiny_llama: Path):
    seen = []
    original = shard.engine.warm_up

    def spy(vocab_size, rows, device, logits_dtype):
        seen.append((vocab_size, rows, device, logits_dtype, engine.kv_cache is not None))
        original(vocab_size, rows, device, logits_dtype)

    monkeypatch.setattr(shard.engine, "warmup_rows", lambda device, max_batch_size: min(max_batch_size, 3))
    monkeypatch.setattr(shard.engine, "warm_up", spy)
    engine = _engine(tiny_llama, max_batch_size=8)
    engine.warmup(pb.WarmupRequest(max_prefill_tokens=20, max_batch_total_tokens=64, batch=_warm_batch()))
    # The model's vocabulary, the capped row count, the shard's dtype; and the prefill's temporary
    # cache still allocated, so the peak counts both and subtracts that cache once.
    assert seen == [(128, 3, CPU, torch.float32, True)]
    assert engine.kv_cache.num_blocks == 1 + 64 // 4 and not engine.batches


def test_warmup_sizes_the_cache_from_the_budget_less_the_peak(monkeypatch, tiny_llama: Path):
    measured = {}

    class FakePeak:
        def __init__(self, device):
            measured["device"] = device

        def bytes(self, resident: int = 0) -> int:
            measured["resident"] = resident
            return 777

    def fake_budget(device, fraction, wiggle_room, transient):
        measured["budget"] = (device, fraction, wiggle_room, transient)
        return 50 * engine.info.kv_spec.bytes_per_block + 5

    monkeypatch.setattr(shard.engine, "TransientPeak", FakePeak)
    monkeypatch.setattr(shard.engine, "kv_budget", fake_budget)
    engine = _engine(tiny_llama, memory_fraction=0.7, wiggle_room=0.8)
    response = engine.warmup(pb.WarmupRequest(max_prefill_tokens=20, batch=_warm_batch()))
    # block 0, then 20 prompt tokens + 1 new one, 4 a block
    warm_cache_bytes = (1 + -(-21 // 4)) * engine.info.kv_spec.bytes_per_block
    assert measured == {"device": CPU, "resident": warm_cache_bytes, "budget": (CPU, 0.7, 0.8, 777)}
    assert response.num_blocks == 50 and engine.kv_cache.num_blocks == 50


# -- the launcher's flag: TGI's default and range, passed under the shard's env name ------------


def test_launcher_flag_defaults_to_the_whole_gpu_and_reaches_the_shard():
    from launcher import commands
    from launcher.config import ConfigError, LauncherArgs, validate

    assert LauncherArgs().cuda_memory_fraction == 1.0
    assert commands.shard_env(LauncherArgs(), 0, 1, {})["CUDA_MEMORY_FRACTION"] == "1.0"
    env = commands.shard_env(LauncherArgs(cuda_memory_fraction=0.4), 0, 1, {})
    assert env["CUDA_MEMORY_FRACTION"] == "0.4"
    validate(LauncherArgs(cuda_memory_fraction=1.0))
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ConfigError, match="cuda_memory_fraction"):
            validate(LauncherArgs(cuda_memory_fraction=bad))
