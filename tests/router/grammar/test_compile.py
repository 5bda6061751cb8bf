"""The router's grammar compiles (router/grammar/worker.py, router/grammar/pins.py): a child
process killed on overrun, compiles shared per grammar, a bounded queue that drops what nobody
waits for, and grammars pinned on the shards while the requests that checked them run."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from pytgi_common.grammar import GrammarError, grammar_key
from pytgi_proto import generate_pb2 as pb
from router.errors import GenerationError, OverloadedError
from router.grammar.validator import GrammarValidator
from router.scheduler.client import ShardError

REGEX = pb.GRAMMAR_TYPE_REGEX


@pytest.fixture
def make_validator(router_tokenizer):
    made: list[GrammarValidator] = []

    def make(**options) -> GrammarValidator:
        validator = GrammarValidator(router_tokenizer, **options)
        made.append(validator)
        return validator

    yield make
    for validator in made:
        process = validator.worker.process
        validator.close()
        assert validator.worker.process is None  # no child outlives its validator
        assert process is None or not process.is_alive()


def run(coro):
    return asyncio.run(coro)


async def until(condition, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def ready(validator: GrammarValidator) -> None:
    """Start the compile process (not part of any compile's deadline)."""
    await asyncio.wrap_future(validator.warm())


def test_an_overrun_compile_is_killed_and_the_grammar_stays_rejected(make_validator):
    validator = make_validator(timeout_s=0.5, compile_delay_s=120)

    async def scenario():
        await ready(validator)
        child = validator.worker.process
        start = time.monotonic()
        with pytest.raises(GrammarError, match="took longer than 0.5 s") as info:
            await validator.check(REGEX, "slow+", "response_format")
        assert info.value.param == "response_format"
        assert time.monotonic() - start < 60  # cut at the deadline, not after the 120 s compile
        assert not child.is_alive() and child.exitcode == -signal.SIGKILL  # killed and reaped
        assert validator.worker.process is None
        # Asked again: rejected at once, from the cache; no compile, no new child.
        with pytest.raises(GrammarError, match="took longer than 0.5 s"):
            await validator.check(REGEX, "slow+")
        assert (validator.compiles, validator.worker.started) == (1, 1)
        # The next grammar runs in a fresh child.
        validator.worker.delay_s = 0
        await validator.check(REGEX, "fast+")
        assert validator.worker.started == 2 and validator.worker.process.pid != child.pid

    run(scenario())


def test_a_compile_whose_clients_left_while_it_ran_is_still_settled(make_validator):
    """Every client of a running compile hangs up: the compile is not dropped (it runs), and when
    it ends, here by overrunning, its result is remembered and nothing of it lingers."""
    validator = make_validator(timeout_s=0.5, compile_delay_s=120)

    async def scenario():
        await ready(validator)
        checks = [asyncio.create_task(validator.check(REGEX, f"gone{i}+")) for i in range(3)]
        await until(lambda: validator.worker.process is not None and validator.compiles == 3, "the compiles")
        await asyncio.sleep(0.1)  # the first one is running in the child
        for check in checks:
            check.cancel()
        await asyncio.gather(*checks, return_exceptions=True)
        await until(lambda: not validator._compiles, "the running compile to settle")
        with pytest.raises(GrammarError, match="took longer than 0.5 s"):  # from the cache: no compile
            await validator.check(REGEX, "gone0+")
        assert validator.compiles == 3

    run(scenario())


def test_concurrent_checks_of_one_grammar_share_one_compile(make_validator):
    validator = make_validator(compile_delay_s=1.0, timeout_s=60)

    async def scenario():
        await ready(validator)
        await asyncio.gather(*(validator.check(REGEX, "[a-z]+") for _ in range(3)))
        assert (validator.compiles, validator.queue.started, validator.hits) == (1, 1, 2)

    run(scenario())


def test_waiting_compiles_are_bounded(make_validator):
    validator = make_validator(compile_delay_s=1.0, timeout_s=60, max_waiting=1)

    async def scenario():
        await ready(validator)
        running = asyncio.ensure_future(validator.check(REGEX, "a+"))
        await until(lambda: validator.queue.started == 1, "the first compile to start")
        waiting = asyncio.ensure_future(validator.check(REGEX, "b+"))
        await asyncio.sleep(0)
        assert validator.queue.num_waiting == 1
        with pytest.raises(OverloadedError) as info:
            await validator.check(REGEX, "c+")
        assert info.value.status == 429 and "waiting to be compiled" in info.value.message
        # A grammar already waiting is no new compile: it joins, whatever the queue holds.
        joined = asyncio.ensure_future(validator.check(REGEX, "b+"))
        await asyncio.gather(running, waiting, joined)
        assert validator.compiles == 2
        await validator.check(REGEX, "c+")  # room again

    run(scenario())


def test_a_waiting_compile_nobody_waits_for_is_dropped(make_validator):
    validator = make_validator(compile_delay_s=1.0, timeout_s=60)

    async def scenario():
        await ready(validator)
        running = asyncio.ensure_future(validator.check(REGEX, "a+"))
        await until(lambda: validator.queue.started == 1, "the first compile to start")
        clients = [asyncio.ensure_future(validator.check(REGEX, "b+")) for _ in range(2)]
        await asyncio.sleep(0)
        assert validator.queue.num_waiting == 1  # two requests, one compile
        clients[0].cancel()  # a client disconnects: the other still waits
        await asyncio.gather(clients[0], return_exceptions=True)
        assert validator.queue.num_waiting == 1 and validator.queue.dropped == 0
        clients[1].cancel()  # the last one leaves: the compile goes without running
        await asyncio.gather(clients[1], return_exceptions=True)
        assert validator.queue.num_waiting == 0 and validator.queue.dropped == 1
        await running
        assert validator.queue.started == 1  # "b+" never ran
        await validator.check(REGEX, "b+")  # asked for again: compiled now
        assert validator.queue.started == 2

    run(scenario())


# ------------------------------------------------------------------------------ shards


class FakeShards:
    """ShardedClient's grammar RPCs, recorded."""

    def __init__(self, error: ShardError | None = None):
        self.error = error
        self.compiled: list[tuple[int, str, int]] = []
        self.released: list[tuple[int, bytes]] = []

    async def compile_grammar(self, grammar_type: int, grammar: str, timeout_ms: int,
                              rpc_timeout_s: float | None = None) -> None:
        assert rpc_timeout_s is not None and rpc_timeout_s > 2 * timeout_ms / 1000  # a wedged shard ends
        self.compiled.append((grammar_type, grammar, timeout_ms))
        await asyncio.sleep(0)
        if self.error is not None:
            raise self.error

    async def release_grammar(self, grammar_type: int, grammar_sha256: bytes) -> None:
        self.released.append((grammar_type, grammar_sha256))


def test_grammars_stay_pinned_on_the_shards_while_their_requests_run(make_validator):
    shards = FakeShards()
    validator = make_validator(shards=shards)
    digits = "[0-9]+"

    async def request(done: asyncio.Event) -> None:  # a request handler: check, then run to the end
        await validator.check(REGEX, digits)
        await done.wait()

    async def scenario():
        ends = [asyncio.Event(), asyncio.Event()]
        handlers = [asyncio.create_task(request(end)) for end in ends]
        await until(lambda: validator.pinned(REGEX, digits) == 2, "both requests to hold the grammar")
        assert shards.compiled == [(REGEX, digits, 5000)]  # one CompileGrammar for both
        ends[0].set()
        await handlers[0]
        await asyncio.sleep(0)
        assert validator.pinned(REGEX, digits) == 1 and shards.released == []
        ends[1].set()
        await handlers[1]
        await until(lambda: shards.released, "the release")
        assert shards.released == [grammar_key(REGEX, digits)]
        # A later request announces it again: the shards may have evicted it since.
        ended = asyncio.Event()
        ended.set()
        await asyncio.create_task(request(ended))
        assert len(shards.compiled) == 2
        await until(lambda: len(shards.released) == 2, "the second release")

    run(scenario())


@pytest.mark.parametrize("code, detail, message", [
    ("INVALID_ARGUMENT", "GrammarError: the grammar is too deep", "the grammar is too deep"),
    ("INVALID_ARGUMENT", "GrammarTimeout: compiling the grammar took longer than 5 s",
     "compiling the grammar took longer than 5 s"),
])
def test_a_grammar_a_shard_rejects_stays_rejected(make_validator, code, detail, message):
    shards = FakeShards(ShardError(code, detail))
    validator = make_validator(shards=shards)

    async def scenario():
        for _ in range(2):
            with pytest.raises(GrammarError) as info:
                await validator.check(REGEX, "[0-9]+", "grammar")
            assert info.value.message == message and info.value.param == "grammar"
        assert len(shards.compiled) == 1 and shards.released == []

    run(scenario())


@pytest.mark.parametrize("code, error", [
    ("UNAVAILABLE", GenerationError),  # the shard is down
    ("DEADLINE_EXCEEDED", GenerationError),  # gRPC's own: the shard did not answer in time
    ("RESOURCE_EXHAUSTED", OverloadedError),  # its grammar thread is busy with an earlier compile
])
def test_a_failing_or_busy_shard_is_not_the_grammars_fault(make_validator, code, error):
    shards = FakeShards(ShardError(code, "RuntimeError: no"))
    validator = make_validator(shards=shards)

    async def scenario():
        with pytest.raises(error):
            await validator.check(REGEX, "[0-9]+")
        shards.error = None  # the shard is back: the grammar was never rejected
        await validator.check(REGEX, "[0-9]+")
        assert len(shards.compiled) == 2

    run(scenario())


def test_a_grammar_pinned_on_some_shards_only_is_released_there():
    """ShardedClient.compile_grammar: when one rank refuses, the ranks that pinned it release it
    before the error is raised, so no rank keeps a pin nobody will release."""
    from router.scheduler.client import ShardedClient

    class Rank:
        def __init__(self, error: ShardError | None):
            self.error, self.released = error, []

        async def compile_grammar(self, grammar_type, grammar, timeout_ms, rpc_timeout_s=None):
            if self.error is not None:
                raise self.error

        async def release_grammar(self, grammar_type, grammar_sha256):
            self.released.append((grammar_type, grammar_sha256))

    ranks = [Rank(None), Rank(ShardError("INVALID_ARGUMENT", "GrammarError: no")), Rank(None)]
    with pytest.raises(ShardError, match="GrammarError: no"):
        run(ShardedClient(ranks).compile_grammar(REGEX, "[a-z]+", 5000))
    assert [r.released for r in ranks] == [[grammar_key(REGEX, "[a-z]+")], [], [grammar_key(REGEX, "[a-z]+")]]
