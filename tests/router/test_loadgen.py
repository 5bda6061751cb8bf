"""benchmarks.loadgen against an in-process fake SSE server (both APIs), its error accounting and
its loopback-only guard. No model; a few seconds in all."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from aiohttp import web

from benchmarks import loadgen

FIRST_DELAY = 0.05
TOKEN_DELAY = 0.01
N_TOKENS = 5


async def _sse(request: web.Request, events: list[dict], done: bool) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await asyncio.sleep(FIRST_DELAY)
    for i, event in enumerate(events):
        if i:
            await asyncio.sleep(TOKEN_DELAY)
        await resp.write(f"data: {json.dumps(event)}\n\n".encode())
    if done:
        await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _openai(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == N_TOKENS and body["temperature"] == 0 and body["ignore_eos"] is True
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": f"t{i}"},
                            "finish_reason": "length" if i == N_TOKENS - 1 else None}]}
              for i in range(N_TOKENS)]
    chunks.append({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": N_TOKENS}})
    return await _sse(request, chunks, done=True)


async def _tgi(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    assert body["parameters"]["max_new_tokens"] == N_TOKENS and body["parameters"]["details"] is True
    events = [{"index": i, "token": {"id": i, "text": f"t{i}", "logprob": 0.0, "special": False},
               "generated_text": None, "details": None} for i in range(N_TOKENS)]
    events[-1]["details"] = {"finish_reason": "length", "generated_tokens": N_TOKENS, "seed": None}
    return await _sse(request, events, done=False)


async def _fail(request: web.Request) -> web.Response:
    return web.json_response({"error": "boom", "error_type": "test"}, status=500)


async def _with_server(coro_factory):
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _openai)
    app.router.add_post("/generate_stream", _tgi)
    app.router.add_post("/bad/v1/chat/completions", _fail)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        return await coro_factory(f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("api", ["openai", "tgi"])
def test_loadgen_measures_fake_server(api):
    async def go(url: str) -> loadgen.Summary:
        argv = ["--url", url, "--api", api, "--concurrency", "4", "--requests", "8", "--warmup", "2",
                "--max-tokens", str(N_TOKENS), "--timeout", "10"]
        if api == "openai":
            argv.append("--ignore-eos")
        args = loadgen.parse_args(argv)
        assert loadgen.check_args(args) is None
        return await loadgen.run_load(args)

    s = asyncio.run(_with_server(go))
    assert (s.requests, s.ok, s.errors) == (8, 8, 0)
    assert s.output_tokens == 8 * N_TOKENS and s.finish_reasons == {"length": 8}
    assert s.ttft_ms.count == 8 and 30 <= s.ttft_ms.p50 <= 300
    assert s.itl_ms.count == 8 * (N_TOKENS - 1) and 5 <= s.itl_ms.p50 <= 100
    assert s.e2e_ms.p50 >= s.ttft_ms.p50
    assert s.output_tok_s > 0 and s.req_s > 0
    json.dumps(s.to_dict(), allow_nan=False)
    assert len(s.per_request) == 8 and all(row[3] == N_TOKENS for row in s.per_request)
    if api == "openai":  # usage carries the prompt length; TGI's stream does not
        assert s.prompt_tokens_mean == 3 and all(row[2] == 3 for row in s.per_request)
    else:
        assert s.prompt_tokens_mean is None


def test_prefill_and_shared_prefix_prompt_sets():
    prefill = loadgen.prompts_for("prefill")
    # Distinct from the first word: no prompt cache can answer a prefill measurement.
    assert len(prefill) == 64 and len({p.split(".")[0] for p in prefill}) == 64
    shared = loadgen.prompts_for("shared-prefix")
    context = shared[0].split("\n\nQuestion:")[0]
    assert len(context) > 4000 and all(p.startswith(context) for p in shared) and len(set(shared)) == len(shared)


def test_loadgen_counts_errors_and_exits_2(tmp_path):
    out_file = tmp_path / "summary.json"

    async def go(url: str) -> int:
        return await loadgen.amain(["--url", f"{url}/bad", "--concurrency", "2", "--requests", "3",
                                    "--json", "--json-out", str(out_file)], out=io.StringIO())

    assert asyncio.run(_with_server(go)) == 2
    summary = json.loads(out_file.read_text())
    assert summary["errors"] == 3 and summary["ok"] == 0
    assert "HTTP 500" in summary["error_samples"][0] and "boom" in summary["error_samples"][0]
    assert summary["ttft_ms"]["p50"] is None


def test_loadgen_prints_table():
    async def go(url: str) -> tuple[int, str]:
        out = io.StringIO()
        rc = await loadgen.amain(["--url", url, "--requests", "2", "--max-tokens", str(N_TOKENS),
                                  "--ignore-eos", "--keep-alive"], out=out)
        return rc, out.getvalue()

    rc, text = asyncio.run(_with_server(go))
    assert rc == 0 and "ttft_ms" in text and "out_tok/s" in text


@pytest.mark.parametrize("url", ["http://10.0.0.1:3000", "http://example.com", "http://[::2]:80", "nonsense"])
def test_loadgen_refuses_non_loopback(url, capsys):
    assert asyncio.run(loadgen.amain(["--url", url, "--requests", "1"])) == 2
    assert "loopback" in capsys.readouterr().err


@pytest.mark.parametrize("url", ["http://127.0.0.1:3000", "http://127.8.9.1", "http://localhost:80",
                                 "http://[::1]:3000"])
def test_loadgen_accepts_loopback(url):
    assert loadgen.is_loopback_url(url)


@pytest.mark.parametrize("argv", [["--requests", "100001"], ["--api", "tgi", "--ignore-eos"],
                                  ["--extra-body", "[1]"], ["--extra-body", "{"]])
def test_loadgen_rejects_bad_args(argv):
    assert loadgen.check_args(loadgen.parse_args(argv)) is not None
