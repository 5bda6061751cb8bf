"""Thin grpc.aio servicer: each RPC delegates to the Engine on one worker thread.

The engine runs on a single dedicated thread so that calls are serialized (the engine is not
thread-safe) while the event loop keeps answering Health/Info during a long prefill. That thread
is also the one that loads the model: every Python thread that runs torch ops gets its own
OpenMP team, and two teams on two cores spin against each other (a batch-1 decode step went from
35 ms to 52 ms). Exceptions become gRPC statuses whose details are the exception's message.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc

from shard.config import ShardConfig
from shard.engine import Engine
from shard.grammar import GrammarBusy
from pytgi_proto import generate_pb2 as pb
from pytgi_proto import generate_pb2_grpc

log = logging.getLogger(__name__)

_STATUS = {ValueError: grpc.StatusCode.INVALID_ARGUMENT, KeyError: grpc.StatusCode.NOT_FOUND,
           GrammarBusy: grpc.StatusCode.RESOURCE_EXHAUSTED}


def _rpc(method):
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except Exception as error:  # every failure must reach the router as a status, not a hang
            code = next((c for t, c in _STATUS.items() if isinstance(error, t)), grpc.StatusCode.INTERNAL)
            message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
            log.exception("%s failed", method.__name__)
            await context.abort(code, f"{type(error).__name__}: {message}")

    return wrapper


class TextGenerationService(generate_pb2_grpc.TextGenerationServiceServicer):
    def __init__(self, engine: Engine, socket_urls: list[str], executor: ThreadPoolExecutor):
        self.engine = engine
        self.socket_urls = socket_urls
        self.executor = executor

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    @_rpc
    async def Info(self, request, context):
        return self.engine.get_info()

    @_rpc
    async def ServiceDiscovery(self, request, context):
        return pb.ServiceDiscoveryResponse(urls=self.socket_urls)

    @_rpc
    async def ClearCache(self, request, context):
        await self._run(self.engine.clear_cache, request.id if request.HasField("id") else None)
        return pb.ClearCacheResponse()

    @_rpc
    async def FilterBatch(self, request, context):
        batch = await self._run(self.engine.filter_batch, request.batch_id, list(request.request_ids))
        return pb.FilterBatchResponse(batch=batch)

    @_rpc
    async def Warmup(self, request, context):
        return await self._run(self.engine.warmup, request)

    @_rpc
    async def Prefill(self, request, context):
        return await self._run(self.engine.prefill, request)

    @_rpc
    async def Decode(self, request, context):
        return await self._run(self.engine.decode, request)

    @_rpc
    async def Health(self, request, context):
        await self._run(self.engine.health)
        return pb.HealthResponse()

    # Grammars compile on their own thread (Grammars.prepare), never the engine's: the steps of
    # the requests already running go on while a new request's grammar compiles.
    @_rpc
    async def CompileGrammar(self, request, context):
        timeout_s = request.timeout_ms / 1000 if request.timeout_ms else None
        await self.engine.grammars.prepare(request.grammar_type, request.grammar, timeout_s)
        return pb.CompileGrammarResponse()

    @_rpc
    async def ReleaseGrammar(self, request, context):
        self.engine.grammars.release(request.grammar_type, request.grammar_sha256)
        return pb.ReleaseGrammarResponse()


async def serve(load_engine: Callable[[], Engine], config: ShardConfig) -> None:
    rank, world_size = config.rank, config.world_size
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
    engine = await loop.run_in_executor(executor, load_engine)
    socket_path = config.socket_path
    if os.path.exists(socket_path):
        os.unlink(socket_path)  # a stale socket of a crashed run would make bind fail
    # What the router should dial for this rank: the Unix socket on one node; the TCP address
    # when ranks span nodes. Every rank announces its own, gathered over the group (a
    # collective: all ranks reach this line), so rank 0 answers ServiceDiscovery for all.
    own_url = config.tcp_address or f"unix://{socket_path}"
    urls = [str(u) for u in await loop.run_in_executor(executor, engine.tp.all_gather_object, own_url)]
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", 2**31 - 1),
        ("grpc.max_send_message_length", 2**31 - 1),
    ])
    generate_pb2_grpc.add_TextGenerationServiceServicer_to_server(TextGenerationService(engine, urls, executor), server)
    server.add_insecure_port(f"unix://{socket_path}")
    if config.tcp_address and server.add_insecure_port(config.tcp_address) == 0:
        raise SystemExit(f"error: cannot listen on {config.tcp_address}")
    await server.start()
    log.info("shard %d/%d serving on unix://%s%s", rank, world_size, socket_path,
             f" and {config.tcp_address}" if config.tcp_address else "")
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shard %d shutting down", rank)
    await server.stop(grace=1)
    if os.path.exists(socket_path):
        os.unlink(socket_path)
