"""Operations against the real launcher: API keys (flag + file), X-Request-Id in headers and JSON
logs, hostile input (10k-token prompt, 5 MB body), --request-timeout freeing KV, and the shards'
private socket directory. One launcher for the module; the last test stops it."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import time

import pytest
import requests

from conftest import metric, start_launcher, stop_launcher, wait_idle
from test_launcher import children

FLAG_KEY = "it-flag-key"
FILE_KEY = "it-file-key"
STORY = "<|im_start|>user\nWrite a long story about a dragon and a knight.<|im_end|>\n<|im_start|>assistant\n"
REQUEST_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys"
    key_file.write_text(f"# test keys\n\n{FILE_KEY}\n")
    server = start_launcher("--api-key", FLAG_KEY, "--api-key-file", str(key_file), "--json-output",
                            "--request-timeout", str(REQUEST_TIMEOUT), "--disable-prefix-caching",
                            private_sockets=True)
    yield server
    stop_launcher(server)


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_api_keys_from_flag_and_file(ops):
    url = ops.url
    assert requests.get(f"{url}/health", timeout=30).status_code == 200
    assert requests.get(f"{url}/live", timeout=30).status_code == 200
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
    refused = requests.post(f"{url}/generate", json=body, timeout=30)
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
    assert refused.json() == {"error": "Unauthorized", "error_type": "authentication"}
    wrong = requests.get(f"{url}/v1/models", headers=auth("nope"), timeout=30)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    for key in (FLAG_KEY, FILE_KEY):
        assert requests.post(f"{url}/generate", json=body, headers=auth(key), timeout=60).status_code == 200
        assert requests.get(f"{url}/v1/models", headers=auth(key), timeout=30).status_code == 200
    assert requests.get(f"{url}/no-such-route", timeout=30).status_code == 401  # deny before 404


def test_authorization_header_bytes_that_are_not_utf8_are_a_401(ops):
    """requests cannot send such a header: a raw HTTP/1.1 exchange. The key check must refuse it
    (not raise: it was a 500 with a traceback), and the server serves the next request."""
    host, port = ops.url.removeprefix("http://").split(":")
    for token in (b"\xff\xfe\xc3", b"it-flag-key\x80", b"\xe2\x82"):
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token
                         + b"\r\nConnection: close\r\n\r\n")
            response = b""
            while chunk := sock.recv(65536):
                response += chunk
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401"), head
        assert json.loads(body)["error"]["code"] == "invalid_api_key"
    assert requests.get(f"{ops.url}/health", timeout=30).status_code == 200
    assert requests.get(f"{ops.url}/v1/models", headers=auth(FLAG_KEY), timeout=30).status_code == 200


def test_request_id_echoed_and_in_json_logs(ops):
    response = requests.post(f"{ops.url}/generate", headers={**auth(FLAG_KEY), "X-Request-Id": "it-req-42"},
                             json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}}, timeout=60)
    assert response.status_code == 200 and response.headers["X-Request-Id"] == "it-req-42"
    generated = requests.get(f"{ops.url}/ready", headers={"X-Request-Id": "no spaces allowed"}, timeout=30)
    assert re.fullmatch(r"[0-9a-f-]{36}", generated.headers["X-Request-Id"])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        records = [json.loads(line) for line in ops.log().splitlines() if line.startswith("{")]
        mine = [r for r in records if r.get("request_id") == "it-req-42"]
        if mine:
            break
        time.sleep(0.2)
    assert mine and mine[-1]["message"].startswith("POST /generate 200"), mine


def test_ten_thousand_token_prompt_is_422_at_once(ops):
    prompt = "The quick brown fox jumps over the lazy dog. " * 1000
    length = len(requests.post(f"{ops.url}/tokenize", json={"inputs": prompt}, headers=auth(FLAG_KEY),
                               timeout=60).json())
    assert length > 9_000
    prefills = metric(ops.url, 'tgi_batch_inference_count{method="prefill"}', absent=0)
    started = time.monotonic()
    response = requests.post(f"{ops.url}/generate", headers=auth(FLAG_KEY), timeout=60,
                             json={"inputs": prompt, "parameters": {"max_new_tokens": 10}})
    elapsed = time.monotonic() - started
    assert response.status_code == 422
    # Refused in validation: no step ran it. The bound is generous for a busy 2-core machine
    # and still under what prefilling 10k tokens costs there (tens of seconds).
    assert metric(ops.url, 'tgi_batch_inference_count{method="prefill"}', absent=0) == prefills
    assert elapsed < 10, elapsed
    assert response.json() == {
        "error": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 8192. "
                 f"Given: {length} `inputs` tokens and 10 `max_new_tokens`",
        "error_type": "validation"}


def test_five_megabyte_body_is_413(ops):
    body = json.dumps({"inputs": "a" * 5_000_000})
    response = requests.post(f"{ops.url}/generate", data=body, headers={**auth(FLAG_KEY),
                             "Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 413 and response.json()["error_type"] == "payload_too_large"


def test_request_timeout_cancels_and_frees_kv(ops):
    url, headers = ops.url, auth(FLAG_KEY)
    assert metric(url, "pytgi_kv_blocks_used") == 0  # prefix caching is off: nothing is kept
    started = time.monotonic()
    stream = requests.post(f"{url}/generate_stream", headers=headers, stream=True, timeout=60,
                           json={"inputs": STORY, "parameters": {"max_new_tokens": 2000}})
    events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith(b"data:")]
    stream_seconds = time.monotonic() - started
    assert events[-1] == {"error": f"Request exceeded the server's time limit of {REQUEST_TIMEOUT:g} s",
                          "error_type": "request_timeout"}
    # Cut at the limit, not run to its 2,000 tokens (a minute or more on 2 cores): the margin is generous
    # for a busy machine, whose steps can take a second.
    assert 2 < len(events) < 2000 and REQUEST_TIMEOUT <= stream_seconds < REQUEST_TIMEOUT + 10, stream_seconds

    started = time.monotonic()
    plain = requests.post(f"{url}/generate", headers=headers, timeout=60,
                          json={"inputs": STORY, "parameters": {"max_new_tokens": 2000}})
    assert plain.status_code == 408 and plain.json()["error_type"] == "request_timeout"
    assert REQUEST_TIMEOUT <= time.monotonic() - started < REQUEST_TIMEOUT + 10

    wait_idle(url)  # fails if the timed-out requests still hold KV blocks
    assert metric(url, "pytgi_kv_blocks_used") == 0
    print(f"\nrequest timeout {REQUEST_TIMEOUT:g} s: stream ended after {stream_seconds:.2f} s")


def test_shard_sockets_in_private_dir_removed_at_exit(ops):
    shards = [pid for pid in children(ops.process.pid) if b"serve" in open(f"/proc/{pid}/cmdline", "rb").read()]
    argv = open(f"/proc/{shards[0]}/cmdline", "rb").read().decode().split("\0")
    folder = os.path.dirname(argv[argv.index("--uds-path") + 1])
    info = os.stat(folder)
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    assert "shard-0" in os.listdir(folder) and stat.S_ISSOCK(os.stat(os.path.join(folder, "shard-0")).st_mode)
    assert stop_launcher(ops) == 0
    assert not os.path.exists(folder)
