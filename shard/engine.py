"""Engine: owns the model, the KV cache and the cached batches; runs prefill / decode steps.

Every RPC that computes lands in `_step`: draft (speculation) → prepare ragged inputs → forward →
sample → advance → drop finished requests → cache the batch. The router owns KV blocks; the
engine only obeys.
"""

from __future__ import annotations

import logging
import secrets
import time
from functools import partial
from pathlib import Path

import torch

from shard.attention import SeqStep, build_metadata
from shard.batch import Batch, StepRows
from shard.config import ShardConfig
from shard.cuda_graphs import DecodeGraphs, capture_decode_graphs
from shard.distributed import TPGroup
from shard.grammar import Grammars
from shard.kv_cache import KVCache, TransientPeak, kv_budget
from shard.models.base import CausalLM
from shard.sampling import warm_up, warmup_rows
from shard.speculation import MEASURED_SIZES, STEP_TOKENS, TOKEN_COST, StepCost, draft_tokens
from pytgi_proto import generate_pb2 as pb

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, config: ShardConfig, model: CausalLM, tp: TPGroup, model_path: Path):
        self.config = config
        self.model = model
        self.tp = tp
        self.model_path = model_path
        self.info = model.info
        self.block_size = model.info.kv_spec.block_size
        self.eos_ids = frozenset(model.info.eos_token_ids)
        self.kv_cache: KVCache | None = None
        # Decode forwards captured as CUDA graphs for `kv_cache` (end of warmup); None: all eager.
        self.graphs: DecodeGraphs | None = None
        self.batches: dict[int, Batch] = {}
        # --speculate: what a step costs by its tokens; measured at warmup on a CPU (`_measure_steps`).
        self.step_cost = StepCost.linear(TOKEN_COST[config.device.type])
        # Rank 0's random base for the seeds of requests that come without one: every rank must
        # sample the same tokens (a collective: every rank constructs its Engine).
        self.seed_base = int(tp.all_gather_object(secrets.randbits(64))[0])
        # Constrained decoding; the tokenizer is loaded on the first request with a grammar.
        self.grammars = Grammars(model_path, self.info.vocab_size, self.eos_ids,
                                 trust_remote_code=config.trust_remote_code)

    # -- RPCs ---------------------------------------------------------------------------------

    def get_info(self) -> pb.InfoResponse:
        info = self.info
        response = pb.InfoResponse(
            requires_padding=False, dtype=str(self.config.dtype), device_type=self.config.device.type,
            speculate=self.config.speculate, support_chunking=True, use_prefix_caching=True,
            attention_impl=self.model.backend.name, block_size=self.block_size, vocab_size=info.vocab_size,
            max_position_embeddings=info.max_position_embeddings, eos_token_ids=list(info.eos_token_ids),
            model_path=str(self.model_path), model_impl=info.impl, world_size=self.tp.world_size,
            supports_grammar=self.grammars.available, adapter_ids=list(info.adapter_ids),
        )
        if info.window_size:
            response.window_size = info.window_size
        return response

    def prefill(self, request: pb.PrefillRequest) -> pb.PrefillResponse:
        start = time.perf_counter_ns()
        batch = Batch.from_pb(request.batch, self.info.vocab_size, self.config.device, self.grammars,
                              self.seed_base, self.config.watermark, self.config.speculate, self.info.adapter_ids)
        concat_ns = None
        if request.HasField("cached_batch"):
            concat_start = time.perf_counter_ns()
            cached = self._pop(request.cached_batch.id)
            cached.apply_updates(request.updates)
            batch = Batch.concatenate([cached, batch], request.batch.id)
            concat_ns = time.perf_counter_ns() - concat_start
        return self._step(batch, start, concat_ns, pb.PrefillResponse)

    def decode(self, request: pb.DecodeRequest) -> pb.DecodeResponse:
        start = time.perf_counter_ns()
        if not request.batches:
            raise ValueError("Decode needs at least one batch")
        batches = [self._pop(b.id) for b in request.batches]
        for batch in batches:
            batch.apply_updates(request.updates)
        concat_ns = None
        if len(batches) > 1:
            concat_start = time.perf_counter_ns()
            batch = Batch.concatenate(batches, batches[0].id)
            concat_ns = time.perf_counter_ns() - concat_start
        else:
            batch = batches[0]
        return self._step(batch, start, concat_ns, pb.DecodeResponse)

    def filter_batch(self, batch_id: int, request_ids: list[int]) -> pb.CachedBatch:
        batch = self._pop(batch_id).filter(list(request_ids))
        self.batches[batch_id] = batch
        return batch.to_pb(self.block_size)

    def clear_cache(self, batch_id: int | None) -> None:
        if batch_id is None:
            self.batches.clear()
        else:
            self.batches.pop(batch_id, None)

    def health(self) -> None:
        # A real (tiny) computation on the device: a wedged CUDA context fails here. `float()`
        # copies the result to the host, which waits for the kernel (a sync on CUDA), so an
        # asynchronous error of an earlier step surfaces here too, not in the next request.
        probe = torch.ones(2, device=self.config.device) * 2
        if float(probe.sum()) != 4.0:
            raise RuntimeError("device returned a wrong result")

    def warmup(self, request: pb.WarmupRequest) -> pb.WarmupResponse:
        """Run the largest prefill the router will send (on a temporary cache) and one decode
        step's logits and sampler pass at the most lines a sampler pass holds (CUDA: a chunk of
        128; larger decode batches' logits are not measured and come out of the wiggle room),
        then size the real KV cache from `max_batch_total_tokens` or from the memory those left."""
        spec, bs = self.info.kv_spec, self.block_size
        self.kv_cache = None
        self.graphs = None  # they hold the old cache; the warmup's own steps run eagerly
        self.batches.clear()
        peak = TransientPeak(self.config.device)
        try:
            if request.batch.requests:
                self._warm_prefill(request)
            # The temporary cache stays during the sampler pass: `peak` subtracts it once.
            warm_kv_bytes = self.kv_cache.nbytes if self.kv_cache is not None else 0
            self._warm_sampler()
        finally:
            self.batches.clear()
            self.kv_cache = None
        transient = peak.bytes(resident=warm_kv_bytes)
        if request.HasField("max_batch_total_tokens"):
            num_blocks = 1 + -(-request.max_batch_total_tokens // bs)
        else:
            config = self.config
            budget = kv_budget(config.device, config.memory_fraction, config.wiggle_room, transient)
            num_blocks = budget // spec.bytes_per_block
            # Sharded ranks must agree on one size: take the smallest budget.
            num_blocks = self.tp.min_int(num_blocks)
        if num_blocks < 2:
            raise RuntimeError("not enough memory for a KV cache of even one block")
        self.kv_cache = KVCache(spec, num_blocks, self.config.device)
        capacity = (num_blocks - 1) * bs
        max_total = request.max_total_tokens if request.HasField("max_total_tokens") else min(
            self.info.max_position_embeddings, capacity)
        max_input = request.max_input_tokens if request.HasField("max_input_tokens") else max_total - 1
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB), capacity %d tokens",
                 num_blocks, bs, self.kv_cache.nbytes / 2**20, capacity)
        if self.config.device.type == "cuda":
            log.info("warmup: a step's peak above the weights %.1f MiB (a prefill of %d tokens, a sampler "
                     "pass of %d rows)",
                     transient / 2**20, request.max_prefill_tokens,
                     warmup_rows(self.config.device, self.config.max_batch_size))
        if self.config.speculate and self.config.device.type == "cpu":
            self.step_cost = self._measure_steps()
        self.graphs = capture_decode_graphs(self.model, self.kv_cache, self.config, max_total)
        return pb.WarmupResponse(
            max_supported_total_tokens=capacity, max_input_tokens=max_input, max_total_tokens=max_total,
            num_blocks=num_blocks, block_size=bs,
        )

    def _warm_prefill(self, request: pb.WarmupRequest) -> None:
        """The router's warmup batch (its largest prefill), then one decode, on a temporary cache
        that is left in `self.kv_cache` for the caller to drop."""
        spec, bs, batch = self.info.kv_spec, self.block_size, request.batch
        blocks_needed = 1 + sum(-(-(len(r.input_ids) + 1) // bs) for r in batch.requests)
        self.kv_cache = KVCache(spec, blocks_needed, self.config.device)
        next_block = 1
        for r in batch.requests:
            if not r.blocks:
                count = -(-(len(r.input_ids) + 1) // bs)
                r.blocks.extend(range(next_block, next_block + count))
                next_block += count
            r.stopping_parameters.max_new_tokens = min(r.stopping_parameters.max_new_tokens or 2, 2)
            if self.info.adapter_ids:
                # Every row through LoRA, so that the measured peak includes its temporaries: here
                # one delta per projection ([tokens, out], one adapter over every row, nothing
                # gathered). A step mixing adapters may take the padded layout instead
                # (shard/layers/lora.py), which also gathers its inputs and pads up to 1.5x the
                # rows: at most ~1.5 x [tokens, in] + 0.5 x [tokens, out] more, within the margin
                # TGI_WIGGLE_ROOM leaves on CUDA (not measured there yet: no GPU run so far).
                r.adapter_id = self.info.adapter_ids[0]
        try:
            response = self.prefill(pb.PrefillRequest(batch=batch))
            if response.HasField("batch"):
                self.decode(pb.DecodeRequest(batches=[response.batch]))
        except torch.OutOfMemoryError as error:
            raise RuntimeError(
                f"not enough memory to handle {request.max_prefill_tokens} prefill tokens; "
                "decrease --max-batch-prefill-tokens"
            ) from error

    def _warm_sampler(self) -> None:
        """A decode step's logits and sampler pass at the most lines one pass holds, every stage
        on, so that the measured peak includes them (CUDA only: see `warmup_rows`)."""
        rows = warmup_rows(self.config.device, self.config.max_batch_size)
        if not rows:
            return
        try:
            warm_up(self.info.vocab_size, rows, self.config.device, self.config.dtype)
        except torch.OutOfMemoryError as error:
            raise RuntimeError(
                f"not enough memory to sample a batch of {rows} over {self.info.vocab_size} tokens "
                "after the prefill warmup; decrease --max-batch-size or --max-batch-prefill-tokens"
            ) from error

    def _measure_steps(self, rounds: int = 3) -> StepCost:
        """What a step of n query tokens costs here (shard/speculation.py StepCost): forwards of
        one sequence computing n tokens at each of MEASURED_SIZES, logits at every one as when
        verifying drafts, interleaved over `rounds`, medians. Run in the fresh cache's first
        blocks, which no request holds yet. Every rank runs the same forwards (collectives) and
        adopts rank 0's figures: the ranks must draft alike."""
        context = 64  # cached tokens before the step's: a short chat turn's
        blocks = list(range(1, 1 + -(-(context + STEP_TOKENS) // self.block_size)))
        if len(blocks) >= self.kv_cache.num_blocks:
            log.info("speculation: the KV cache is too small to measure steps in; assuming a linear cost")
            return self.step_cost
        device, start = self.config.device, time.perf_counter()
        steps = []
        for n in MEASURED_SIZES:
            meta = build_metadata([SeqStep(n, context + n, blocks)], self.block_size, device, self.model.backend.layout)
            ids = torch.zeros(n, dtype=torch.long, device=device)
            positions = torch.arange(context, context + n, device=device)
            rows = torch.arange(n, device=device)
            steps.append(partial(self.model.forward, ids, positions, self.kv_cache, meta, rows))
        times: list[list[float]] = [[] for _ in steps]
        for _ in range(rounds + 1):  # the first round warms up
            for n, forward in enumerate(steps):
                began = time.perf_counter()
                forward()
                times[n].append(time.perf_counter() - began)
        cost = StepCost.measured([sorted(t[1:])[len(t[1:]) // 2] for t in times],
                                 floor=StepCost.linear(TOKEN_COST[device.type]))
        cost = self.tp.all_gather_object(cost)[0]
        log.info("speculation: a step of %s tokens costs %s one-token steps (measured in %.1f s)",
                 "/".join(map(str, MEASURED_SIZES)), "/".join(f"{cost(n):.2f}" for n in MEASURED_SIZES),
                 time.perf_counter() - start)
        return cost

    # -- the step -----------------------------------------------------------------------------

    def _pop(self, batch_id: int) -> Batch:
        batch = self.batches.pop(batch_id, None)
        if batch is None:
            raise KeyError(f"batch {batch_id} not found in the shard cache")
        return batch

    def _forward(self, batch: Batch) -> tuple[StepRows, torch.Tensor]:
        """The step's rows and logits: a replayed CUDA graph when the step is a pure decode (no
        drafts, no adapter) that fits a captured size, the eager forward otherwise."""
        plan = self.graphs.plan(batch) if self.graphs is not None else None
        if plan is not None:
            return plan, self.graphs.replay(plan)
        inputs = batch.prepare(self.block_size, self.config.device, self.model.backend.layout)
        return inputs, self.model.forward(inputs.input_ids, inputs.positions, self.kv_cache, inputs.meta,
                                          inputs.logits_index, lora=inputs.lora)

    def _step(self, batch: Batch, start_ns: int, concat_ns: int | None, response_type):
        if self.kv_cache is None:
            raise RuntimeError("the KV cache is not allocated: call Warmup first")
        # --speculate: drafts ride in this step's forward, where they pay for their compute
        draft_tokens(batch.requests, self.block_size, self.step_cost)
        inputs, logits = self._forward(batch)
        forward_end = time.perf_counter_ns()
        batch.record_prompt_logprobs(inputs, logits)
        out = None
        if inputs.sample_rows:
            mask = batch.grammar_mask(inputs.sample_rows)  # None unless a sampled row has a grammar
            # Sampled lines are ascending: as many as the logits' lines means all of them, no copy.
            every = len(inputs.sample_logits) == logits.shape[0]
            out = batch.sampler(logits if every else logits[inputs.sample_logits], rows=inputs.sample_rows, mask=mask)
        generations = batch.advance(inputs, out, self.eos_ids)
        finished = {g.request_id for g in generations if g.HasField("finished")}
        # Only rank `id % world_size` reports a request; the router merges all ranks' lists.
        world, rank = self.tp.world_size, self.tp.rank
        response = response_type(generations=[g for g in generations if g.request_id % world == rank])
        if finished:
            batch = batch.filter([r.id for r in batch.requests if r.id not in finished])
        if len(batch):
            self.batches[batch.id] = batch
            response.batch.CopyFrom(batch.to_pb(self.block_size))
        end = time.perf_counter_ns()
        response.forward_ns, response.decode_ns, response.total_ns = forward_end - start_ns, end - forward_end, end - start_ns
        if concat_ns is not None:
            response.concat_ns = concat_ns
        return response
