"""`--speculate 4` through the launched server, against the session server (no speculation): the
same greedy tokens alone and in a mixed concurrent batch, the same seeded samples, a stop string
cut exactly where it is without speculation, exact usage counts, drafts accepted on an
input-grounded prompt, and every KV block returned."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import assert_kv_returned, metric, start_launcher, stop_launcher

TEXT = ("The printing press combined movable metal type, an oil-based ink and a screw press. Within fifty "
        "years printing shops had opened in more than two hundred European cities, and prices fell.")


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


GROUNDED = chat(f"Repeat the following text exactly, word for word:\n\n{TEXT}")
PROMPTS = [GROUNDED, chat("Name three animals."), chat(f"Summarize in one sentence: {TEXT}"),
           chat("Write a haiku about rain.")]


@pytest.fixture(scope="module")
def speculative():
    server = start_launcher("--speculate", "4")
    yield server.url
    stop_launcher(server)


def generate(url: str, prompt: str, **parameters) -> dict:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 48, "details": True, **parameters}}
    response = requests.post(f"{url}/generate", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def token_ids(response: dict) -> list[int]:
    return [token["id"] for token in response["details"]["tokens"]]


def test_info_reports_speculate(speculative):
    assert requests.get(f"{speculative}/info", timeout=10).status_code == 200
    assert metric(speculative, "tgi_request_skipped_tokens_count") == 0


def test_greedy_tokens_equal_without_speculation(url, speculative):
    expected = [token_ids(generate(url, p)) for p in PROMPTS]
    before = metric(speculative, "tgi_request_skipped_tokens_sum")
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # one batch mixing drafting and other rows
        assert list(pool.map(lambda p: token_ids(generate(speculative, p)), PROMPTS)) == expected
    assert [token_ids(generate(speculative, p)) for p in PROMPTS] == expected  # prefix-cache hits now
    assert metric(speculative, "tgi_request_skipped_tokens_sum") > before  # drafts were accepted
    assert_kv_returned(speculative)


def test_seeded_sampling_equal_without_speculation(url, speculative):
    parameters = {"do_sample": True, "temperature": 0.8, "seed": 7, "repetition_penalty": 1.1}
    assert token_ids(generate(speculative, GROUNDED, **parameters)) == token_ids(generate(url, GROUNDED, **parameters))


def test_stop_string_cuts_where_it_does_without_speculation(url, speculative):
    text = generate(url, GROUNDED)["generated_text"]
    words = text.split()
    assert len(words) > 6, text
    stop = f" {words[len(words) // 2]}"  # a word in the middle, likely inside an accepted run
    expected = generate(url, GROUNDED, stop=[stop])
    got = generate(speculative, GROUNDED, stop=[stop])
    assert got["details"]["finish_reason"] == "stop_sequence" == expected["details"]["finish_reason"]
    assert got["generated_text"] == expected["generated_text"] and token_ids(got) == token_ids(expected)
    assert_kv_returned(speculative)


def test_streamed_usage_is_exact(url, speculative):
    body = {"messages": [{"role": "user", "content": f"Repeat exactly: {TEXT}"}], "max_tokens": 40,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "logprobs": True}
    results = []
    for base in (url, speculative):
        chunks, usage, content = 0, None, ""
        with requests.post(f"{base}/v1/chat/completions", json=body, stream=True, timeout=300) as response:
            for line in response.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0].get("logprobs"):
                    chunks += len(chunk["choices"][0]["logprobs"]["content"])
                    content += chunk["choices"][0]["delta"].get("content") or ""
                usage = chunk.get("usage") or usage
        assert usage["completion_tokens"] == chunks  # one logprob entry per token, each token once
        results.append((content, usage))
    assert results[0] == results[1]
