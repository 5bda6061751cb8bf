"""API keys: the key file, constant-time matching, and a matrix over every registered route."""

from __future__ import annotations

import asyncio
import re

import pytest
from aiohttp.test_utils import TestClient, TestServer

from router.app import create_app
from router.http import auth, docs, playground
from router.http.auth import ApiKeys, read_key_file
from tests.router.app_harness import FakeState, GatedInfer, router_config

FLAG_KEY = "flag-key-0123"
FILE_KEYS = ("file-key-a", "file-key-b")
# Written out here, not read from router.app: adding a public path must be a visible decision.
PUBLIC = {"/health", "/ping", "/info", "/metrics", "/live", "/ready", "/api-doc/openapi.json", "/docs", "/docs/",
          *(f"/docs/{name}" for name in docs.ASSETS), *(f"/playground/{name}" for name in playground.ASSETS)}
# Public to read only: GET / is the playground's page, POST / TGI's compat route (a generation).
PUBLIC_READS = {"/"}


def is_public(method: str, path: str) -> bool:
    return path in PUBLIC or (path in PUBLIC_READS and method in ("GET", "HEAD"))


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# rotated 2026-11\n\n  {FILE_KEYS[0]}  \n#{FLAG_KEY}\n{FILE_KEYS[1]}\n")
    return path


def test_key_file_skips_blank_and_comment_lines(key_file):
    assert read_key_file(key_file) == FILE_KEYS


@pytest.mark.parametrize("text", ["", "\n  \n# only a comment\n"])
def test_key_file_without_keys_is_an_error(tmp_path, text):
    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(ValueError, match="lists no key"):
        read_key_file(path)
    with pytest.raises(ValueError, match="cannot read"):
        read_key_file(tmp_path / "missing")


def test_accepts_any_listed_key_and_nothing_else(key_file):
    keys = ApiKeys.load(FLAG_KEY, str(key_file))
    assert len(keys) == 3
    for key in (FLAG_KEY, *FILE_KEYS):
        assert keys.accepts(f"Bearer {key}") and keys.accepts(f"bearer {key}")
    for header in (None, "", FLAG_KEY, f"Basic {FLAG_KEY}", f"Bearer {FLAG_KEY}x", f"Bearer {FLAG_KEY[:-1]}",
                   f"Bearer #{FLAG_KEY}", "Bearer # rotated 2026-11", "Bearer "):
        assert not keys.accepts(header), header
    assert ApiKeys.load(None, None) is None


def test_every_key_is_compared_whichever_matches(key_file, monkeypatch):
    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append(len(a) == len(b)) or real(a, b))
    keys = ApiKeys.load(FLAG_KEY, str(key_file))
    for header in (f"Bearer {FLAG_KEY}", f"Bearer {FILE_KEYS[1]}", "Bearer wrong", "Bearer " + "x" * 5000):
        calls.clear()
        keys.accepts(header)
        assert calls == [True, True, True]  # all three keys, always on equal-length digests


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "x", path)


def test_api_key_matrix_over_every_route(router_tokenizer, key_file):
    cases = {"none": {}, "wrong": {"Authorization": "Bearer nope"},
             "flag": {"Authorization": f"Bearer {FLAG_KEY}"}, "file": {"Authorization": f"Bearer {FILE_KEYS[1]}"}}

    async def main():
        config = router_config(api_key=FLAG_KEY, api_key_file=str(key_file))
        app = create_app(config, FakeState(config, router_tokenizer, GatedInfer(router_tokenizer)))
        targets = {(route.method, concrete(route.resource.canonical)) for route in app.router.routes()}
        targets |= {("GET", path) for path in PUBLIC}  # the concrete files behind .../{asset}
        targets |= {("GET", "/no-such-route"), ("POST", "/v1/no-such-route")}
        assert ("POST", "/generate") in targets and ("GET", "/v1/models/x") in targets
        results = {}
        async with TestClient(TestServer(app)) as client:
            for method, path in sorted(targets):
                for case, headers in cases.items():
                    response = await client.request(method, path, headers=headers, json=None)
                    body = await response.read()
                    results[method, path, case] = (response.status, response.headers.get("WWW-Authenticate"),
                                                   body)
        return results

    results = asyncio.run(main())
    checked_protected = 0
    for (method, path, case), (status, challenge, body) in results.items():
        where = f"{method} {path} with {case} key: {status} {body[:200]!r}"
        if is_public(method, path):
            assert status != 401, where
            continue
        if case in ("none", "wrong"):
            checked_protected += 1
            assert status == 401 and challenge == "Bearer", where
            if method != "HEAD":
                if path.startswith("/v1/"):
                    assert re.fullmatch(rb'\{"error": \{"message": "Incorrect API key provided.", '
                                        rb'"type": "authentication_error", "param": null, '
                                        rb'"code": "invalid_api_key"\}\}', body), where
                else:
                    assert body == b'{"error": "Unauthorized", "error_type": "authentication"}', where
        else:
            assert status != 401, where
            if "no-such-route" in path:
                assert status == 404, where
    assert checked_protected >= 2 * 12  # the route table did not shrink to the public paths


def test_router_refuses_to_start_with_an_unusable_key_file(tmp_path):
    from click.testing import CliRunner

    from router import cli

    empty = tmp_path / "keys"
    empty.write_text("# nothing yet\n")
    for path in (empty, tmp_path / "missing"):
        result = CliRunner().invoke(cli.main, ["--api-key-file", str(path)])
        assert result.exit_code == 1 and "error: " in result.output and str(path) in result.output, result.output
