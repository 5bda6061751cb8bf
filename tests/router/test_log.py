"""Client-controlled text cannot forge log lines or reach the terminal: control characters are
escaped by the text formatter (JSON escapes them by itself)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys

from aiohttp.test_utils import TestClient, TestServer

from router.app import create_app
from router.log import JsonFormatter, RequestIdFilter, TextFormatter
from tests.router.app_harness import FakeState, GatedInfer, router_config

HOSTILE = "model\r\n2030-01-01 00:00:00,000 INFO router router.app: forged\x1b[2J\x07\x85\u2028\x00end"


def record(msg: str, *args, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("router.openai.routes", logging.WARNING, __file__, 1, msg, args, exc_info)


def test_text_lines_escape_every_control_character():
    line = TextFormatter().format(record("unknown model %s", HOSTILE))
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\x00" not in line
    assert line.endswith(r"unknown model model\r\n2030-01-01 00:00:00,000 INFO router router.app: "
                         r"forged\x1b[2J\x07\x85\u2028\x00end")
    # printable text is kept, whatever the script
    assert TextFormatter().format(record("tab\there é ✓")).endswith(r"tab\there é ✓")


def test_json_lines_are_one_line_and_round_trip():
    line = JsonFormatter().format(record("unknown model %s", HOSTILE))
    assert "\n" not in line and "\x1b" not in line and "\x85" not in line
    assert json.loads(line)["message"] == f"unknown model {HOSTILE}"


def test_a_traceback_keeps_its_newlines_only():
    try:
        raise ValueError("bad \x1b[31mred\r")
    except ValueError:
        exc_info = sys.exc_info()
    text = TextFormatter().format(record("failed on %s", "/x\n", exc_info=exc_info))
    first, *rest = text.split("\n")
    assert first.endswith(r"failed on /x\n") and rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == r"ValueError: bad \x1b[31mred\r"


def test_request_paths_and_ids_in_access_lines(router_tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="router.app")
    caplog.handler.addFilter(RequestIdFilter())

    async def main():
        config = router_config()
        app = create_app(config, FakeState(config, router_tokenizer, GatedInfer(router_tokenizer)))
        async with TestClient(TestServer(app)) as client:
            # %0d%0a and %1b are decoded into request.path; the bad id is replaced, never echoed
            async with client.get("/x%0d%0aforged%1b[2J", headers={"X-Request-Id": "a\tb"}) as response:
                return response.status

    assert asyncio.run(main()) == 404
    (access,) = [r for r in caplog.records if r.name == "router.app" and r.getMessage().startswith("GET")]
    line = TextFormatter().format(access)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert r"GET /x\r\nforged\x1b[2J 404" in line and "[request_id=" in line and "a\\tb" not in line
