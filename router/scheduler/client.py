"""gRPC clients of the shards: `ShardClient` talks to one shard, `ShardedClient` to the whole group.

The router (and `text-generation-benchmark`) only ever sees `ShardedClient`: every RPC fans out to
all ranks concurrently, and the answers are merged so the caller sees one shard. Every rank runs
the same batch; rank r reports only the generations of requests with `id % world_size == r`, so
merging a step is concatenating the generation lists. grpc errors never cross this module: they
become `ShardError` with the status code name and the shard's message.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

import grpc

from pytgi_proto import generate_pb2 as pb
from pytgi_proto import generate_pb2_grpc

T = TypeVar("T")

# Same limits as the shard server: a prefill with prompt logprobs of a big batch is large.
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.max_send_message_length", 2**31 - 1),
]


class ShardError(Exception):
    """A shard RPC failed. `code` is the gRPC status name (e.g. "NOT_FOUND"), `message` the
    shard's own error text (e.g. "KeyError: batch 7 not found in the shard cache")."""

    def __init__(self, code: str, message: str, url: str = ""):
        super().__init__(f"{code}: {message}" + (f" ({url})" if url else ""))
        self.code = code
        self.message = message
        self.url = url


def _grpc_target(path_or_url: str) -> str:
    """A socket path becomes a unix:// URL; URLs and HOST:PORT (multi-node shards) pass as they are."""
    if path_or_url.startswith(("unix:", "ipv4:", "ipv6:", "dns:")):
        return path_or_url
    host, _, port = path_or_url.rpartition(":")
    if host and port.isdigit() and "/" not in path_or_url:
        return path_or_url
    return f"unix://{path_or_url}"


class ShardClient:
    """One shard over one grpc.aio channel. Create it inside the running event loop (grpc.aio
    binds a channel to the loop that creates it)."""

    __slots__ = ("url", "_channel", "_stub")

    def __init__(self, path_or_url: str):
        self.url = _grpc_target(path_or_url)
        self._channel = grpc.aio.insecure_channel(self.url, options=_CHANNEL_OPTIONS)
        self._stub = generate_pb2_grpc.TextGenerationServiceStub(self._channel)

    async def _call(self, method: str, request, timeout_s: float | None = None):
        try:
            return await getattr(self._stub, method)(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            # `from None`: the grpc traceback adds nothing the code + shard message don't say.
            raise ShardError(error.code().name, error.details() or "", self.url) from None

    async def info(self) -> pb.InfoResponse:
        return await self._call("Info", pb.InfoRequest())

    async def health(self) -> None:
        await self._call("Health", pb.HealthRequest())

    async def service_discovery(self) -> list[str]:
        return list((await self._call("ServiceDiscovery", pb.ServiceDiscoveryRequest())).urls)

    async def clear_cache(self, batch_id: int | None = None) -> None:
        await self._call("ClearCache", pb.ClearCacheRequest() if batch_id is None else pb.ClearCacheRequest(id=batch_id))

    async def filter_batch(self, batch_id: int, request_ids: Iterable[int]) -> pb.CachedBatch | None:
        request = pb.FilterBatchRequest(batch_id=batch_id, request_ids=list(request_ids))
        batch = (await self._call("FilterBatch", request)).batch
        # The shard answers an empty CachedBatch when nothing is kept; callers want "no batch".
        return batch if batch.size else None

    async def warmup(self, request: pb.WarmupRequest) -> pb.WarmupResponse:
        return await self._call("Warmup", request)

    async def prefill(self, batch: pb.Batch, cached_batch: pb.CachedBatch | None = None,
                      updates: Sequence[pb.RequestUpdate] = ()) -> pb.PrefillResponse:
        request = pb.PrefillRequest(batch=batch, updates=list(updates))
        if cached_batch is not None:
            request.cached_batch.CopyFrom(cached_batch)
        return await self._call("Prefill", request)

    async def decode(self, batches: Sequence[pb.CachedBatch],
                     updates: Sequence[pb.RequestUpdate] = ()) -> pb.DecodeResponse:
        return await self._call("Decode", pb.DecodeRequest(batches=list(batches), updates=list(updates)))

    async def compile_grammar(self, grammar_type: int, grammar: str, timeout_ms: int,
                              rpc_timeout_s: float | None = None) -> None:
        await self._call("CompileGrammar", pb.CompileGrammarRequest(
            grammar_type=grammar_type, grammar=grammar, timeout_ms=timeout_ms), rpc_timeout_s)

    async def release_grammar(self, grammar_type: int, grammar_sha256: bytes) -> None:
        await self._call("ReleaseGrammar", pb.ReleaseGrammarRequest(
            grammar_type=grammar_type, grammar_sha256=grammar_sha256))

    async def close(self) -> None:
        await self._channel.close()


class ShardedClient:
    """All shards of a tensor-parallel group, seen as one."""

    __slots__ = ("clients",)

    def __init__(self, clients: list[ShardClient]):
        assert clients, "a sharded client needs at least one shard"
        self.clients = clients

    @classmethod
    async def connect(cls, master_uds: str) -> ShardedClient:
        """Connect to rank 0 (`master_uds`: its socket path or unix:// URL), discover the group,
        then connect to every rank."""
        master = ShardClient(master_uds)
        try:
            urls = await master.service_discovery()
        finally:
            await master.close()
        return cls([ShardClient(url) for url in urls])

    @property
    def world_size(self) -> int:
        return len(self.clients)

    async def _all(self, call: Callable[[ShardClient], Awaitable[T]]) -> list[T]:
        """Run `call` on every shard concurrently. The first failure cancels the others (a step
        that failed on one rank is useless on the rest) and is raised."""
        if len(self.clients) == 1:
            # NOTE: one shard is awaited in place: a task and a gather would cost two more
            # event-loop turns on every step.
            return [await call(self.clients[0])]
        tasks = [asyncio.ensure_future(call(client)) for client in self.clients]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def info(self) -> pb.InfoResponse:
        return (await self._all(lambda c: c.info()))[-1]

    async def health(self) -> None:
        await self._all(lambda c: c.health())

    async def service_discovery(self) -> list[str]:
        return await self.clients[0].service_discovery()

    async def clear_cache(self, batch_id: int | None = None) -> None:
        await self._all(lambda c: c.clear_cache(batch_id))

    async def filter_batch(self, batch_id: int, request_ids: Iterable[int]) -> pb.CachedBatch | None:
        request_ids = list(request_ids)
        return (await self._all(lambda c: c.filter_batch(batch_id, request_ids)))[-1]

    async def warmup(self, request: pb.WarmupRequest) -> pb.WarmupResponse:
        responses = await self._all(lambda c: c.warmup(request))
        # Ranks agree on the KV size already (all-reduce min); taking the minimum here keeps the
        # router safe even if one rank reports less.
        merged = pb.WarmupResponse()
        merged.CopyFrom(responses[-1])
        merged.num_blocks = min(r.num_blocks for r in responses)
        supported = [r.max_supported_total_tokens for r in responses if r.HasField("max_supported_total_tokens")]
        if supported:
            merged.max_supported_total_tokens = min(supported)
        return merged

    async def prefill(self, batch: pb.Batch, cached_batch: pb.CachedBatch | None = None,
                      updates: Sequence[pb.RequestUpdate] = ()) -> pb.PrefillResponse:
        return _merge_steps(await self._all(lambda c: c.prefill(batch, cached_batch, updates)))

    async def decode(self, batches: Sequence[pb.CachedBatch],
                     updates: Sequence[pb.RequestUpdate] = ()) -> pb.DecodeResponse:
        return _merge_steps(await self._all(lambda c: c.decode(batches, updates)))

    async def compile_grammar(self, grammar_type: int, grammar: str, timeout_ms: int,
                              rpc_timeout_s: float | None = None) -> None:
        """Compile a grammar on every shard and pin it there (until `release_grammar`). Unlike
        the other RPCs, every shard is awaited: on a failure the shards that did pin it are
        released again before the first failure is raised, so no pin is left behind."""
        results = await asyncio.gather(*(c.compile_grammar(grammar_type, grammar, timeout_ms, rpc_timeout_s)
                                         for c in self.clients),
                                       return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if not failures:
            return
        pinned = [c for c, r in zip(self.clients, results) if not isinstance(r, BaseException)]
        sha256 = hashlib.sha256(grammar.encode("utf-8", "surrogatepass")).digest()
        await asyncio.gather(*(c.release_grammar(grammar_type, sha256) for c in pinned), return_exceptions=True)
        raise failures[0]

    async def release_grammar(self, grammar_type: int, grammar_sha256: bytes) -> None:
        """Unpin on every shard (each one, whatever the others answer); the first failure is raised."""
        results = await asyncio.gather(*(c.release_grammar(grammar_type, grammar_sha256) for c in self.clients),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def close(self) -> None:
        await asyncio.gather(*(client.close() for client in self.clients))


def _merge_steps(responses: list[T]) -> T:
    """One Prefill/Decode answer from every rank's: all generations, the last rank's batch, and
    the slowest rank's timings (the step took as long as its slowest rank)."""
    if len(responses) == 1:
        return responses[0]
    last, slowest = responses[-1], max(responses, key=lambda r: r.total_ns)
    merged = type(last)(
        generations=[g for r in responses for g in r.generations],
        forward_ns=slowest.forward_ns, decode_ns=slowest.decode_ns, total_ns=slowest.total_ns,
    )
    if last.HasField("batch"):
        merged.batch.CopyFrom(last.batch)
    if slowest.HasField("concat_ns"):
        merged.concat_ns = slowest.concat_ns
    return merged
