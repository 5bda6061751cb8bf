"""AppState: the router's long-lived objects, built once at startup (connect → Info → Warmup)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from aiohttp import web

from pytgi_proto import generate_pb2 as pb
from router.adapters import Adapters
from router.api_models import Info
from router.config import RouterConfig
from router.grammar import validator as grammars
from router.infer import Infer
from router.limits import Limits
from router.metrics import Metrics
from router.scheduler.batcher import Batcher, BatchPolicy
from router.scheduler.client import ShardedClient, ShardError
from router.scheduler.kv import KVManager
from router.scheduler.queue import Queue
from router.tokenizer import Tokenizer
from router.tracing import Tracer, tracer_for
from router.validation import Validator

log = logging.getLogger(__name__)
VERSION = "0.1.0"
PROBE_ID = 2**64 - 1


def resolve_prefill_tokens(config: RouterConfig, device_type: str) -> int:
    if config.max_batch_prefill_tokens is not None:
        return config.max_batch_prefill_tokens
    return 4096 if device_type == "cuda" else 512


def usable_vocab_size(tokenizer: Tokenizer, info: pb.InfoResponse) -> int:
    """Token ids a request may name (prompt ids, logit_bias keys): those both the tokenizer and
    the model know. An id past the model's embedding or logits would fail a shared step."""
    return min(tokenizer.vocab_size, info.vocab_size) if info.vocab_size else tokenizer.vocab_size


def warmup_request(tokenizer: Tokenizer, prefill_tokens: int, max_input_tokens: int, max_batch_size: int | None,
                   top_n: int) -> pb.WarmupRequest:
    """Requests of repeated text up to the largest prefill, with every sampling processor on."""
    filler = tokenizer.encode(" test", add_special_tokens=False) or [0]
    requests, remaining, next_id = [], prefill_tokens, 0
    while remaining > 0 and (max_batch_size is None or len(requests) < max_batch_size):
        length = min(max_input_tokens, remaining)
        ids = (filler * (length // len(filler) + 1))[:length]
        requests.append(pb.Request(
            id=next_id, input_ids=ids, prefill_logprobs=True, top_n_tokens=top_n,
            parameters=pb.NextTokenChooserParameters(
                temperature=0.9, top_k=10, top_p=0.9, typical_p=0.9, do_sample=True, seed=0, has_seed=True,
                repetition_penalty=1.2, frequency_penalty=0.1, presence_penalty=0.1, min_p=0.05, watermark=True),
            stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=2, ignore_eos_token=True)))
        remaining -= length
        next_id += 1
    return pb.WarmupRequest(batch=pb.Batch(id=0, requests=requests, size=len(requests)),
                            max_prefill_tokens=prefill_tokens)


class AppState:
    def __init__(self, config: RouterConfig, client: ShardedClient, info: pb.InfoResponse, tokenizer: Tokenizer,
                 limits: Limits, metrics: Metrics, batcher: Batcher, infer: Infer):
        self.config = config
        self.client = client
        self.shard_info = info
        self.tokenizer = tokenizer
        self.limits = limits
        self.metrics = metrics
        self.batcher = batcher
        self.infer = infer
        self.batcher_task: asyncio.Task | None = None

    @classmethod
    async def connect(cls, config: RouterConfig) -> "AppState":
        client = await ShardedClient.connect(config.master_shard_uds_path)
        await client.clear_cache(None)
        info = await client.info()
        tokenizer = Tokenizer.from_folder(Path(info.model_path), config.tokenizer_config_path,
                                         workers=config.validation_workers)
        prefill_tokens = resolve_prefill_tokens(config, info.device_type)
        max_input = config.max_input_tokens or min(prefill_tokens, info.max_position_embeddings - 1)
        # On CPU the warmup only has to prove the step works: a full-budget prefill costs seconds.
        warm_tokens = prefill_tokens if info.device_type == "cuda" else min(prefill_tokens, 256)
        request = warmup_request(tokenizer, warm_tokens, min(max_input, warm_tokens), config.max_batch_size,
                                 config.max_top_n_tokens)
        if config.max_input_tokens is not None:
            request.max_input_tokens = config.max_input_tokens
        if config.max_total_tokens is not None:
            request.max_total_tokens = config.max_total_tokens
        if config.max_batch_total_tokens is not None:
            request.max_batch_total_tokens = config.max_batch_total_tokens
        warm = await client.warmup(request)
        limits = Limits(
            max_input_tokens=warm.max_input_tokens, max_total_tokens=warm.max_total_tokens,
            max_batch_prefill_tokens=prefill_tokens, max_batch_total_tokens=warm.max_supported_total_tokens,
            num_blocks=warm.num_blocks, block_size=warm.block_size,
            max_best_of=config.max_best_of, max_stop_sequences=config.max_stop_sequences,
            max_top_n_tokens=config.max_top_n_tokens, max_client_batch_size=config.max_client_batch_size,
            max_concurrent_requests=config.max_concurrent_requests, max_batch_size=config.max_batch_size,
            vocab_size=usable_vocab_size(tokenizer, info),
        )
        if info.max_position_embeddings and limits.max_total_tokens > info.max_position_embeddings:
            # Positions past the model's would index past its rotary / position tables inside a
            # shared step: refused here rather than failing every batch that reaches them.
            raise ValueError(f"`max_total_tokens` ({limits.max_total_tokens}) exceeds the model's "
                             f"`max_position_embeddings` ({info.max_position_embeddings})")
        if limits.max_total_tokens > limits.max_batch_total_tokens:
            raise ValueError(f"`max_total_tokens` ({limits.max_total_tokens}) exceeds the KV cache capacity "
                             f"({limits.max_batch_total_tokens} tokens); lower it or give the cache more memory")
        log.info("limits: %s", limits)
        return cls.build(config, client, info, tokenizer, limits, tracer_for(config))

    @classmethod
    def build(cls, config, client, info, tokenizer, limits: Limits, tracer: Tracer | None = None) -> "AppState":
        metrics = Metrics(limits.max_input_tokens, limits.max_total_tokens)
        metrics.batch_max_total_tokens.set(limits.max_batch_total_tokens)
        kv = KVManager(limits.num_blocks, limits.block_size, config.prefix_caching and info.use_prefix_caching)
        queue = Queue(kv, info.support_chunking)
        metrics.watch(kv, queue.__len__)
        batcher = Batcher(client, queue, kv, limits, metrics, BatchPolicy(
            waiting_served_ratio=config.waiting_served_ratio, max_waiting_tokens=config.max_waiting_tokens,
            support_chunking=info.support_chunking, speculate=info.speculate,
        ))
        # Shards that cannot enforce a grammar make the router reject grammars, not drop them.
        no_grammar = config.disable_grammar_support or not info.supports_grammar
        # The shards compile each grammar before its request is queued, never in a step.
        grammar_validator = grammars.GrammarValidator(tokenizer, disabled=no_grammar, shards=client)
        adapters = Adapters(config.model_id, tuple(info.adapter_ids))
        validator = Validator(tokenizer, limits, grammar_validator, adapters)
        infer = Infer(validator, tokenizer, queue, metrics, config.max_concurrent_requests,
                      request_timeout=config.request_timeout, tracer=tracer)
        return cls(config, client, info, tokenizer, limits, metrics, batcher, infer)

    @property
    def tracer(self) -> Tracer | None:
        return self.infer.tracer

    def start(self) -> None:
        self.batcher_task = asyncio.create_task(self.batcher.run(), name="batcher")

    async def stop(self) -> None:
        if self.batcher_task is not None:
            self.batcher_task.cancel()
            await asyncio.gather(self.batcher_task, return_exceptions=True)
        self.infer.validator.grammar.close()  # its compile process ends with the router
        self.tokenizer.close()
        await self.client.close()
        if self.tracer is not None:
            await self.tracer.shutdown()

    async def check_health(self) -> bool:
        """TGI: the Health RPC while the last step succeeded; a real one-token probe otherwise."""
        try:
            if self.batcher.healthy:
                await self.client.health()
            else:
                probe = pb.Request(
                    id=PROBE_ID, input_ids=self.tokenizer.encode("liveness", add_special_tokens=False)[:1] or [0],
                    blocks=[0], slots=[0], stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=1))
                await self.client.prefill(pb.Batch(id=PROBE_ID, requests=[probe], size=1))
                self.batcher.healthy = True
        except ShardError as error:
            log.warning("health check failed: %s", error)
            return False
        return True

    def info_json(self) -> Info:
        config, limits, info = self.config, self.limits, self.shard_info
        return Info(
            model_id=config.model_id, model_sha=None, model_pipeline_tag="text-generation",
            model_dtype=info.dtype, model_device_type=info.device_type,
            max_concurrent_requests=limits.max_concurrent_requests, max_best_of=limits.max_best_of,
            max_stop_sequences=limits.max_stop_sequences, max_input_tokens=limits.max_input_tokens,
            max_total_tokens=limits.max_total_tokens, max_batch_total_tokens=limits.max_batch_total_tokens,
            max_batch_prefill_tokens=limits.max_batch_prefill_tokens,
            max_batch_size=limits.max_batch_size, validation_workers=config.validation_workers,
            max_client_batch_size=limits.max_client_batch_size, router="text-generation-router",
            version=VERSION, sha=None, docker_label=None, block_size=limits.block_size,
            prefix_caching=config.prefix_caching and info.use_prefix_caching,
            attention_impl=info.attention_impl, model_impl=info.model_impl, num_shard=info.world_size,
            lora_adapters=list(info.adapter_ids),
        )


STATE = web.AppKey("state", AppState)
