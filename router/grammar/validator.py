"""Grammars are checked before their request is queued: their cost bounded, then compiled (the
grammars themselves come from requests: TGI's in router/grammar/native.py, OpenAI's in
router/openai/constraints.py).

The shards enforce the grammar (shard/grammar.py, xgrammar). The router's job is to make sure
that a grammar's cost is bounded before its request is queued, and that no shard compiles while
other requests wait on it. `GrammarValidator.check`, in order:
1. limits, without compiling: the text is at most MAX_GRAMMAR_CHARS; its estimated size with
   every repeat written out (router/grammar/cost.py: nested repeats multiply, repeats in
   sequence add up, regexes inside schemas count) is at most MAX_GRAMMAR_COST;
2. a real compile with the model's tokenizer in a child process (router/grammar/worker.py),
   killed at COMPILE_TIMEOUT_S (its start-up is not counted): an overrun is "grammar is not
   valid: compiling the grammar took longer than 5 s", and so is every later check of the same
   grammar. Requests for the same grammar share one compile. At most MAX_WAITING_COMPILES
   compiles wait for the child; a request that would wait beyond that is refused with 429
   (OverloadedError: the server is busy, the grammar may be fine; retry later). A waiting
   compile whose requests have all gone (client disconnected) is dropped without running;
3. with shards (`shards`, the app's ShardedClient): the same compile on every shard
   (CompileGrammar), on each shard's grammar thread, within the same deadline. Each shard keeps
   the grammar pinned in its cache while any request handler that checked it is running (the
   pin is released, ReleaseGrammar, when the last such asyncio task ends), so the Prefill of
   every one of those requests finds it compiled. A shard that rejects the grammar or overruns
   makes it rejected here too.
Results (rejections included) are cached by (type, sha256(text)), LRU-bounded, so a rejected
grammar stays rejected and an accepted one is checked in microseconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass

from pytgi_common.grammar import GrammarError, grammar_key
from router.errors import OverloadedError
from router.grammar.cost import Estimate, regex_cost, schema_estimate, structural_tag_estimate
from router.grammar.native import JSON, REGEX, STRUCTURAL_TAG
from router.grammar.pins import ShardGrammars
from router.grammar.worker import CompileQueue, CompileWorker, QueueFull, WorkerError
from router.scheduler.client import ShardedClient

log = logging.getLogger(__name__)

COMPILE_TIMEOUT_S = 5.0
MAX_GRAMMAR_CHARS = 256 * 1024
# The one cost limit: a grammar's size with its repeats written out (router/grammar/cost.py).
# Twice the largest single repeat accepted before (50,000: a `maxLength` that compiled in ~2.5 s
# on SmolLM2's vocabulary), so a grammar with one such repeat still passes while sequences and
# nests of them do not. The compile deadline remains the backstop for what the estimate misses.
MAX_GRAMMAR_COST = 100_000
# Compiles waiting for the compile process (the running one not counted). Beyond it: 429. At
# worst the queue drains in MAX_WAITING_COMPILES x COMPILE_TIMEOUT_S; compiles take milliseconds.
MAX_WAITING_COMPILES = 16
CACHE_SIZE = 512
# Grammars longer than this have their cost estimated off the event loop (a Python parse).
_OFFLOAD_CHARS = 16 * 1024


class GrammarNotSupported(GrammarError):
    """`--disable-grammar-support`, or shards without constrained decoding."""

    def __init__(self, param: str | None = None) -> None:
        super().__init__("grammar is not supported", param)


# ---------------------------------------------------------------------------------- limits


def check_limits(grammar_type: int, text: str) -> None:
    """The limits checked before any compile (GrammarError)."""
    if not text:  # xgrammar compiles an empty regex, but the shards refuse an empty grammar
        raise GrammarError("the grammar is empty")
    if len(text) > MAX_GRAMMAR_CHARS:
        raise GrammarError(f"the grammar is {len(text)} characters long; the limit is {MAX_GRAMMAR_CHARS}")
    if grammar_type == REGEX:
        estimate, what = Estimate(regex_cost(text), None), "regex"
    elif grammar_type in (JSON, STRUCTURAL_TAG):
        try:
            value = json.loads(text)
            if grammar_type == JSON:
                estimate, what = schema_estimate(value, MAX_GRAMMAR_COST), "JSON schema"
            else:
                estimate, what = structural_tag_estimate(value, MAX_GRAMMAR_COST), "structural tag"
        except RecursionError:
            raise GrammarError("the grammar is nested too deeply") from None
        except ValueError as error:  # JSONDecodeError, or an integer of more than 4300 digits
            raise GrammarError(f"the JSON schema is not valid JSON: {error}") from error
    else:
        raise GrammarError(f"unknown grammar type {grammar_type}")
    if estimate.cost > MAX_GRAMMAR_COST:
        where = f" at `{estimate.where}`" if estimate.where and estimate.where != "#" else ""
        raise GrammarError(
            f"the {what} is too large: with its repeats written out it comes to about {estimate.cost} "
            f"elements{where} (nested repeats multiply, repeats in sequence add up); "
            f"the limit is {MAX_GRAMMAR_COST}")


# ------------------------------------------------------------------------------- checking


@dataclass(eq=False, slots=True)
class _Compile:
    """One compile in the child process, shared by every request that waits for its result."""

    future: Future  # CompileWorker.compile's: None, or why the grammar does not compile
    waiters: int = 0


class GrammarValidator:
    """Checks grammars before their requests are queued (see the module docstring)."""

    def __init__(self, tokenizer, *, disabled: bool = False, timeout_s: float = COMPILE_TIMEOUT_S,
                 cache_size: int = CACHE_SIZE, max_waiting: int = MAX_WAITING_COMPILES,
                 shards: ShardedClient | None = None, compile_delay_s: float = 0.0) -> None:
        """`tokenizer`: router.tokenizer.Tokenizer (its `backend` and `eos_token_id`); `shards`:
        prepare grammars on them too (None: router-side checks only, as in unit tests);
        `compile_delay_s`: every compile takes that much longer (tests of overruns)."""
        self.disabled = disabled
        self.cache_size = cache_size
        eos = getattr(tokenizer, "eos_token_id", None)
        worker = CompileWorker(lambda: tokenizer.backend.to_str(), [eos] if eos is not None else [],
                               timeout_s=timeout_s, delay_s=compile_delay_s)
        self._queue = CompileQueue(worker, max_waiting)
        # The child process ends with the validator even if nobody calls close().
        self._close = weakref.finalize(self, self._queue.close)
        self._results: OrderedDict[tuple[int, bytes], str | None] = OrderedDict()  # None: compiles
        self._compiles: dict[tuple[int, bytes], _Compile] = {}
        self._shards = ShardGrammars(shards, timeout_s) if shards is not None else None
        self.hits = self.compiles = 0

    @property
    def worker(self) -> CompileWorker:
        return self._queue.worker

    @property
    def queue(self) -> CompileQueue:
        return self._queue

    async def check(self, grammar_type: int, text: str, param: str | None = None) -> None:
        """Return if the grammar compiles (here and, with shards, on every shard); GrammarError
        (with `param`) if not or not in time; OverloadedError if too many compiles wait."""
        if self.disabled:
            raise GrammarNotSupported(param)
        key = grammar_key(grammar_type, text)
        message = await self._compiled(key, grammar_type, text, param)
        if message is None and self._shards is not None:
            message = await self._shards.prepare(key, grammar_type, text)
            if message is not None:
                self._remember(key, message)  # rejected by a shard: rejected here too, from now on
        if message is not None:
            raise GrammarError(message, param)

    async def _compiled(self, key, grammar_type: int, text: str, param: str | None) -> str | None:
        if key not in self._results and key not in self._compiles:
            message = await self._limits(grammar_type, text)
            if message is not None:
                self._remember(key, message)
                return message
        if key in self._results:
            self._results.move_to_end(key)
            self.hits += 1
            return self._results[key]
        job = self._compiles.get(key)
        if job is None:
            try:
                job = _Compile(self._queue.submit(grammar_type, text))
            except QueueFull:
                raise OverloadedError(f"Model is overloaded: {self._queue.max_waiting} grammars are waiting to "
                                      "be compiled; retry later") from None
            except WorkerError as error:
                raise GrammarNotSupported(param) from error
            self._compiles[key] = job
            self.compiles += 1
            # Settled when the compile ends, whoever still waits: a compile whose clients all left
            # while it ran is still remembered (an overrun stays rejected) and never lingers here.
            loop = asyncio.get_running_loop()
            job.future.add_done_callback(lambda _, key=key, job=job: _on_loop(loop, self._settled, key, job))
        else:
            self.hits += 1
        job.waiters += 1
        try:
            await _done(job.future)
        finally:
            job.waiters -= 1
            if job.waiters == 0:
                self._queue.abandon(job.future)  # nobody waits: dropped if it has not started
        error = None if job.future.cancelled() else job.future.exception()
        if job.future.cancelled() or error is not None:  # closed, or xgrammar / the tokenizer failed
            log.error("grammar support is unavailable: %s", error or "the compiler is closed")
            raise GrammarNotSupported(param) from error
        return job.future.result()

    def _settled(self, key, job: _Compile) -> None:
        if self._compiles.get(key) is job:
            del self._compiles[key]
        if not job.future.cancelled() and job.future.exception() is None:
            self._remember(key, job.future.result())

    @staticmethod
    async def _limits(grammar_type: int, text: str) -> str | None:
        try:
            if len(text) > _OFFLOAD_CHARS:
                await asyncio.to_thread(check_limits, grammar_type, text)
            else:
                check_limits(grammar_type, text)
        except GrammarError as error:
            return error.message
        return None

    def _remember(self, key, message: str | None) -> None:
        self._results[key] = message
        self._results.move_to_end(key)
        while len(self._results) > self.cache_size:
            self._results.popitem(last=False)

    # -- lifecycle ------------------------------------------------------------------------

    def pinned(self, grammar_type: int, text: str) -> int:
        """Request handlers holding this grammar pinned on the shards (0 without shards)."""
        return self._shards.holders(grammar_key(grammar_type, text)) if self._shards is not None else 0

    def warm(self) -> Future | None:
        """Start the compile process in the background now (optional); done when it is ready."""
        return None if self.disabled else self._queue.submit(None)

    def close(self) -> None:
        """Kill the compile process and stop its thread; later checks say "not supported"."""
        self._close()


def _on_loop(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    """Run `callback(*args)` on `loop` (from any thread); nothing once the loop is closed."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop is closed: the router is gone, and so is whatever waited
        pass


async def _done(future: Future) -> None:
    """Wait for a concurrent future on the running loop. Cancelling the wait leaves the future
    alone (others may wait on it; `abandon` decides whether it runs)."""
    if future.done():
        return
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def wake(_: Future) -> None:
        try:
            loop.call_soon_threadsafe(_set_done, waiter)
        except RuntimeError:  # that loop is closed: nobody waits there any more
            pass

    future.add_done_callback(wake)
    await waiter


def _set_done(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)
