"""The real aiohttp app (every middleware and route) over a scripted Infer: no shards, no model.

`GatedInfer.stream` yields `tokens` events; with `gate` set it waits for the gate before the last
one, so a test can hold a request (a stream) in flight.
"""

from __future__ import annotations

import asyncio

from router.config import RouterConfig
from router.events import Finish, TokenEvent, TokenInfo
from router.infer import Infer
from router.limits import Limits
from router.metrics import Metrics
from router.validation import Validator


def router_config(**overrides) -> RouterConfig:
    values = dict(
        master_shard_uds_path="/nonexistent", hostname="127.0.0.1", port=0, model_id="served/model", revision=None,
        max_concurrent_requests=8, max_best_of=2, max_stop_sequences=4, max_top_n_tokens=5, max_input_tokens=None,
        max_total_tokens=None, waiting_served_ratio=1.2, max_batch_prefill_tokens=None, max_batch_total_tokens=None,
        max_waiting_tokens=20, max_batch_size=None, validation_workers=1, api_key=None, cors_allow_origin=(),
        json_output=False, otlp_endpoint=None, otlp_service_name="x", payload_limit=2_000_000,
        max_client_batch_size=4, disable_grammar_support=False, tokenizer_config_path=None, prefix_caching=True,
    )
    values.update(overrides)
    return RouterConfig(**values)


class GatedInfer(Infer):
    def __init__(self, tokenizer, tokens: int = 3):
        validator = Validator(tokenizer, Limits(max_best_of=2, max_stop_sequences=4, max_top_n_tokens=5,
                                                          max_input_tokens=1000, max_total_tokens=2048))
        super().__init__(validator, tokenizer, queue=None, metrics=Metrics(1000, 2048), max_concurrent_requests=8)
        self.tokens = tokens
        self.gate: asyncio.Event | None = None
        self.started = 0
        self.cancelled = 0

    async def stream(self, valid):
        self.started += 1
        finished = False
        try:
            for i in range(1, self.tokens + 1):
                if i == self.tokens and self.gate is not None:
                    await self.gate.wait()
                await asyncio.sleep(0)
                finish = None
                if i == self.tokens:
                    finished = True
                    finish = Finish("x" * i, "length", i, None, (), valid.input_length, 0.0, 0.0, 0.0)
                yield TokenEvent(i, TokenInfo(100 + i, "x", -0.5, False), (), finish, "x")
        finally:
            if not finished:
                self.cancelled += 1


class FakeState:
    """What the routes read from AppState, without shards."""

    def __init__(self, config: RouterConfig, tokenizer, infer: Infer):
        self.config, self.tokenizer, self.infer, self.metrics = config, tokenizer, infer, infer.metrics
        self.limits = Limits(max_input_tokens=1000, max_total_tokens=2048, max_batch_prefill_tokens=512,
                             max_batch_total_tokens=4096, num_blocks=256, block_size=16,
                             vocab_size=tokenizer.vocab_size)
        self.tracer = None

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def check_health(self) -> bool:
        return True

    def info_json(self) -> dict:
        return {"model_id": self.config.model_id}
