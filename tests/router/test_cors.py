"""CORS: off unless --cors-allow-origin is given (TGI: no CORS header at all); then only the listed
origins (or any, with an explicit `*`), `Vary: Origin` when the answer depends on the Origin, and
preflights answered for allowed origins only."""

from __future__ import annotations

import asyncio

from aiohttp.test_utils import TestClient, TestServer

from router.app import create_app
from tests.router.app_harness import FakeState, GatedInfer, router_config

A, B = "https://a.example", "https://b.example"
AUTH = {"Authorization": "Bearer k"}
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}


def exchange(router_tokenizer, origins: tuple[str, ...], requests: list[tuple]) -> list:
    """(status, headers) per (method, path, headers, json body), on an app with `--api-key k`."""
    async def main():
        config = router_config(api_key="k", cors_allow_origin=origins)
        app = create_app(config, FakeState(config, router_tokenizer, GatedInfer(router_tokenizer)))
        got = []
        async with TestClient(TestServer(app)) as client:
            for method, path, headers, body in requests:
                async with client.request(method, path, headers=headers, json=body) as response:
                    await response.read()
                    got.append((response.status, response.headers))
        return got

    return asyncio.run(main())


def cors_headers(headers) -> dict[str, str]:
    return {k: v for k, v in headers.items()
            if k.lower().startswith("access-control-") or k.lower() == "vary"}


def test_off_by_default(router_tokenizer):
    got = exchange(router_tokenizer, (), [
        ("GET", "/health", {"Origin": A}, None),
        ("POST", "/generate", {"Origin": A, **AUTH}, {"inputs": "hi"}),
        ("OPTIONS", "/generate", {"Origin": A, **PREFLIGHT}, None),
    ])
    assert [status for status, _ in got] == [200, 200, 401]  # a preflight is just an unauthorized request
    assert all(cors_headers(headers) == {} for _, headers in got)


def test_listed_origins_only_with_vary(router_tokenizer):
    got = exchange(router_tokenizer, (A,), [
        ("GET", "/health", {"Origin": A}, None),
        ("GET", "/health", {"Origin": B}, None),
        ("GET", "/health", {}, None),
        ("POST", "/generate_stream", {"Origin": A, **AUTH}, {"inputs": "hi"}),  # headers sent before the end
        ("POST", "/generate", {"Origin": A}, {"inputs": "hi"}),  # errors too
    ])
    assert [status for status, _ in got] == [200, 200, 200, 200, 401]
    assert [cors_headers(headers) for _, headers in got] == [
        {"Access-Control-Allow-Origin": A, "Vary": "Origin"},
        {"Vary": "Origin"},
        {"Vary": "Origin"},  # a cache must not serve this answer to an allowed origin
        {"Access-Control-Allow-Origin": A, "Vary": "Origin"},
        {"Access-Control-Allow-Origin": A, "Vary": "Origin"},
    ]


def test_preflight_is_answered_for_allowed_origins_only(router_tokenizer):
    (allowed, allowed_headers), (other, other_headers), (plain, _) = exchange(router_tokenizer, (A,), [
        ("OPTIONS", "/v1/chat/completions", {"Origin": A, **PREFLIGHT}, None),  # before auth: no key sent
        ("OPTIONS", "/v1/chat/completions", {"Origin": B, **PREFLIGHT}, None),
        ("OPTIONS", "/v1/chat/completions", {"Origin": A, **AUTH}, None),  # not a preflight
    ])
    assert allowed == 204 and cors_headers(allowed_headers) == {
        "Access-Control-Allow-Origin": A, "Access-Control-Allow-Methods": "GET, POST",
        "Access-Control-Allow-Headers": "content-type, authorization", "Access-Control-Max-Age": "600",
        "Vary": "Origin"}
    assert other == 401 and cors_headers(other_headers) == {"Vary": "Origin"}
    assert plain == 405


def test_explicit_star_allows_any_origin_without_vary(router_tokenizer):
    for origins in (("*",), (A, "*")):
        got = exchange(router_tokenizer, origins, [
            ("GET", "/health", {"Origin": B}, None),
            ("GET", "/health", {}, None),
            ("OPTIONS", "/generate", {"Origin": B, **PREFLIGHT}, None),
        ])
        assert [status for status, _ in got] == [200, 200, 204]
        assert cors_headers(got[0][1]) == {"Access-Control-Allow-Origin": "*"}
        assert cors_headers(got[1][1]) == {}
        assert cors_headers(got[2][1])["Access-Control-Allow-Origin"] == "*"
