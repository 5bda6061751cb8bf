"""Which device a rank runs on and how its process group starts: the decisions as pure functions,
the NCCL call order with fakes, and the real start-up path with gloo on 2 processes."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shard import distributed
from shard.config import build_config, no_cuda_explanation, plan_device
from shard.distributed import TPGroup, init_tp_group, process_group_options
from tests.conftest import make_config

CPU = torch.device("cpu")


def cuda(index: int) -> torch.device:
    return torch.device("cuda", index)


def unreachable() -> str:
    raise AssertionError("only asked when torch sees no GPU")


# -- plan_device --------------------------------------------------------------------------------


@pytest.mark.parametrize("device, local_rank, local_world, available, count, expected", [
    (None, 0, 1, False, 0, CPU),  # started by hand, no GPU: the CPU, as before
    (None, 0, 1, True, 1, cuda(0)),
    (None, 1, 2, True, 2, cuda(1)),
    ("cpu", 1, 2, True, 2, CPU),
    ("cuda", 0, 1, True, 1, cuda(0)),
    ("cuda", 1, 2, True, 2, cuda(1)),
    ("cuda", 1, 2, True, 4, cuda(1)),
    ("cuda:3", 0, 1, True, 4, cuda(3)),
])
def test_each_rank_of_a_node_takes_the_gpu_of_its_local_rank(device, local_rank, local_world, available, count,
                                                              expected):
    assert plan_device(device, local_rank, local_world, available, count, unreachable) == expected


def test_multi_node_ranks_use_the_local_rank_not_the_global_one():
    """Node 1 of 2, 2 GPUs each: global rank 3 is LOCAL_RANK 1 → cuda:1 (rank % count was right
    only by luck; with LOCAL_RANK it is right by construction)."""
    assert plan_device("cuda", 1, 2, True, 2, unreachable) == cuda(1)


@pytest.mark.parametrize("device, local_rank, local_world, count, message", [
    ("cuda", 0, 3, 2, "3 shards on this node but torch sees 2 GPU(s); one shard per GPU: pass --num-shard 2"),
    ("cuda", 2, 2, 2, "LOCAL_RANK=2 has no GPU: torch sees 2 GPU(s) on this node"),
    ("cuda:1", 0, 2, 2, "--device cuda:1 names one GPU for all 2 shards of this node"),
    ("cuda:2", 0, 1, 2, "--device cuda:2 but torch sees 2 GPU(s)"),
    ("tpu", 0, 1, 2, "unsupported --device 'tpu'; choose cpu, cuda or cuda:N"),
    ("mps", 0, 1, 2, "unsupported --device 'mps'"),
])
def test_a_rank_without_a_gpu_of_its_own_refuses_to_start(device, local_rank, local_world, count, message):
    with pytest.raises(ValueError) as error:
        plan_device(device, local_rank, local_world, True, count, unreachable)
    assert message in str(error.value)


def test_a_shard_started_for_a_gpu_that_torch_cannot_see_says_why():
    with pytest.raises(ValueError) as error:
        plan_device("cuda", 0, 2, False, 0, lambda: "torch 2.13.0+cu130 (CUDA 13.0) sees none (...)")
    assert str(error.value) == ("--device cuda (the launcher found GPUs on this machine) but "
                                "torch 2.13.0+cu130 (CUDA 13.0) sees none (...) "
                                '(to serve on the CPU instead, start the launcher with CUDA_VISIBLE_DEVICES="")')


def test_the_explanation_names_the_build_and_the_driver_it_needs():
    text = no_cuda_explanation("2.13.0+cu130", "13.0", "The NVIDIA driver on your system is too old (found 12080)")
    assert text.startswith("torch 2.13.0+cu130 (CUDA 13.0) sees none (The NVIDIA driver on your system is too old")
    assert "CUDA 13.0 builds need NVIDIA driver >= 580" in text and "nvidia-smi" in text
    assert "driver >= 525" in no_cuda_explanation("2.7.0+cu128", "12.8", "no device")
    assert no_cuda_explanation("2.13.0+cpu", None, "Torch not compiled with CUDA enabled") == (
        "torch 2.13.0+cpu is a CPU-only build: install a CUDA build of torch")


def test_build_config_reads_the_local_world_size_and_keeps_the_cpu_path(monkeypatch):
    kwargs = dict(revision=None, uds_path="/tmp/x", sharded=True, dtype=None, trust_remote_code=False,
                  json_output=False, log_level="info")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name, value in dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(name, value)
    assert build_config(None, device="cuda", **kwargs).device == cuda(1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 shards on a 2-GPU node
    with pytest.raises(ValueError, match="4 shards on this node but torch sees 2 GPU"):
        build_config(None, device="cuda", **kwargs)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = build_config(None, **kwargs)  # no --device, no GPU: the CPU, as before
    assert config.device == CPU and config.block_size is None  # None: the attention plan decides
    with pytest.raises(ValueError, match="--block-size must be >= 1"):
        build_config(None, block_size=0, **kwargs)


def test_serve_exits_with_one_line_when_torch_sees_no_gpu(tmp_path):
    """What the launcher's --device cuda does where torch cannot use the GPUs (hidden here)."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "text-generation-server"), "serve", "--device", "cuda",
         "--uds-path", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=120, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin"})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: --device cuda (the launcher found GPUs on this machine) but torch {torch.__version__}")


# -- process group start-up ---------------------------------------------------------------------


def test_nccl_is_bound_to_the_ranks_gpu_and_gloo_to_nothing():
    gpu = replace(make_config(), rank=1, world_size=2, device=cuda(1), master_addr="10.0.0.1", master_port=1234)
    options = process_group_options(gpu)
    assert options["backend"] == "nccl" and options["device_id"] == cuda(1)
    assert options["init_method"] == "tcp://10.0.0.1:1234" and (options["rank"], options["world_size"]) == (1, 2)
    assert options["timeout"] == distributed.COLLECTIVE_TIMEOUT
    cpu = process_group_options(replace(make_config(), rank=1, world_size=2))
    assert cpu["backend"] == "gloo" and cpu["device_id"] is None


def test_the_gpu_is_set_before_the_process_group_starts(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(("init", kw["backend"], kw["device_id"])))
    tp = init_tp_group(replace(make_config(), rank=1, world_size=2, device=cuda(1)))
    assert calls == [("set_device", cuda(1)), ("init", "nccl", cuda(1))]
    assert (tp.rank, tp.world_size, tp.device) == (1, 2, cuda(1))
    calls.clear()
    single = init_tp_group(replace(make_config(), device=cuda(0)))
    assert calls == [("set_device", cuda(0))] and single.device == cuda(0) and single.world_size == 1
    calls.clear()
    assert init_tp_group(make_config()).device == CPU and calls == []  # CPU: no CUDA call at all


def test_a_single_shard_group_answers_without_collectives(monkeypatch):
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: pytest.fail("no collective with one shard"))
    tp = TPGroup(device=CPU)
    assert tp.min_int(7) == 7 and tp.all_gather_object("x") == ["x"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, port: int, results) -> None:
    """One rank through the real start-up path: build_config-shaped config → init_tp_group."""
    torch.set_num_threads(1)
    config = replace(make_config(), rank=rank, world_size=2, master_addr="127.0.0.1", master_port=port)
    tp = init_tp_group(config)
    devices = []
    reduce = dist.all_reduce

    def recording_all_reduce(tensor, *args, **kwargs):
        devices.append(tensor.device)
        return reduce(tensor, *args, **kwargs)

    dist.all_reduce = recording_all_reduce
    smallest = tp.min_int(100 + 50 * rank)  # the warmup's KV blocks: every rank takes the smallest
    total = tp.all_reduce(torch.full((2,), float(rank + 1), device=tp.device)).tolist()
    gathered = tp.all_gather_object(f"unix:///tmp/s-{rank}")
    # The server gathers from its executor thread: the group's own device holds there too.
    from_thread = []
    worker = threading.Thread(target=lambda: from_thread.append(tp.all_gather_object(rank * 10)))
    worker.start()
    worker.join()
    tp.barrier()
    results[rank] = (tp.device, smallest, total, gathered, from_thread[0], devices)
    dist.destroy_process_group()


def test_two_ranks_start_and_agree_over_gloo():
    results = mp.Manager().dict()
    mp.start_processes(_rank, args=(_free_port(), results), nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        device, smallest, total, gathered, from_thread, devices = results[rank]
        assert device == CPU
        assert smallest == 100 and total == [3.0, 3.0]
        assert gathered == ["unix:///tmp/s-0", "unix:///tmp/s-1"] and from_thread == [0, 10]
        assert devices == [CPU, CPU]  # min_int's tensor and the activation: on the group's device
