"""Raw HTTP: routes, error bodies, concurrency and cancellation on the real launcher."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import requests
from conftest import assert_kv_returned, metric, wait_idle

PROMPT = "<|im_start|>user\nTell me a story about a dragon.<|im_end|>\n<|im_start|>assistant\n"


def test_info_health_ping(url):
    info = requests.get(f"{url}/info", timeout=10).json()
    assert info["router"] == "text-generation-router" and info["max_total_tokens"] > info["max_input_tokens"]
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    assert requests.get(f"{url}/ping", timeout=10).status_code == 200


def test_default_launch_runs_the_default_attention_backend(server):
    """The default backend is the paged kernel of the device: on CPU the compiled one, which falls
    back to torch SDPA only where no C++ compiler can build it (`make test` installs one). /info
    reports the backend the model holds; the shard's log line says it was selected at load."""
    info = requests.get(f"{server.url}/info", timeout=10).json()
    default = {"cpu": "cpu-paged", "cuda": "flash-attn"}[info["model_device_type"]]
    assert info["attention_impl"] == default, f"{info['attention_impl']}, not {default}: " + "".join(
        line for line in server.log().splitlines(keepends=True) if "attention" in line or "kernel" in line)
    assert re.search(rf"^\[shard-0\] .* attention: {re.escape(default)} \(", server.log(), re.M), server.log()[-3000:]


def test_compat_route_and_invocations(url):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4}}
    listed = requests.post(f"{url}/", json=body, timeout=60).json()
    assert isinstance(listed, list) and listed[0]["generated_text"]
    invoked = requests.post(f"{url}/invocations", json=body, timeout=60).json()
    assert invoked == listed  # greedy
    streamed = requests.post(f"{url}/", json={**body, "stream": True}, timeout=60, stream=True)
    events = [json.loads(line[5:]) for line in streamed.iter_lines() if line.startswith(b"data:")]
    assert events[-1]["generated_text"] == listed[0]["generated_text"]


def test_timing_headers(url):
    response = requests.post(f"{url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}}, timeout=60)
    for header in ("x-compute-type", "x-compute-time", "x-total-time", "x-validation-time", "x-queue-time",
                   "x-inference-time", "x-time-per-token", "x-prompt-tokens", "x-generated-tokens"):
        assert header in response.headers
    assert response.headers["x-generated-tokens"] == "3"


def test_tokenize(url):
    tokens = requests.post(f"{url}/tokenize", json={"inputs": "Hello world"}, timeout=10).json()
    assert [t["text"] for t in tokens] == ["Hello", " world"]
    assert tokens[1]["start"] == 5 and tokens[1]["stop"] == 11


def test_exact_tgi_validation_messages(url):
    cases = [
        ({"inputs": "", "parameters": {}}, "Input validation error: `inputs` cannot be empty"),
        ({"inputs": "a", "parameters": {"temperature": -1}}, "Input validation error: `temperature` must be strictly positive"),
        ({"inputs": "a", "parameters": {"top_p": 1.5}}, "Input validation error: `top_p` must be > 0.0 and < 1.0"),
        ({"inputs": "a", "parameters": {"top_k": 0}}, "Input validation error: `top_k` must be strictly positive"),
        ({"inputs": "a", "parameters": {"stop": ["a", "b", "c", "d", "e"]}},
         "Input validation error: `stop` supports up to 4 stop sequences. Given: 5"),
        ({"inputs": "a", "parameters": {"top_n_tokens": 6}}, "Input validation error: `top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    ]
    for body, message in cases:
        response = requests.post(f"{url}/generate", json=body, timeout=10)
        assert response.status_code == 422, body
        assert response.json() == {"error": message, "error_type": "validation"}
    info = requests.get(f"{url}/info", timeout=10).json()
    too_long = requests.post(f"{url}/generate", json={"inputs": "a", "parameters": {"max_new_tokens": info["max_total_tokens"]}},
                             timeout=10)
    assert too_long.status_code == 422
    assert too_long.json()["error"] == (f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= "
                                        f"{info['max_total_tokens']}. Given: 1 `inputs` tokens and "
                                        f"{info['max_total_tokens']} `max_new_tokens`")


def test_bad_json_and_payload_errors(url):
    broken = requests.post(f"{url}/generate", data="{not json", headers={"Content-Type": "application/json"}, timeout=10)
    assert broken.status_code == 400 and broken.json()["error_type"] == "validation"
    missing = requests.post(f"{url}/generate", json={"parameters": {}}, timeout=10)
    assert missing.status_code == 422 and "missing field `inputs`" in missing.json()["error"]
    huge = requests.post(f"{url}/generate", json={"inputs": "a" * 3_000_000}, timeout=30)
    assert huge.status_code == 413 and "error" in huge.json()


async def _generate(session, url, prompt, max_new_tokens=24):
    async with session.post(f"{url}/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens}}) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["generated_text"]


def test_sixteen_concurrent_greedy_requests_equal_sequential(url):
    prompts = [f"<|im_start|>user\nGive me fact number {i} about space.<|im_end|>\n<|im_start|>assistant\n" for i in range(16)]

    async def run():
        async with aiohttp.ClientSession() as session:
            alone = [await _generate(session, url, p) for p in prompts]
            together = await asyncio.gather(*(_generate(session, url, p) for p in prompts))
            return alone, together

    alone, together = asyncio.run(run())
    assert together == alone


def test_disconnecting_clients_leave_no_blocks(url):
    clients = 20
    dropped = 'tgi_request_failure{err="dropped"}'

    async def disconnect_mid_stream(session, i):
        body = {"inputs": f"{PROMPT} {i}", "parameters": {"max_new_tokens": 200}}
        async with session.post(f"{url}/generate_stream", json=body) as response:
            async for line in response.content:
                if line.startswith(b"data:"):
                    return  # leave after the first token: the connection closes

    async def run():
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(disconnect_mid_stream(session, i) for i in range(clients)))

    wait_idle(url)
    before = metric(url, dropped, absent=0)
    asyncio.run(run())
    assert_kv_returned(url)
    # A counter of the whole session: only this test's clients may have moved it.
    assert metric(url, dropped) - before == clients


def test_best_of_and_return_full_text(url):
    body = {"inputs": "The sky is", "parameters": {
        "max_new_tokens": 5, "best_of": 2, "do_sample": True, "details": True, "return_full_text": True}}
    response = requests.post(f"{url}/generate", json=body, timeout=60).json()
    assert response["generated_text"].startswith("The sky is")
    others = response["details"]["best_of_sequences"]
    assert len(others) == 1 and others[0]["generated_text"].startswith("The sky is")
    refused = requests.post(f"{url}/generate", json={"inputs": "a", "parameters": {"best_of": 2}}, timeout=10)
    assert refused.status_code == 422
    assert refused.json()["error"] == "Input validation error: you must use sampling when `best_of` is > 1"


def test_truncate_keeps_the_last_tokens(url):
    body = {"inputs": "one two three four five six", "parameters": {"max_new_tokens": 1, "truncate": 2,
                                                                   "decoder_input_details": True}}
    details = requests.post(f"{url}/generate", json=body, timeout=60).json()["details"]
    assert [t["text"] for t in details["prefill"]] == [" five", " six"]
