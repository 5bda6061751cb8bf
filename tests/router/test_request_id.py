"""X-Request-Id: echoed or generated on every response (errors and streams too), and in the logs."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

import pytest
from aiohttp.test_utils import TestClient, TestServer

from router import request_id
from router.app import create_app
from router.log import JsonFormatter, RequestIdFilter, TextFormatter
from tests.router.app_harness import FakeState, GatedInfer, router_config


@pytest.mark.parametrize("value,valid", [
    ("abc-123", True), ("x" * 128, True), ("a:b/c=d~!", True),
    ("", False), ("x" * 129, False), ("has space", False), ("tab\there", False), ("é", False), ("new\nline", False),
])
def test_validation(value, valid):
    assert request_id.is_valid(value) is valid
    resolved = request_id.resolve(value)
    if valid:
        assert resolved == value
    else:
        assert str(uuid.UUID(resolved)) == resolved


def test_echoed_or_generated_on_every_kind_of_response(router_tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="router.app")
    caplog.handler.addFilter(RequestIdFilter())

    async def main():
        config = router_config(api_key="k")
        app = create_app(config, FakeState(config, router_tokenizer, GatedInfer(router_tokenizer)))
        auth = {"Authorization": "Bearer k"}
        got = {}
        async with TestClient(TestServer(app)) as client:
            for name, method, path, headers, body in [
                ("stream", "POST", "/generate_stream", auth, {"inputs": "hi"}),
                ("generate", "POST", "/generate", auth, {"inputs": "hi"}),
                ("openai-stream", "POST", "/v1/chat/completions", auth,
                 {"messages": [{"role": "user", "content": "hi"}], "stream": True}),
                ("unauthorized", "POST", "/generate", {}, {"inputs": "hi"}),
                ("not-found", "GET", "/nope", auth, None),
                ("invalid", "POST", "/generate", auth, {"inputs": ""}),
                ("public", "GET", "/health", {}, None),
            ]:
                response = await client.request(method, path, json=body,
                                                headers={**headers, "X-Request-Id": f"rid-{name}"})
                await response.read()
                got[name] = (response.status, response.headers.get("X-Request-Id"))
            generated = await client.get("/live", headers={"X-Request-Id": "bad id"})
            got["generated"] = (generated.status, generated.headers.get("X-Request-Id"))
        return got

    got = asyncio.run(main())
    for name in ("stream", "generate", "openai-stream", "unauthorized", "not-found", "invalid", "public"):
        assert got[name][1] == f"rid-{name}", (name, got[name])
    assert [got[n][0] for n in ("stream", "unauthorized", "not-found", "invalid")] == [200, 401, 404, 422]
    assert str(uuid.UUID(got["generated"][1])) == got["generated"][1]
    access = {r.request_id: r.getMessage() for r in caplog.records if r.name == "router.app"}
    assert access["rid-stream"].startswith("POST /generate_stream 200")
    assert access["rid-unauthorized"].startswith("POST /generate 401")
    assert access["rid-not-found"].startswith("GET /nope 404")
    assert "rid-public" not in access  # probes are not access-logged


def test_log_formats_carry_the_id():
    record = logging.LogRecord("router.infer", logging.WARNING, __file__, 1, "slow %s", ("step",), None)
    token = request_id.CURRENT.set("rid-7")
    try:
        RequestIdFilter().filter(record)
    finally:
        request_id.CURRENT.reset(token)
    assert json.loads(JsonFormatter().format(record))["request_id"] == "rid-7"
    assert TextFormatter().format(record).endswith("slow step [request_id=rid-7]")
    outside = logging.LogRecord("router.scheduler.batcher", logging.INFO, __file__, 1, "step", (), None)
    RequestIdFilter().filter(outside)
    assert "request_id" not in json.loads(JsonFormatter().format(outside))
