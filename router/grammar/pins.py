"""Grammars prepared on the shards for the requests that use them.

Once the router's own compile accepted a grammar, every shard compiles it too (CompileGrammar:
on the shard's grammar thread, never its engine thread, within the same deadline) and keeps it
pinned in its cache until ReleaseGrammar. The Prefill of a request therefore finds its grammar
compiled, however much traffic passes between the check and the Prefill: a pinned grammar is
never evicted.

A pin lasts while any request handler that checked the grammar is running. Each check registers
the running asyncio task (the request's handler: it lives until the response is complete or the
client has gone) and the grammar is released when the last of them ends. The router holds at
most one pin per grammar on each shard: the first check announces it, later ones only count
themselves in, the last task to end releases it. Pins thus number at most the distinct grammars
of the requests in flight (bounded by --max-concurrent-requests).
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass

from router.errors import GenerationError, OverloadedError
from router.scheduler.client import ShardedClient, ShardError

log = logging.getLogger(__name__)

_ERROR_NAME = re.compile(r"^\w+: ")  # the shard servicer's "<ExceptionType>: " before its message


@dataclass(eq=False, slots=True)
class _Pin:
    announce: asyncio.Future | None = None  # the CompileGrammar fan-out: None or a rejection
    users: int = 0  # request handler tasks still running
    pinned: bool = False  # every shard answered CompileGrammar and holds the grammar


class ShardGrammars:
    def __init__(self, client: ShardedClient, timeout_s: float) -> None:
        self.client = client
        self.timeout_s = timeout_s
        self._pins: dict[tuple[int, bytes], _Pin] = {}
        self._releases: set[asyncio.Task] = set()

    async def prepare(self, key: tuple[int, bytes], grammar_type: int, text: str) -> str | None:
        """Have every shard hold the compiled grammar until the running task ends. None, or why
        a shard rejects the grammar (it did not compile, or not in time); GenerationError when
        a shard failed for another reason."""
        task = asyncio.current_task()
        assert task is not None, "grammars are prepared from a request's task"
        pin = self._pins.get(key)
        if pin is None:
            pin = self._pins[key] = _Pin()
            pin.announce = asyncio.ensure_future(self._announce(key, pin, grammar_type, text))
        pin.users += 1
        task.add_done_callback(lambda _: self._leave(key, pin))
        return await asyncio.shield(pin.announce)

    def holders(self, key: tuple[int, bytes]) -> int:
        """Running tasks holding `key` pinned on the shards."""
        pin = self._pins.get(key)
        return pin.users if pin is not None and pin.pinned else 0

    async def _announce(self, key, pin: _Pin, grammar_type: int, text: str) -> str | None:
        try:
            # A shard answers within two deadlines (waiting for its grammar thread, compiling);
            # past that it is wedged, a failure of the shard, not of the grammar.
            await self.client.compile_grammar(grammar_type, text, round(self.timeout_s * 1000),
                                              rpc_timeout_s=2 * self.timeout_s + 5)
        except ShardError as error:
            if self._pins.get(key) is pin:
                del self._pins[key]
            if error.code == "INVALID_ARGUMENT":  # it does not compile, or not in time, on a shard
                return _ERROR_NAME.sub("", error.message)
            # Not the grammar's fault: nothing to remember about it.
            if error.code == "RESOURCE_EXHAUSTED":  # the shard's grammar thread is still busy
                raise OverloadedError("Model is overloaded: the shards are busy compiling grammars; "
                                      "retry later") from error
            raise GenerationError(f"the shards could not prepare the grammar ({error.code})") from error
        pin.pinned = True
        if pin.users == 0:  # every request left while the shards compiled
            self._release(key, pin)
        return None

    def _leave(self, key, pin: _Pin) -> None:
        pin.users -= 1
        if pin.users == 0 and pin.pinned:
            self._release(key, pin)

    def _release(self, key, pin: _Pin) -> None:
        if self._pins.get(key) is pin:
            del self._pins[key]
        pin.pinned = False
        try:
            task = asyncio.get_running_loop().create_task(self._send_release(key))
        except RuntimeError:  # no loop any more: the router is shutting down with its shards
            return
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _send_release(self, key: tuple[int, bytes]) -> None:
        try:
            await self.client.release_grammar(*key)
        except Exception as error:  # noqa: BLE001 - a task nobody awaits: say it here or never
            # The shard keeps that grammar pinned (compiled, never evicted) until it restarts.
            log.warning("releasing a grammar on the shards failed (it stays pinned there): %s", error)
