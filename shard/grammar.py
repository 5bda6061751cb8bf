"""Grammar-constrained decoding on the shard, with xgrammar.

Why xgrammar (measured against outlines-core 0.2.14 on SmolLM2's tokenizer, see the issue note):
schemas compile in 2-10 ms instead of 30-190 ms, filling one row's allowed-token bitmask takes
~4 µs, every JSON-schema feature we tried is enforced (outlines-core lets integer
minimum/maximum through), and structural tags express "free text or a tool call" (OpenAI
`tool_choice: "auto"`), which a single regex cannot.

Flow per request (`NextTokenChooserParameters.grammar` / `grammar_type`):
- `Grammars` (one per engine) loads the tokenizer from the model folder the first time a request
  has a grammar, builds xgrammar's TokenizerInfo for the model's logits width (ids past the
  tokenizer's vocabulary are never allowed) with the model's EOS ids as stop tokens, and keeps
  compiled grammars in an LRU keyed by (type, sha256(text)). A grammar that does not compile is
  a ValueError (the servicer answers INVALID_ARGUMENT).
- Compiles never hold up the engine thread: the router announces each grammar before queueing
  its request (CompileGrammar → `Grammars.prepare`), which compiles it on the grammar thread
  within the router's deadline and pins it until the router releases it (ReleaseGrammar), after
  the request's end. Prefill then finds it cached. Only a grammar nobody announced (direct
  engine use in tests and benchmarks) is compiled where it is first needed.
- Each request gets a `GrammarState` (its matcher) on its `RequestState`, so it follows the
  request through filter and concatenate.
- Each step, `step_mask` fills the bitmask of every constrained row that samples; the sampler
  adds it (0 / -inf) to the scores after penalties and before the warpers, so greedy and sampled
  choices alike only see allowed tokens. EOS is allowed only where the grammar may end.
- After the choice, the matcher accepts the token. The request finishes with
  FINISH_REASON_EOS_TOKEN when the matcher took a stop token, or as soon as the grammar is
  complete and admits nothing but a stop token (no extra step, no EOS token in the output).
  EOS_TOKEN rather than STOP_SEQUENCE: the output ended because its grammar says it is complete,
  which is the model-side "natural end" (OpenAI `stop`, TGI `eos_token`), not a user stop string.

Batches without any constrained row never call into this module (the sampler's fast paths are
unchanged). How a grammar is compiled and keyed (options, error messages, the cache key) is
pytgi_common/grammar.py, which the router's compile check (router/grammar/worker.py) uses too.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from pytgi_common.grammar import GrammarError, compile_grammar, grammar_key, tokenizer_info

log = logging.getLogger(__name__)

CACHE_SIZE = 64  # unpinned compiled grammars kept
REJECTED_SIZE = 1024  # grammars remembered as refused


class GrammarTimeout(GrammarError):
    """The compile overran its deadline: the grammar is refused (INVALID_ARGUMENT, like one that
    does not compile; a DEADLINE_EXCEEDED would be gRPC's own, a shard that did not answer)."""


class GrammarBusy(RuntimeError):
    """The grammar thread is still busy with an earlier compile (one that overran keeps running:
    threads cannot be killed) past this request's deadline. Not the grammar's fault: the server
    is overloaded (RESOURCE_EXHAUSTED); the router does not remember it."""


def available() -> bool:
    return importlib.util.find_spec("xgrammar") is not None


@dataclass(eq=False, slots=True)
class _Compile:
    """A compile queued on (or running on) the grammar thread."""

    started: Future  # set when the compile itself starts (the deadline counts from there)
    done: Future  # the compiled grammar, or GrammarError


class Grammars:
    """The engine's grammar compiler: lazy tokenizer, LRU of compiled grammars with pins.

    `prepare` (the CompileGrammar RPC) compiles on this object's own grammar thread and pins
    the result; `release` (ReleaseGrammar) unpins it. Pinned grammars are never evicted, so
    `compile` / `state` on the engine thread (Prefill) hit the cache for every request the
    router prepared. A miss there (direct engine use: tests, benchmarks) compiles inline.
    Unpinned grammars stay cached, LRU, up to `capacity`. Pinned ones number at most the
    distinct grammars of the router's requests in flight."""

    def __init__(self, model_path: Path | str, vocab_size: int, stop_ids: Iterable[int], *,
                 trust_remote_code: bool = False, capacity: int = CACHE_SIZE):
        self.model_path = Path(model_path)
        self.vocab_size = vocab_size
        self.stop_ids = frozenset(stop_ids)
        self.trust_remote_code = trust_remote_code
        self.capacity = capacity
        self._compiler = None
        self._lock = threading.Lock()  # the compiler's lazy construction
        self._cache_lock = threading.Lock()  # everything below: the engine and grammar threads share it
        self._cache: OrderedDict[tuple[int, bytes], object] = OrderedDict()
        self._pins: dict[tuple[int, bytes], int] = {}
        self._compiling: dict[tuple[int, bytes], _Compile] = {}
        # Grammars refused for good: they overran their deadline, or do not compile.
        self._rejected: OrderedDict[tuple[int, bytes], str] = OrderedDict()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self.hits = self.misses = self.inline_compiles = 0

    @property
    def available(self) -> bool:
        return available()

    def compiler(self):
        with self._lock:
            if self._compiler is None:
                if not available():
                    raise GrammarError("grammar-constrained decoding needs the xgrammar package")
                import xgrammar as xgr
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(
                    self.model_path, trust_remote_code=self.trust_remote_code)
                info = tokenizer_info(tokenizer, self.vocab_size, self.stop_ids)
                # Our own LRU below: xgrammar's cache would grow without a bound we control.
                self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
                log.info("grammar support ready (%s, vocab %d)", self.model_path, self.vocab_size)
            return self._compiler

    def compile(self, grammar_type: int, text: str):
        """The compiled grammar: from the cache, else the compile in progress on the grammar
        thread, else compiled here (inline: only for grammars nobody prepared)."""
        key = grammar_key(grammar_type, text)
        with self._cache_lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return compiled
            self.misses += 1
            rejected = self._rejected.get(key)
            job = self._compiling.get(key)
        if rejected is not None:
            raise GrammarError(rejected)
        if job is not None:
            return job.done.result()  # started before us: waiting is shorter than compiling again
        self.inline_compiles += 1
        log.warning("compiling a grammar nobody prepared (CompileGrammar), on the calling thread")
        compiled = compile_grammar(self.compiler(), grammar_type, text)
        with self._cache_lock:
            self._insert(key, compiled)
        return compiled

    async def prepare(self, grammar_type: int, text: str, timeout_s: float | None) -> None:
        """Compile on the grammar thread (the caller's event loop keeps running) and pin the
        result. GrammarError if it does not compile; GrammarTimeout if the compile itself
        takes longer than `timeout_s` (the grammar is then refused from now on); GrammarBusy if
        it could not even start within `timeout_s`."""
        key = grammar_key(grammar_type, text)
        # Loading the tokenizer (the first grammar) is nobody's deadline; off the event loop.
        await asyncio.to_thread(self.compiler)
        while True:
            with self._cache_lock:
                if key in self._cache:
                    self._pins[key] = self._pins.get(key, 0) + 1
                    self._cache.move_to_end(key)
                    return
                if key in self._rejected:
                    raise GrammarError(self._rejected[key])
                job = self._compiling.get(key)
                if job is None:
                    job = self._compiling[key] = _Compile(Future(), Future())
                    self._thread.submit(self._run, key, job, grammar_type, text)
            # shield: a cancelled RPC must not cancel a compile others may share.
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(job.started)), timeout_s)
            except TimeoutError:
                raise GrammarBusy("the grammar thread is busy with an earlier compile") from None
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(job.done)), timeout_s)
            except TimeoutError:  # asyncio's, since Python 3.11
                message = f"compiling the grammar took longer than {timeout_s:g} s"
                with self._cache_lock:
                    self._reject(key, message)
                raise GrammarTimeout(message) from None
            # Compiled and cached: pin it on the next pass (it was evicted meanwhile if not).

    def release(self, grammar_type: int, grammar_sha256: bytes) -> None:
        """Drop one pin (a release without a pin is ignored)."""
        key = (grammar_type, bytes(grammar_sha256))
        with self._cache_lock:
            count = self._pins.pop(key, 0)
            if count > 1:
                self._pins[key] = count - 1
            self._evict()

    def pins(self, grammar_type: int, text: str) -> int:
        with self._cache_lock:
            return self._pins.get(grammar_key(grammar_type, text), 0)

    def _run(self, key, job: _Compile, grammar_type: int, text: str) -> None:
        """On the grammar thread."""
        try:
            compiler = self.compiler()  # loading the tokenizer is not the grammar's time
            job.started.set_result(None)
            compiled = compile_grammar(compiler, grammar_type, text)
        except BaseException as error:
            with self._cache_lock:
                if isinstance(error, GrammarError) and job.started.done():
                    self._reject(key, str(error))  # it will not compile next time either
                self._compiling.pop(key, None)
            if not job.started.done():
                job.started.set_result(None)
            job.done.set_exception(error)
            return
        with self._cache_lock:
            if key not in self._rejected:  # not if its deadline passed meanwhile
                self._insert(key, compiled)
            self._compiling.pop(key, None)
        job.done.set_result(compiled)

    def _insert(self, key, compiled) -> None:
        self._cache[key] = compiled
        self._cache.move_to_end(key)
        self._evict()

    def _evict(self) -> None:
        """Oldest unpinned grammars first, until at most `capacity` are unpinned."""
        unpinned = [k for k in self._cache if k not in self._pins]
        for k in unpinned[:max(len(unpinned) - self.capacity, 0)]:
            del self._cache[k]

    def _reject(self, key, message: str) -> None:
        self._rejected[key] = message
        self._rejected.move_to_end(key)
        while len(self._rejected) > REJECTED_SIZE:
            self._rejected.popitem(last=False)

    def state(self, grammar_type: int, text: str) -> "GrammarState":
        import xgrammar as xgr

        compiled = self.compile(grammar_type, text)
        return GrammarState(xgr.GrammarMatcher(compiled), self.stop_ids, self.vocab_size)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


@dataclass(slots=True, eq=False)
class GrammarState:
    """One request's position in its grammar."""

    matcher: object  # xgrammar.GrammarMatcher
    stop_ids: frozenset[int]
    vocab_size: int

    def accept(self, token: int) -> bool:
        return self.matcher.accept_token(token)

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()

    def complete(self) -> bool:
        """The grammar ended: a stop token was accepted, or what was generated is complete and
        nothing but a stop token could follow."""
        if self.matcher.is_terminated():
            return True
        if not self.matcher.is_completed():
            return False
        bits = torch.empty((1, _words(self.vocab_size)), dtype=torch.int32)
        self.matcher.fill_next_token_bitmask(bits, 0)
        for token in self.stop_ids:
            if token < self.vocab_size:
                bits[0, token // 32] &= ~_bit(token)
        return not bool(bits.any())


def _words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


@dataclass(frozen=True, slots=True)
class GrammarMask:
    """Allowed tokens of the constrained lines of one sampling step."""

    lines: list[int]  # lines of the step's logits (positions in the sampled rows)
    bits: torch.Tensor  # [len(lines), words] int32, bit t%32 of word t//32 set: token t allowed

    def apply_(self, scores: torch.Tensor) -> None:
        """scores[line] += 0 where allowed, -inf elsewhere (ids past the mask included)."""
        n, width = len(self.lines), scores.shape[-1]
        lut = _lut(scores.device, scores.dtype)
        bits = self.bits.to(scores.device, non_blocking=True)
        # Little-endian bytes of each word, each byte expanded to its 8 additive values.
        add = lut.index_select(0, bits.view(torch.uint8).reshape(-1).int()).view(n, -1)
        if add.shape[1] >= width:
            add = add[:, :width]
        else:
            pad = torch.full((n, width - add.shape[1]), float("-inf"),
                             dtype=scores.dtype, device=scores.device)
            add = torch.cat([add, pad], dim=1)
        lines = torch.tensor(self.lines, dtype=torch.long, device=scores.device)
        scores.index_add_(0, lines, add)


_LUTS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _lut(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256 * 8] additive values: entry 8*b + k is 0 if bit k of byte b is set, else -inf."""
    key = (device, dtype)
    lut = _LUTS.get(key)
    if lut is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        lut = torch.where(bits.bool(), 0.0, float("-inf")).to(dtype).reshape(-1, 1)
        lut = lut.view(256, 8).to(device)
        _LUTS[key] = lut
    return lut


def step_mask(constrained: list[tuple[int, GrammarState]]) -> GrammarMask | None:
    """The bitmask of each (line, state) whose grammar restricts the next token; None if none does."""
    if not constrained:
        return None
    vocab_size = constrained[0][1].vocab_size  # one engine, one tokenizer info
    bits = torch.empty((len(constrained), _words(vocab_size)), dtype=torch.int32)
    keep, lines = [], []
    for k, (line, state) in enumerate(constrained):
        if state.matcher.is_terminated():
            # Nothing may follow; the request is finished this step anyway. Allow only stop tokens.
            bits[k].zero_()
            for token in state.stop_ids:
                if token < vocab_size:
                    bits[k, token // 32] |= _bit(token)
            needed = True
        else:
            needed = state.matcher.fill_next_token_bitmask(bits, k)
        if needed:
            keep.append(k)
            lines.append(line)
    if not keep:
        return None
    if len(keep) < len(constrained):
        bits = bits.index_select(0, torch.tensor(keep, dtype=torch.long))
    return GrammarMask(lines, bits)


def _bit(token: int) -> int:
    """The int32 value with bit token % 32 set."""
    shift = token % 32
    return -(1 << 31) if shift == 31 else 1 << shift
