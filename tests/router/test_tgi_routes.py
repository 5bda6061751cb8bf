"""TGI routes in-process: requests that used to get aiohttp's plain-text 500 / 404 / 405 (found
while building the schemathesis fuzz test) now get a 4xx in TGI's envelope."""

from __future__ import annotations

import pytest

from tests.router.openai.test_routes import run

LONE_SURROGATE = b'"a\\ud800b"'  # valid JSON, but no tokenizer input: Python keeps the lone surrogate


def post(router_tokenizer, path: str, data: bytes, content_type: str = "application/json"):
    async def scenario(client, infer):
        response = await client.post(path, data=data, headers={"Content-Type": content_type})
        return response.status, await response.json()

    return run(router_tokenizer, [[("token", "x")]], scenario)


def test_a_body_that_is_not_utf8_is_a_400_syntax_error(router_tokenizer):
    status, body = post(router_tokenizer, "/generate", b'{"inputs": "\xff"}')
    assert status == 400
    assert body["error_type"] == "validation" and body["error"].startswith(
        "Failed to parse the request body as JSON"
    )


@pytest.mark.parametrize("charset", ["latin-1", "no-such-codec"])
def test_the_declared_charset_is_ignored_like_serde_does(router_tokenizer, charset):
    status, body = post(
        router_tokenizer, "/tokenize", '{"inputs": "Hé"}'.encode(), f"application/json; charset={charset}"
    )
    assert status == 200 and "".join(token["text"] for token in body) == "Hé"


@pytest.mark.parametrize(
    "path, data",
    [
        ("/tokenize", b'{"inputs": ' + LONE_SURROGATE + b"}"),
        ("/chat_tokenize", b'{"messages": [{"role": "user", "content": ' + LONE_SURROGATE + b"}]}"),
    ],
)
def test_untokenizable_text_is_a_422_not_a_500(router_tokenizer, path, data):
    status, body = post(router_tokenizer, path, data)
    assert status == 422
    assert body == {"error": body["error"], "error_type": "validation"}
    assert body["error"].startswith("Input validation error: tokenizer error")


def test_aiohttp_s_own_404_and_405_answer_in_tgi_s_envelope(router_tokenizer):
    async def scenario(client, infer):
        wrong_method = await client.request("TRACE", "/generate")
        unknown = await client.get("/no-such-route")
        return (
            wrong_method.status,
            wrong_method.headers.get("Allow"),
            await wrong_method.json(),
            unknown.status,
            await unknown.json(),
        )

    status, allow, body, unknown_status, unknown_body = run(router_tokenizer, [[("token", "x")]], scenario)
    assert (status, allow) == (405, "POST")
    assert body == {"error": "Method TRACE is not allowed for /generate.", "error_type": "method_not_allowed"}
    assert unknown_status == 404
    assert unknown_body == {"error": "Invalid URL (GET /no-such-route).", "error_type": "not_found"}
