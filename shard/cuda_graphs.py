"""CUDA graphs for decode: one captured forward per batch size, replayed for pure-decode steps.

A replayed step: the batch's rows → `plan_decode` (host tensors padded to the smallest captured
size that holds the batch) → two host→device copies into the static buffers → `replay()` → the
first rows of the static logits. Every other step runs eagerly, as it would without graphs:
`DecodeGraphs.plan` returns None for a prefill, a prompt chunk, a mixed step, a step with
speculative drafts (several query tokens per row), a step with a LoRA adapter row (its grouping
changes every step; graphs are captured without adapters), a batch larger than every captured
size, an explicit-slot request (the health probe) or a sequence longer than the static block
table.

Inside a graph nothing may depend on Python values that change per step, so decode attention is
flash-attn's `flash_attn_with_kvcache`, whose lengths and block tables are tensors
(`KVCacheDecodeBackend`), not the eager varlen call that takes `max_seqlen_k` as an int.

Padding rows write their K/V into slot 0 and attend to that one token; their logits are
dropped. Block 0 belongs to no request (the router never allocates it: it is the health probe's,
and the probe writes slot 0 before it reads it in a step of its own), so this is harmless.

The mechanism is behind `GraphCapture` (capture a zero-argument function, get a replay): CUDA
graphs on the GPU, and in the CPU tests an eager stand-in that runs the function again at each
replay, which checks everything but the capture itself.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from shard.batch import Batch
    from shard.config import ShardConfig
    from shard.kv_cache import KVCache
    from shard.models.base import CausalLM

log = logging.getLogger(__name__)

# TGI's --cuda-graphs default. Off here until tests/gpu/test_cuda_graphs.py has passed on a GPU
# (scripts/gpu-smoke.sh): the path has only run on CPU, through the eager stand-in.
TGI_DEFAULT_SIZES = (1, 2, 4, 8, 16, 32)
DEFAULT_SIZES: tuple[int, ...] = ()

# Padding row: token 0 at position 0, written to slot 0 of the reserved block 0, reading 1 token.
_PAD_SLOT, _PAD_KV_LEN = 0, 1


def decode_graph_sizes(requested: tuple[int, ...] | None, device: torch.device, backend_name: str,
                       model_impl: str) -> tuple[int, ...]:
    """The batch sizes to capture (ascending; empty: none). One log line when they are off on a
    GPU, or asked for on a CPU. `requested` is ShardConfig.cuda_graphs (ascending; None: the
    default; (): "0")."""
    sizes = DEFAULT_SIZES if requested is None else requested
    if device.type != "cuda":
        if requested:
            log.info("CUDA graphs: ignored on %s (--cuda-graphs %s)", device.type, ",".join(map(str, requested)))
        return ()
    if not sizes:
        log.info("CUDA graphs: off (%s)", "--cuda-graphs 0" if requested == () else "the default until they have "
                 f"run on a GPU; --cuda-graphs {','.join(map(str, TGI_DEFAULT_SIZES))}, TGI's default, turns them on")
        return ()
    if backend_name != "flash-attn" or model_impl != "llama":
        log.info("CUDA graphs: off, they need flash-attn and the fast model path (attention %s, model %s)",
                 backend_name, model_impl)
        return ()
    return sizes


def pick_size(sizes: tuple[int, ...], num_rows: int) -> int | None:
    """The smallest captured size (ascending `sizes`) that holds `num_rows` rows; None: none does."""
    for size in sizes:
        if size >= num_rows:
            return size
    return None


@dataclass(frozen=True, slots=True)
class DecodeMeta:
    """Attention inputs of a pure-decode step, every one a tensor (static inside a graph)."""

    slot_mapping: torch.Tensor  # [B] int64: cache slot of each row's new token
    kv_lens: torch.Tensor  # [B] int32: each row's tokens in the cache, its new one included
    block_tables: torch.Tensor  # [B, W] int32, padded with block 0 (never read past kv_lens)


class FlashDecode:
    """flash-attn 2's `flash_attn_with_kvcache(q, k_cache, v_cache, ..., cache_seqlens=,
    block_table=, softmax_scale=, causal=)` for one query token per row. The cache is paged,
    [num_blocks, block_size, KVH, D] with block_size a multiple of 256; `cache_seqlens` [B]
    int32 counts each row's tokens already in it (no k/v passed: nothing is appended);
    `block_table` [B, W] int32. q is [B, 1, H, D]; with one query the causal mask (aligned
    bottom-right) lets it see every cached token."""

    def __init__(self):
        from flash_attn import flash_attn_with_kvcache  # lazy: never imported on CPU

        if "block_table" not in inspect.signature(flash_attn_with_kvcache).parameters:
            raise ImportError("this flash-attn's flash_attn_with_kvcache reads no paged cache (block_table)")
        self._kvcache = flash_attn_with_kvcache

    def __call__(self, q, k_cache, v_cache, kv_lens, block_tables, scale) -> torch.Tensor:
        """q: [B, H, D] → [B, H, D]."""
        out = self._kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=kv_lens, block_table=block_tables,
                            softmax_scale=scale, causal=True)
        return out.squeeze(1)


class KVCacheDecodeBackend:
    """The attention backend of captured decode: writes the new K/V with `index_copy_` at the
    slot mapping (as the eager flash backend does), then `attend`s through the block tables."""

    name = "flash-attn-kvcache"

    def __init__(self, scale: float | None, attend: Callable):
        self.scale = scale
        self.attend = attend  # FlashDecode on CUDA; a torch stand-in in the CPU tests

    def forward(self, q, k, v, cache, meta: DecodeMeta) -> torch.Tensor:
        """q: [B, H, D]; k, v: [B, KVH, D] → [B, H, D]."""
        k_cache, v_cache = cache
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, meta.slot_mapping, v)
        return self.attend(q, k_cache, v_cache, meta.kv_lens, meta.block_tables, self.scale)


@dataclass(frozen=True, slots=True)
class DecodePlan:
    """One pure-decode step on the host, padded to `max_rows` rows (the largest captured size, so
    that every step copies whole static buffers and stale rows never survive); the graph of
    `size` reads the first `size` of them. Also what `Batch.advance` reads of a step."""

    size: int  # the captured batch size that replays this step
    num_rows: int  # the batch's rows (the rest are padding)
    longs: torch.Tensor  # [3, max_rows] int64: token ids, positions, slots
    ints: torch.Tensor  # [max_rows * (1 + W)] int32: kv lengths, then the [max_rows, W] block table
    sample_rows: list[int]
    sample_logits: list[int]
    prompt_logit_spans: tuple = ()


def plan_decode(batch: Batch, sizes: tuple[int, ...], block_size: int, width: int,
                pin: bool = False) -> DecodePlan | None:
    """The step's padded static inputs, or None when it must run eagerly. `sizes` ascending;
    `width` is the block-table width every graph was captured with; `pin`: page-locked host
    tensors (CUDA), so that the copies to the device are asynchronous."""
    size = pick_size(sizes, len(batch))
    if size is None:
        return None
    max_rows = sizes[-1]
    ids, positions, slots, kv_lens, tables = [], [], [], [], []
    for r in batch.requests:
        if r.slots is not None or r.num_computed != r.seq_len - 1 or r.is_prefilling or r.draft:
            return None  # a probe, a prompt (chunk) or a request with several tokens to compute
        if r.adapter is not None:
            return None  # LoRA: the captured forwards carry no adapter
        position = r.num_computed
        used = position // block_size + 1
        if used > width or len(r.blocks) < used:
            return None  # longer than the static table (or a malformed request: eager raises)
        ids.append(r.output_ids[-1])
        positions.append(position)
        slots.append(r.blocks[position // block_size] * block_size + position % block_size)
        kv_lens.append(position + 1)
        tables += r.blocks[:used]
        tables += [0] * (width - used)
    pad = max_rows - len(batch)
    longs = torch.tensor([ids + [0] * pad, positions + [0] * pad, slots + [_PAD_SLOT] * pad],
                         dtype=torch.long, pin_memory=pin)
    ints = torch.tensor(kv_lens + [_PAD_KV_LEN] * pad + tables + [0] * (pad * width), dtype=torch.int32,
                        pin_memory=pin)
    rows = list(range(len(batch)))
    return DecodePlan(size, len(batch), longs, ints, rows, rows)


class GraphCapture(Protocol):
    def capture(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """Record `fn` (which reads only static buffers); the result replays it and returns its
        output tensor, overwritten in place by each replay."""
        ...


class CudaGraphCapture:
    """torch.cuda.graph capture as torch's docs describe it: one warmup run on a side stream
    (lazy initialisations, cuBLAS workspaces), then the capture on that stream, every graph in
    one memory pool (capture the largest first: the smaller ones fit in its memory)."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        current = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            fn()
        current.wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            out = fn()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay


class DecodeGraphs:
    """The captured decode forwards of one KV cache, their static buffers and counters.

    The static buffers are sized for the largest captured size; the graph of size s reads their
    first s rows (views), so one pair of copies fills any of them.
    """

    def __init__(self, model: CausalLM, kv_cache: KVCache, sizes: tuple[int, ...], width: int,
                 capture: GraphCapture, backend: KVCacheDecodeBackend):
        self.sizes = tuple(sorted(sizes))
        self.width = width
        self.block_size = kv_cache.spec.block_size
        self.num_replays = 0
        device = kv_cache.layer(0)[0].device
        max_rows = self.sizes[-1]
        self._pin = device.type == "cuda"
        self._longs = torch.zeros(3, max_rows, dtype=torch.long, device=device)
        self._ints = torch.zeros(max_rows * (1 + width), dtype=torch.int32, device=device)
        self._ints[:max_rows] = _PAD_KV_LEN
        self._replays: dict[int, Callable[[], torch.Tensor]] = {}
        for size in reversed(self.sizes):  # largest first: the pool then serves the smaller ones
            self._replays[size] = capture.capture(self._forward(model, kv_cache, backend, size))

    def _forward(self, model, kv_cache, backend, size: int) -> Callable[[], torch.Tensor]:
        max_rows = self.sizes[-1]
        ids, positions, slots = self._longs[0, :size], self._longs[1, :size], self._longs[2, :size]
        meta = DecodeMeta(slots, self._ints[:size], self._ints[max_rows:].view(max_rows, self.width)[:size])
        return lambda: model.forward(ids, positions, kv_cache, meta, None, backend=backend)

    def plan(self, batch: Batch) -> DecodePlan | None:
        return plan_decode(batch, self.sizes, self.block_size, self.width, self._pin)

    def replay(self, plan: DecodePlan) -> torch.Tensor:
        """[plan.num_rows, vocab] float32 logits; a view valid until the next replay."""
        self._longs.copy_(plan.longs, non_blocking=True)
        self._ints.copy_(plan.ints, non_blocking=True)
        logits = self._replays[plan.size]()
        self.num_replays += 1
        return logits[: plan.num_rows]


def capture_decode_graphs(model: CausalLM, kv_cache: KVCache, config: ShardConfig,
                          max_total_tokens: int) -> DecodeGraphs | None:
    """Capture the decode graphs for this KV cache (end of warmup), or None when they are off."""
    sizes = decode_graph_sizes(config.cuda_graphs, config.device, model.backend.name, model.info.impl)
    if not sizes:
        return None
    width = -(-max_total_tokens // kv_cache.spec.block_size)
    backend = KVCacheDecodeBackend(model.backend.scale, FlashDecode())
    # NOTE: a capture records the current device's current stream: make it the cache's device.
    # (Replays need nothing: CUDAGraph.replay switches to its device itself.)
    try:
        with torch.cuda.device(config.device):
            graphs = DecodeGraphs(model, kv_cache, sizes, width, CudaGraphCapture(config.device), backend)
    except Exception as error:  # noqa: BLE001 - any capture failure: serve eagerly, as TGI does
        # A failed capture (an op that syncs, out of memory in the margin, a driver limit) must
        # not stop the server: graphs are an optimisation, and every step can run eagerly.
        torch.cuda.empty_cache()
        log.warning("CUDA graphs: capture failed, decoding eagerly: %s: %s", type(error).__name__,
                    str(error).strip().splitlines()[0] if str(error).strip() else "")
        return None
    log.info("CUDA graphs: captured decode at batch sizes %s (block tables of %d blocks)",
             ",".join(map(str, graphs.sizes)), width)
    return graphs
