"""The per-step router path keeps its behaviour: `Entry.on_token` (detokenizer, stop strings,
events), `Batcher._dispatch`, and `ShardedClient` awaiting a single shard in place. The oracle
below is the per-token algorithm written out independently (always through the stop matcher)."""

from __future__ import annotations

import asyncio
import math

import pytest

from pytgi_proto import generate_pb2 as pb
from router.detokenizer import IncrementalDetokenizer, StopSequenceMatcher
from router.events import TokenEvent
from router.limits import Limits
from router.metrics import Metrics
from router.request import FINISH_REASONS, Entry
from router.scheduler.batcher import Batcher
from router.scheduler.client import ShardedClient, ShardError
from router.scheduler.kv import KVManager
from router.scheduler.queue import Queue
from tests.router.helpers import valid_request

PROMPT = "<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n"
# Emoji and CJK split over byte-level tokens, stop strings that span tokens, a special token
# mid-stream (skipped or not) and one at the end.
OUTPUT = "Hello 😀 world, 你好 STOP here.<|im_end|> after the end 🎉 done<|im_end|>"


def oracle(tokenizer, request, ids, finish_at: int | None, reason: int = 0):
    """(index, id, token text, special, logprob, emitted text, finish) per token, by the
    pre-change algorithm: every token through the stop matcher."""
    params = request.parameters
    detok = IncrementalDetokenizer(tokenizer.backend, request.input_ids, skip_special_tokens=params.skip_special_tokens)
    stop = StopSequenceMatcher(list(params.stop), include_stop=params.include_stop)
    out, text, generated = [], "", []
    for n, token_id in enumerate(ids, 1):
        generated.append(token_id)
        piece = detok.add(token_id)
        shard_reason = FINISH_REASONS[reason] if n == finish_at else None
        result = stop.feed(piece)
        emitted, end = result.text_to_emit, shard_reason
        if result.stopped and end is None:
            end = "stop_sequence"
        elif end is not None and not result.stopped:
            tail = stop.feed(detok.flush())
            emitted += tail.text_to_emit + ("" if tail.stopped else stop.flush())
        text += emitted
        finish = None
        if end is not None:
            full = tokenizer.decode(generated, True) if params.include_stop else text
            finish = (full, end, len(generated))
        logprob = -0.25 * n
        out.append((n, token_id, piece, tokenizer.is_special(token_id), logprob, emitted, finish))
        if finish is not None:
            break
    return out


def streamed(tokenizer, request, ids, finish_at: int | None, reason: int = 0):
    entry = Entry.create(7, request, tokenizer)
    for n, token_id in enumerate(ids, 1):
        shard_finish = pb.FinishInfo(generated_tokens=n, finish_reason=reason) if n == finish_at else None
        if entry.on_token(token_id, -0.25 * n, [], shard_finish):
            break
    out = []
    while not entry.events.empty():
        e: TokenEvent = entry.events.get_nowait()
        finish = None if e.finish is None else (e.finish.generated_text, e.finish.finish_reason,
                                                 e.finish.generated_tokens)
        assert e.top_tokens == () and e.prefill == ()
        out.append((e.index, e.token.id, e.token.text, e.token.special, e.token.logprob, e.text, finish))
    return out, entry


@pytest.mark.parametrize("skip_special_tokens", [False, True])
@pytest.mark.parametrize("stop,include_stop", [((), True), ((), False), (("STOP",), True), (("STOP",), False),
                                                (("😀 w", "<|im_end|>"), False), (("never",), False)])
@pytest.mark.parametrize("finish", ["shard_length", "shard_eos", "none"])
def test_on_token_events_equal_the_reference(router_tokenizer, skip_special_tokens, stop, include_stop, finish):
    tok = router_tokenizer
    prompt_ids = tok.encode(PROMPT, add_special_tokens=False)
    ids = tok.encode(OUTPUT, add_special_tokens=False)
    assert any(tok.is_special(i) for i in ids[:-1])
    request = valid_request(prompt_ids, max_new_tokens=len(ids), stop=stop, include_stop=include_stop,
                            skip_special_tokens=skip_special_tokens)
    finish_at, reason = {"shard_length": (len(ids), 0), "shard_eos": (len(ids), 1), "none": (None, 0)}[finish]
    expected = oracle(tok, request, ids, finish_at, reason)
    got, entry = streamed(tok, request, ids, finish_at, reason)
    assert got == expected
    assert entry.text == "".join(event[5] for event in expected)
    assert entry.finished == (expected[-1][6] is not None)
    if stop == ("STOP",):
        assert expected[-1][6][1] == "stop_sequence"  # the case exercises a stop, not only the end


def _dispatcher(tokenizer, entries_params):
    kv = KVManager(64, 2, prefix_caching=True)  # 2-token blocks: a 3-token prompt fills one
    limits = Limits(max_input_tokens=128, max_total_tokens=256, max_batch_prefill_tokens=64,
                    max_batch_total_tokens=256)
    batcher = Batcher(client=None, queue=Queue(kv, support_chunking=True), kv=kv, limits=limits,
                      metrics=Metrics(64, 256))
    entries = []
    for rid, params in enumerate(entries_params):
        entry = Entry.create(rid, valid_request([5, 6, 7], max_new_tokens=4, **params), tokenizer)
        entry.allocation = kv.allocate((5, 6, 7), 6)
        entry.num_computed = 3
        batcher.running[rid] = entry
        entries.append(entry)
    return batcher, entries


def test_dispatch_reads_prefill_top_tokens_and_finish(router_tokenizer):
    tok = router_tokenizer
    batcher, (plain, detailed, topped) = _dispatcher(tok, [{}, {"decoder_input_details": True}, {"top_n_tokens": 2}])
    nan = float("nan")
    assert batcher.kv.num_cached_blocks == 0
    batcher._dispatch([
        # An explicitly empty prefill_tokens message is "no prefill", like an absent one.
        pb.Generation(request_id=0, tokens=pb.Tokens(ids=[40], logprobs=[-0.5]), prefill_tokens=pb.Tokens()),
        pb.Generation(request_id=1, tokens=pb.Tokens(ids=[41], logprobs=[-0.75]),
                      prefill_tokens=pb.Tokens(ids=[5, 6, 7], logprobs=[nan, -1.0, -2.0])),
        pb.Generation(request_id=2, tokens=pb.Tokens(ids=[42], logprobs=[-1.5]),
                      top_tokens=[pb.Tokens(ids=[42, 2], logprobs=[-1.5, -2.5])],
                      finished=pb.FinishInfo(generated_tokens=1, finish_reason=pb.FINISH_REASON_EOS_TOKEN)),
        pb.Generation(request_id=99, tokens=pb.Tokens(ids=[43], logprobs=[0.0])),  # not running: ignored
    ])
    first = plain.events.get_nowait()
    assert first.prefill == () and first.top_tokens == () and first.token.id == 40 and first.finish is None
    second = detailed.events.get_nowait()
    assert [(t.id, t.text, t.logprob) for t in second.prefill] == [(i, tok.decode([i]), lp) for i, lp in
                                                                   [(5, None), (6, -1.0), (7, -2.0)]]
    third = topped.events.get_nowait()
    assert [(t.id, t.special) for t in third.top_tokens] == [(42, False), (2, True)]
    assert math.isclose(third.top_tokens[1].logprob, -2.5)
    assert third.finish.finish_reason == "eos_token" and third.finish.generated_tokens == 1
    assert 2 not in batcher.running and topped.allocation is None  # finished: released
    assert set(batcher.running) == {0, 1}
    # The prompt's full block is offered to the prefix cache once prefilled (by the plain and
    # the top-n request; prompt logprobs bypass the cache).
    assert batcher.kv.num_cached_blocks == 1


class _Shard:
    def __init__(self, fail: bool = False, delay: float = 0.0):
        self.fail, self.delay, self.cancelled, self.calls = fail, delay, False, 0

    async def decode(self, batches, updates):
        self.calls += 1
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.fail:
            raise ShardError("INTERNAL", "broke")
        return pb.DecodeResponse(generations=[pb.Generation(request_id=3)], total_ns=9)


def test_single_shard_answers_errors_and_cancels_like_a_group():
    async def run():
        ok = ShardedClient([_Shard()])
        response = await ok.decode([pb.CachedBatch(id=1)])
        assert [g.request_id for g in response.generations] == [3] and response.total_ns == 9
        with pytest.raises(ShardError, match="broke"):
            await ShardedClient([_Shard(fail=True)]).decode([pb.CachedBatch(id=1)])
        slow = _Shard(delay=30)
        call = asyncio.ensure_future(ShardedClient([slow]).decode([pb.CachedBatch(id=1)]))
        await asyncio.sleep(0.01)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert slow.cancelled and slow.calls == 1

    asyncio.run(run())


def test_step_overhead_benchmark_runs_on_the_fake_shard(router_tokenizer):
    """benchmarks/step_overhead.py end to end, briefly: the real servicer in a child process over a
    Unix socket, every stream gets all its tokens (asserted inside), and every phase is measured."""
    from pathlib import Path

    from benchmarks.step_overhead import PHASES, _measure

    server = str(Path(__file__).resolve().parents[3] / "shard" / "server.py")
    steps = _measure([2], 8, server, profile=False)[2]
    assert steps["steps"] >= 7 and set(steps["medians_us"]) == set(PHASES)
    assert steps["medians_us"]["rpc"] > 0 and steps["medians_us"]["dispatch"] > 0
    http = _measure([2], 8, server, profile=False, http=True)[2]
    assert http["gap_us"] > 0 and http["tok_s"] > 0
