"""benchmarks.soak against an in-process fake server: its outcome accounting (completed, cancelled,
errors), hang-ups the server really sees, the leak check from /metrics, and its exit status."""

from __future__ import annotations

import asyncio
import io
import json

from aiohttp import web

from benchmarks import soak

TOKENS = 4
TOKEN_DELAY = 0.01


class FakeServer:
    """Streams TOKENS events per request; counts what finished and what the client abandoned, and
    serves those counts plus the KV figures it is told to report on /metrics. Handlers still running
    show as the batch size, as the router's running requests do, so the soak's idle wait covers a
    hang-up the server has not noticed yet."""

    def __init__(self, held_by_requests: int | None = 0, kv_used: int = 7, prefix_cache_blocks: int = 7,
                 fail_generate: bool = False, stream_error: bool = False, busy: bool = False):
        self.held, self.kv_used, self.cached = held_by_requests, kv_used, prefix_cache_blocks
        self.fail_generate, self.stream_error, self.busy = fail_generate, stream_error, busy
        self.success = self.dropped = self.inflight = 0
        self.kinds: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/generate_stream", self.generate_stream)
        app.router.add_post("/generate", self.generate)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def _counted(self, work):
        self.inflight += 1
        try:
            result = await work()
        except BaseException:  # cancelled, reset, or a write to a closing transport: the client left
            self.dropped += 1
            raise
        finally:
            self.inflight -= 1
        self.success += 1
        return result

    async def generate_stream(self, request: web.Request):
        self.kinds.append("generate_stream")
        body = await request.json()
        assert body["parameters"]["max_new_tokens"] == TOKENS

        async def work():
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(TOKENS):
                await asyncio.sleep(TOKEN_DELAY)
                event = {"index": i + 1, "token": {"id": i, "text": "t"}, "generated_text": None, "details": None}
                if self.stream_error and i == 1:
                    event = {"error": "shard died", "error_type": "generation"}
                await resp.write(f"data: {json.dumps(event)}\n\n".encode())
            await resp.write_eof()
            return resp

        return await self._counted(work)

    async def generate(self, request: web.Request):
        self.kinds.append("generate")
        if self.fail_generate:
            return web.json_response({"error": "boom", "error_type": "generation"}, status=500)

        async def work():
            await asyncio.sleep(TOKEN_DELAY * TOKENS)
            return web.json_response({"generated_text": "tttt"})

        return await self._counted(work)

    async def chat(self, request: web.Request):
        body = await request.json()
        assert body["max_tokens"] == TOKENS and body["messages"][0]["role"] == "user"
        self.kinds.append("chat_stream" if body.get("stream") else "chat")
        if not body.get("stream"):
            async def plain():
                await asyncio.sleep(TOKEN_DELAY * TOKENS)
                return web.json_response({"choices": [{"message": {"content": "tttt"}}]})

            return await self._counted(plain)

        async def work():
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for _ in range(TOKENS):
                await asyncio.sleep(TOKEN_DELAY)
                chunk = {"choices": [{"index": 0, "delta": {"content": "t"}, "finish_reason": None}]}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp

        return await self._counted(work)

    async def metrics(self, request: web.Request) -> web.Response:
        lines = [
            "# TYPE tgi_batch_current_size gauge", f"tgi_batch_current_size {1 if self.busy else self.inflight}",
            "# TYPE tgi_queue_size gauge", "tgi_queue_size 0",
            "# TYPE pytgi_kv_blocks_used gauge", f"pytgi_kv_blocks_used {self.kv_used}",
            "# TYPE pytgi_prefix_cache_blocks gauge", f"pytgi_prefix_cache_blocks {self.cached}",
            "# TYPE tgi_request_success counter", f"tgi_request_success {self.success}",
            "# TYPE tgi_request_failure counter", f'tgi_request_failure{{err="dropped"}} {self.dropped}',
        ]
        if self.held is not None:
            lines += ["# TYPE pytgi_kv_blocks_held_by_requests gauge",
                      f"pytgi_kv_blocks_held_by_requests {self.held}"]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


def run(server: FakeServer, *args: str) -> tuple[int, dict]:
    async def main():
        runner = web.AppRunner(server.app(), handler_cancellation=True)  # as the router runs it
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        out = io.StringIO()
        try:
            code = await soak.amain(["--url", f"http://127.0.0.1:{port}", "--max-tokens", str(TOKENS),
                                     "--idle-timeout", "1", "--json", *args], out=out)
        finally:
            await runner.cleanup()
        return code, json.loads(out.getvalue())

    return asyncio.run(main())


def test_a_clean_soak_counts_every_outcome_and_passes():
    server = FakeServer()
    code, report = run(server, "--requests", "80", "--concurrency", "8", "--disconnect", "0.5",
                       "--disconnect-max-delay", "0.03", "--seed", "3")
    assert code == 0 and report["ok"]
    assert report["requests"] == 80 and report["errors"] == 0
    assert report["completed"] + report["cancelled"] == 80
    assert 20 <= report["cancelled"] <= 60
    assert set(report["by_kind"]) == set(soak.KINDS) == set(server.kinds)
    assert all(counts.get("cancelled") for counts in report["by_kind"].values())
    # Every hang-up reached the server as a disconnect, and the server's counters were read as deltas.
    # Slack of 3 for races the client cannot see: a plain request abandoned within a few ms of its
    # answer may finish server-side first, and one abandoned before its body was read never reaches
    # a handler.
    assert report["server_success"] == server.success
    assert report["completed"] <= server.success <= report["completed"] + 3
    assert report["cancelled"] - 3 <= server.dropped <= report["cancelled"]
    assert 80 - 3 <= server.success + server.dropped <= 80
    assert report["leaked_kv_blocks"] == 0 and report["idle"]


def test_blocks_held_after_idle_are_a_leak():
    code, report = run(FakeServer(held_by_requests=2), "--requests", "4", "--disconnect", "0")
    assert code == 1 and not report["ok"] and report["leaked_kv_blocks"] == 2


def test_without_the_held_gauge_the_leak_is_used_minus_prefix_cache():
    code, report = run(FakeServer(held_by_requests=None, kv_used=9, prefix_cache_blocks=6), "--requests", "4",
                       "--disconnect", "0")
    assert code == 1 and report["leaked_kv_blocks"] == 3
    code, report = run(FakeServer(held_by_requests=None, kv_used=6, prefix_cache_blocks=6), "--requests", "4",
                       "--disconnect", "0")
    assert code == 0 and report["leaked_kv_blocks"] == 0


def test_server_errors_fail_the_soak():
    code, report = run(FakeServer(fail_generate=True), "--requests", "40", "--concurrency", "4",
                       "--disconnect", "0")
    assert code == 1 and report["errors_5xx"] == report["by_kind"]["generate"]["error"] > 0
    assert report["errors"] == report["errors_5xx"]
    code, report = run(FakeServer(stream_error=True), "--requests", "40", "--concurrency", "4",
                       "--disconnect", "0")
    assert code == 1 and report["errors_5xx"] == report["by_kind"]["generate_stream"]["error"] > 0
    assert "shard died" in report["error_samples"][0]


def test_a_server_that_never_goes_idle_fails_the_soak():
    code, report = run(FakeServer(busy=True), "--requests", "2", "--disconnect", "0")
    assert code == 1 and not report["idle"]


def test_only_loopback_and_bounded_runs_are_accepted(capsys):
    assert soak.main(["--url", "http://192.168.1.10:3000"]) == 2
    assert soak.main(["--requests", "0"]) == 2
    assert soak.main(["--disconnect", "1.5"]) == 2
    assert "loopback" in capsys.readouterr().err
