"""ShardConfig: the one frozen configuration of a shard process, built at the CLI edge.

This is the only module of the shard that reads environment variables (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT set by the launcher, and the HF cache variables).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

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
    dtype: torch.dtype
    block_size: int
    # Fraction of available RAM (CPU) or free GPU memory the KV cache may take when the
    # router gives no explicit `max_batch_total_tokens`.
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

    @property
    def tcp_address(self) -> str | None:
        return None if self.tcp_host is None else f"{self.tcp_host}:{self.tcp_base_port + self.local_rank}"

    @property
    def socket_path(self) -> str:
        return f"{self.uds_path}-{self.rank}"


ATTENTION_CHOICES = ("paged", "sdpa")


def default_cache_dir() -> Path:
    """pytgi's cache (GGUF conversions, compiled kernels): $PYTGI_CACHE, else $HF_HOME/pytgi."""
    env = os.environ
    hf_home = Path(env.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return Path(env.get("PYTGI_CACHE", hf_home / "pytgi"))


def _default_dtype(device: torch.device) -> torch.dtype:
    # fp32 on CPU: bf16 is 3-10x slower for prefill on CPUs without native BF16 (see
    # shared/reference/cpu-baseline.md §3d); fp16 is the usual choice on GPUs.
    return torch.float32 if device.type == "cpu" else torch.float16


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
) -> ShardConfig:
    env = os.environ
    rank = int(env.get("RANK", "0"))
    world_size = int(env.get("WORLD_SIZE", "1"))
    local_rank = int(env.get("LOCAL_RANK", str(rank)))
    tcp_host, tcp_base_port = _parse_tcp_address(tcp_address)
    if sharded and world_size < 2:
        raise ValueError("--sharded needs WORLD_SIZE >= 2 (set by text-generation-launcher --num-shard N)")
    if not sharded and world_size > 1:
        raise ValueError(f"WORLD_SIZE={world_size} but --sharded was not given")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", rank % torch.cuda.device_count())
    if block_size is None:
        # flash-attn's paged kernels need 256-token blocks; 16 keeps CPU prefix reuse fine-grained.
        block_size = 256 if dev.type == "cuda" and importlib.util.find_spec("flash_attn") else 16
    if quantize is not None and dev.type != "cpu":
        raise ValueError(f"--quantize {quantize} is implemented for CPU only; on GPUs serve float16 or bfloat16")
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
        dtype=DTYPES[dtype] if dtype else _default_dtype(dev),
        block_size=block_size,
        memory_fraction=memory_fraction if memory_fraction is not None else float(
            env.get("CUDA_MEMORY_FRACTION" if dev.type == "cuda" else "PYTGI_KV_MEMORY_FRACTION",
                    "0.9" if dev.type == "cuda" else "0.1")),
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
    )


def _parse_tcp_address(address: str | None) -> tuple[str | None, int | None]:
    if not address:
        return None, None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--tcp-address must be HOST:PORT (got {address!r})")
    return host, int(port)
