"""ShardConfig: the one frozen configuration of a shard process, built at the CLI edge.

This is the only module of the shard that reads environment variables (RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT set by the launcher, and the HF cache
variables).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pytgi_common.adapters import AdapterSpec, parse_lora_adapters
from shard.graph_sizes import parse_cuda_graphs
from shard.speculation import check_speculate
from shard.watermark import Watermark

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class ShardConfig:
    model_id: str | None
    revision: str | None
    uds_path: str
    rank: int
    world_size: int
    master_addr: str
    master_port: int
    device: torch.device
    # None: "auto", resolved once in cli._load from the checkpoint and the device (shard/dtype.py).
    dtype: torch.dtype | None
    # The KV block size the user asked for (--block-size); None: the attention backend's own
    # (shard/attention.py plan_attention decides, once the model's head dim is known).
    block_size: int | None
    # When the router gives no `max_batch_total_tokens`. CUDA (CUDA_MEMORY_FRACTION, TGI's
    # meaning): the share of the GPU's TOTAL memory this process may use, weights and
    # activations included; the KV cache gets what the warmup leaves of it. CPU
    # (PYTGI_KV_MEMORY_FRACTION): the share of available RAM the KV cache may take.
    memory_fraction: float
    cache_dir: Path
    hub_cache_dir: Path | None
    offline: bool
    trust_remote_code: bool
    num_threads: int
    json_output: bool
    log_level: str
    quantize: str | None = None
    # "paged": decode attention reads the paged cache in place (the compiled CPU kernel, or
    # flash-attn on CUDA when installed); "sdpa": torch SDPA over gathered K/V everywhere (the
    # oracle). Env ATTENTION, TGI's name for the same choice.
    attention: str = "paged"
    local_rank: int = 0  # rank within this node (multi-node: rank - node_rank * shards per node)
    # Multi-node: also serve gRPC on TCP at this host, port tcp_base_port + local_rank, and
    # advertise that address in ServiceDiscovery (the router on node 0 reaches remote ranks).
    tcp_host: str | None = None
    tcp_base_port: int | None = None
    # CUDA (TGI_WIGGLE_ROOM, TGI's name and default): the share of what the warmup leaves that
    # the KV cache takes; the rest is for what the warmup does not see (fragmentation, CUDA
    # graphs, NCCL buffers, decode batches larger than the warmup's).
    wiggle_room: float = 0.90
    # The router's --max-batch-size (MAX_BATCH_SIZE, only when the user set it): the warmup's
    # sampler pass runs at this many rows (capped at sampling.SAMPLER_CHUNK).
    max_batch_size: int | None = None
    # Decode batch sizes to capture as CUDA graphs (--cuda-graphs / CUDA_GRAPHS, TGI's name and
    # format); None: the default (shard/cuda_graphs.py), (): "0", off.
    cuda_graphs: tuple[int, ...] | None = None
    # --watermark-gamma / --watermark-delta (WATERMARK_GAMMA / WATERMARK_DELTA, TGI's names and
    # defaults): for the requests that ask for a watermark.
    watermark: Watermark = Watermark()
    # --speculate / SPECULATE (TGI's name): draft tokens a decode row may verify per step, by n-gram
    # lookup in its own ids (shard/speculation.py); 0: off.
    speculate: int = 0
    # --lora-adapters / LORA_ADAPTERS (TGI's name and syntax, pytgi_common/adapters.py): the LoRA
    # adapters to load (shard/lora.py), in the order given; requests name them by id.
    lora_adapters: tuple[AdapterSpec, ...] = ()

    @property
    def tcp_address(self) -> str | None:
        return None if self.tcp_host is None else f"{self.tcp_host}:{self.tcp_base_port + self.local_rank}"

    @property
    def socket_path(self) -> str:
        return f"{self.uds_path}-{self.rank}"


ATTENTION_CHOICES = ("paged", "sdpa")
_WATERMARK = Watermark()  # the defaults


def default_cache_dir() -> Path:
    """pytgi's cache (GGUF conversions, compiled kernels): $PYTGI_CACHE, else $HF_HOME/pytgi."""
    env = os.environ
    hf_home = Path(env.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return Path(env.get("PYTGI_CACHE", hf_home / "pytgi"))


def build_config(
    model_id: str | None,
    *,
    revision: str | None,
    uds_path: str,
    sharded: bool,
    dtype: str | None,
    trust_remote_code: bool,
    json_output: bool,
    log_level: str,
    block_size: int | None = None,
    memory_fraction: float | None = None,
    num_threads: int | None = None,
    device: str | None = None,
    quantize: str | None = None,
    tcp_address: str | None = None,
    cuda_graphs: str | None = None,
    speculate: int | None = None,
    lora_adapters: str | None = None,
) -> ShardConfig:
    env = os.environ
    rank = int(env.get("RANK", "0"))
    world_size = int(env.get("WORLD_SIZE", "1"))
    local_rank = int(env.get("LOCAL_RANK", str(rank)))
    local_world_size = int(env.get("LOCAL_WORLD_SIZE", str(world_size)))
    tcp_host, tcp_base_port = _parse_tcp_address(tcp_address)
    if sharded and world_size < 2:
        raise ValueError("--sharded needs WORLD_SIZE >= 2 (set by text-generation-launcher --num-shard N)")
    if not sharded and world_size > 1:
        raise ValueError(f"WORLD_SIZE={world_size} but --sharded was not given")
    cuda_available = torch.cuda.is_available()
    dev = plan_device(device, local_rank, local_world_size, cuda_available,
                      torch.cuda.device_count() if cuda_available else 0, why_no_cuda)
    if block_size is not None and block_size < 1:
        raise ValueError(f"--block-size must be >= 1 (got {block_size})")
    if quantize is not None and dev.type != "cpu":
        raise ValueError(f"--quantize {quantize} is implemented for CPU only; on GPUs serve float16 or bfloat16")
    if speculate is not None:
        check_speculate(speculate)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unsupported --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    hub_cache = env.get("HUGGINGFACE_HUB_CACHE") or env.get("HF_HUB_CACHE")
    attention = env.get("ATTENTION", "paged").lower()
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"unsupported ATTENTION={attention!r}; choose one of {', '.join(ATTENTION_CHOICES)}")
    offline = env.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}
    if num_threads is None:
        num_threads = int(env.get("PYTGI_NUM_THREADS", "0")) or max(1, (os.cpu_count() or 1) // world_size)
    return ShardConfig(
        model_id=model_id or None,
        revision=revision,
        uds_path=uds_path,
        rank=rank,
        world_size=world_size,
        master_addr=env.get("MASTER_ADDR", "localhost"),
        master_port=int(env.get("MASTER_PORT", "29500")),
        device=dev,
        dtype=DTYPES[dtype] if dtype else None,
        block_size=block_size,
        memory_fraction=memory_fraction if memory_fraction is not None else _memory_fraction(env, dev),
        wiggle_room=_fraction(env, "TGI_WIGGLE_ROOM", "0.90", allow_one=False),
        max_batch_size=int(env["MAX_BATCH_SIZE"]) if env.get("MAX_BATCH_SIZE") else None,
        watermark=Watermark(float(env.get("WATERMARK_GAMMA") or _WATERMARK.gamma),
                            float(env.get("WATERMARK_DELTA") or _WATERMARK.delta)),
        cache_dir=default_cache_dir(),
        hub_cache_dir=Path(hub_cache) if hub_cache else None,
        offline=offline,
        trust_remote_code=trust_remote_code,
        num_threads=num_threads,
        json_output=json_output,
        log_level=log_level,
        quantize=quantize,
        attention=attention,
        local_rank=local_rank,
        tcp_host=tcp_host,
        tcp_base_port=tcp_base_port,
        cuda_graphs=parse_cuda_graphs(cuda_graphs),
        speculate=speculate or 0,
        lora_adapters=parse_lora_adapters(lora_adapters, model_id or None),
    )


def _memory_fraction(env, device: torch.device) -> float:
    if device.type == "cuda":
        return _fraction(env, "CUDA_MEMORY_FRACTION", "1.0")  # TGI's default: the whole GPU
    return _fraction(env, "PYTGI_KV_MEMORY_FRACTION", "0.1")


def _fraction(env, name: str, default: str, *, allow_one: bool = True) -> float:
    value = float(env.get(name, default))
    if not (0 < value < 1 or (allow_one and value == 1)):
        raise ValueError(f"{name}={value} must be in (0, 1{']' if allow_one else ')'}")
    return value


def plan_device(device: str | None, local_rank: int, local_world_size: int, cuda_available: bool,
                device_count: int, why_no_cuda: Callable[[], str]) -> torch.device:
    """This rank's device: `cuda:{local_rank}`, one GPU per shard of this node, or the CPU.

    `device` is --device: "cuda" when the launcher counted GPUs (launcher/commands.py), "cpu",
    "cuda:N" (one shard on one chosen GPU), or None (a shard started by hand: CUDA when torch
    sees it). The index is the rank on this node, not the global rank: ranks of a multi-node
    group outnumber one node's GPUs. A rank that cannot get a GPU of its own refuses to start
    (two NCCL ranks on one GPU fail or hang), and a shard started for a GPU that torch cannot
    see refuses too, rather than serving float32 on the CPU unnoticed.
    """
    if device is None:
        device = "cuda" if cuda_available else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in {"cpu", "cuda"}:
        raise ValueError(f"unsupported --device {device!r}; choose cpu, cuda or cuda:N")
    if dev.type == "cpu":
        return dev
    if not cuda_available:
        raise ValueError(f"--device {device} (the launcher found GPUs on this machine) but {why_no_cuda()} "
                         "(to serve on the CPU instead, start the launcher with CUDA_VISIBLE_DEVICES=\"\")")
    if dev.index is not None:
        if local_world_size > 1:
            raise ValueError(f"--device {device} names one GPU for all {local_world_size} shards of this node; "
                             "use --device cuda (shard i takes GPU i)")
        if dev.index >= device_count:
            raise ValueError(f"--device {device} but torch sees {device_count} GPU(s) (CUDA_VISIBLE_DEVICES)")
        return dev
    if local_world_size > device_count:
        raise ValueError(f"{local_world_size} shards on this node but torch sees {device_count} GPU(s); one shard "
                         f"per GPU: pass --num-shard {device_count} or make more GPUs visible (CUDA_VISIBLE_DEVICES)")
    if not 0 <= local_rank < device_count:
        raise ValueError(f"LOCAL_RANK={local_rank} has no GPU: torch sees {device_count} GPU(s) on this node")
    return torch.device("cuda", local_rank)


# The oldest driver each CUDA major version of torch runs on (NVIDIA's minor version
# compatibility table: docs.nvidia.com/deploy/cuda-compatibility).
MIN_DRIVER = {11: "450", 12: "525", 13: "580"}


def no_cuda_explanation(torch_version: str, cuda_version: str | None, init_error: str) -> str:
    """Why torch sees no GPU, in one line: its build, torch's own reason, the driver it needs."""
    if cuda_version is None:
        return f"torch {torch_version} is a CPU-only build: install a CUDA build of torch"
    driver = MIN_DRIVER.get(int(cuda_version.split(".")[0]))
    need = f"CUDA {cuda_version} builds need NVIDIA driver >= {driver}" if driver else f"built for CUDA {cuda_version}"
    return (f"torch {torch_version} (CUDA {cuda_version}) sees none ({init_error}); {need}: check the driver "
            "version in nvidia-smi, or install a torch built for the CUDA version your driver supports")


def why_no_cuda() -> str:
    """`no_cuda_explanation` for this process; torch's init error names the real cause (an old
    driver, no device node in a container, ...)."""
    try:
        torch.cuda.init()
        init_error = "torch.cuda.is_available() is False"
    except Exception as error:  # any failure here is the explanation we want
        init_error = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return no_cuda_explanation(torch.__version__, torch.version.cuda, init_error)


def _parse_tcp_address(address: str | None) -> tuple[str | None, int | None]:
    if not address:
        return None, None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--tcp-address must be HOST:PORT (got {address!r})")
    return host, int(port)
