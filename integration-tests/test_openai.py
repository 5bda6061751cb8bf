"""The OpenAI API with the official `openai` SDK (sync and async), huggingface_hub and
text-generation's `chat`, against the real launcher and the bundled SmolLM2."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest
import requests
from conftest import assert_kv_returned, metric, wait_idle
from conftest import start_launcher, stop_launcher
from huggingface_hub import InferenceClient
from openai import AsyncOpenAI, OpenAI

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Tell me a short story about a dragon."}]


@pytest.fixture(scope="module")
def client(url) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)


def chat(client, messages=QUESTION, **kwargs):
    kwargs.setdefault("max_tokens", 12)
    return client.chat.completions.create(model="smollm2", messages=messages, **kwargs)


# ------------------------------------------------------------------------------------ chat


def test_chat_non_stream_and_stream_agree(client):
    whole = chat(client, temperature=0)
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion" and whole.model == "smollm2"
    assert whole.system_fingerprint and whole.created > 0
    choice = whole.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 10
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(chat(client, temperature=0, stream=True))
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks][-1] == choice.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.usage is None for c in chunks)


def test_include_usage_chunk(client):
    chunks = list(chat(client, temperature=0, max_tokens=5, stream=True, stream_options={"include_usage": True}))
    *content, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 5
    assert last.usage.total_tokens == last.usage.prompt_tokens + 5
    assert all(c.usage is None and len(c.choices) == 1 for c in content)
    assert content[-1].choices[0].finish_reason == "length"


def test_n_choices(client):
    response = chat(client, n=2, seed=7, temperature=1.0, max_tokens=6)
    assert [c.index for c in response.choices] == [0, 1]
    assert response.usage.completion_tokens <= 12 and response.usage.prompt_tokens > 10  # the prompt counts once
    chunks = list(chat(client, n=2, seed=7, temperature=1.0, max_tokens=6, stream=True))
    texts = {0: "", 1: ""}
    finished = set()
    for c in chunks:
        texts[c.choices[0].index] += c.choices[0].delta.content or ""
        if c.choices[0].finish_reason:
            finished.add(c.choices[0].index)
    assert finished == {0, 1}
    assert [texts[0], texts[1]] == [c.message.content for c in response.choices]  # same seeds, same samples


def test_logprobs(client):
    response = chat(client, temperature=0, logprobs=True, top_logprobs=3, max_tokens=6)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert all(t.logprob <= 0 for t in entry.top_logprobs)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the most likely token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    text = bytes(b for entry in content for b in entry.bytes).decode("utf-8", errors="replace")
    assert text.startswith(response.choices[0].message.content)  # EOS (if any) adds its own text after
    streamed = [c for c in chat(client, temperature=0, logprobs=True, max_tokens=6, stream=True) if c.choices[0].logprobs]
    assert [c.choices[0].logprobs.content[0].token for c in streamed] == [e.token for e in content]


def test_stop_is_stripped_from_content(client):
    full = chat(client, STORY, temperature=0, max_tokens=24).choices[0].message.content
    words = full.split()
    stop = words[len(words) // 2]
    response = chat(client, STORY, temperature=0, max_tokens=24, stop=[stop, "zzzz"])
    assert response.choices[0].message.content == full[:full.index(stop)]
    assert response.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, STORY, temperature=0, max_tokens=24,
                                                                       stop=stop, stream=True))
    assert streamed == full[:full.index(stop)]


def test_seed_reproducible(client):
    kwargs = dict(temperature=1.0, seed=1234, max_tokens=12)
    first, second = chat(client, STORY, **kwargs), chat(client, STORY, **kwargs)
    assert first.choices[0].message.content == second.choices[0].message.content


def test_temperature_zero_equals_greedy_generate_and_logit_bias(client, url):
    templated = requests.post(f"{url}/chat_tokenize", json={"messages": QUESTION}, timeout=10).json()
    prompt = templated["templated_text"]
    assert prompt.endswith("<|im_start|>assistant\n") and templated["tokenize_response"][0]["text"] == "<|im_start|>"
    tgi = requests.post(f"{url}/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 10, "details": True}},
                        timeout=60).json()
    response = chat(client, temperature=0, max_tokens=10)
    assert response.choices[0].message.content == tgi["generated_text"]
    first = tgi["details"]["tokens"][0]
    banned = chat(client, temperature=0, max_tokens=1, logit_bias={str(first["id"]): -100}, logprobs=True)
    assert banned.choices[0].logprobs.content[0].token != first["text"]


def test_max_tokens_gives_length(client):
    response = chat(client, STORY, temperature=0, max_completion_tokens=3)
    assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 3


def test_content_parts_and_continue_final_message(client):
    parts = [{"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]},
             {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    assert chat(client, parts, temperature=0).choices[0].message.content
    prefix = [*QUESTION, {"role": "assistant", "content": "The capital of France is"}]
    continued = chat(client, prefix, temperature=0, max_tokens=4).choices[0].message.content
    assert "Paris" in continued and not continued.startswith("The capital")


def test_sdk_errors_carry_our_messages(client):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, top_p=1.5)
    assert info.value.status_code == 400 and info.value.param == "top_p"
    assert "Invalid value for 'top_p'" in info.value.message and info.value.code == "invalid_value"
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, max_tokens=100_000)
    assert info.value.code == "context_length_exceeded" and info.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    assert "only 'text' parts are supported" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, top_logprobs=2)
    assert info.value.param == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="m", prompt="def f():", suffix="return 1")
    assert info.value.param == "suffix"


def test_error_envelopes_for_routes_and_bodies(url):
    def envelope(response, status):
        assert response.status_code == status, response.text
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
        return body["error"]

    assert envelope(requests.get(f"{url}/v1/nope", timeout=10), 404)["message"] == "Invalid URL (GET /v1/nope)."
    assert envelope(requests.get(f"{url}/v1/chat/completions", timeout=10), 405)["type"] == "invalid_request_error"
    broken = envelope(requests.post(f"{url}/v1/chat/completions", data="{oops",
                                    headers={"Content-Type": "application/json"}, timeout=10), 400)
    assert broken["message"].startswith("We could not parse the JSON body") and broken["code"] == "invalid_json"
    wrong = envelope(requests.post(f"{url}/v1/chat/completions", files={"f": ("a", b"x")}, timeout=10), 415)
    assert "Content-Type" in wrong["message"]
    assert envelope(requests.post(f"{url}/v1/completions", json=[1], timeout=10), 400)["message"] == \
        "The request body must be a JSON object."
    huge = requests.post(f"{url}/v1/completions", json={"prompt": "a" * 3_000_000}, timeout=30)
    assert envelope(huge, 413)["type"] == "invalid_request_error"
    # Native routes keep TGI's shape.
    assert requests.post(f"{url}/generate", data="{oops", timeout=10).json()["error_type"] == "validation"


def test_tool_choice_none_and_text_format_need_no_constraint(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    assert chat(client, tools=tools, tool_choice="none", response_format={"type": "text"},
                parallel_tool_calls=False, user="u1", temperature=0).choices[0].message.content


def test_async_client_concurrent(url):
    async def run():
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
        whole = client.chat.completions.create(model="m", messages=QUESTION, temperature=0, max_tokens=8)

        async def streamed():
            stream = await client.chat.completions.create(model="m", messages=QUESTION, temperature=0, max_tokens=8,
                                                          stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream])

        completion = client.completions.create(model="m", prompt="The capital of France is", max_tokens=4,
                                               temperature=0)
        results = await asyncio.gather(whole, streamed(), completion)
        await client.close()
        return results

    whole, streamed, completion = asyncio.run(run())
    assert whole.choices[0].message.content == streamed and completion.choices[0].text


# ----------------------------------------------------------------------------- completions


def test_completions_prompts_and_choices(client):
    single = client.completions.create(model="m", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert single.id.startswith("cmpl-") and single.object == "text_completion" and single.choices[0].text
    assert single.usage.completion_tokens == 5 and single.choices[0].finish_reason == "length"
    both = client.completions.create(model="m", prompt=["The capital of France is", "1, 2, 3,"], n=2, max_tokens=5,
                                     temperature=0)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]  # prompt-major
    texts = [c.text for c in both.choices]
    assert texts[0] == texts[1] == single.choices[0].text and texts[2] == texts[3] != texts[0]
    ids = client.completions.create(model="m", prompt=[[504, 3575, 282, 4649, 314]], max_tokens=3, temperature=0)
    assert ids.choices[0].text and ids.usage.prompt_tokens == 5


def test_completions_echo_logprobs(client):
    response = client.completions.create(model="m", prompt="The capital of France is", max_tokens=3, temperature=0,
                                         echo=True, logprobs=2)
    choice = response.choices[0]
    assert choice.text.startswith("The capital of France is")
    lp = choice.logprobs
    prompt_tokens = response.usage.prompt_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == prompt_tokens + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert all(len(top) <= 3 and lp.tokens[i] in top for i, top in enumerate(lp.top_logprobs) if top)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[prompt_tokens] == len("The capital of France is")
    assert "".join(lp.tokens) == choice.text
    scored = client.completions.create(model="m", prompt="The capital of France is Paris", max_tokens=0, echo=True,
                                       logprobs=0)
    assert scored.choices[0].text == "The capital of France is Paris" and scored.usage.completion_tokens == 0
    assert len(scored.choices[0].logprobs.tokens) == scored.usage.prompt_tokens


def test_completions_stream(client):
    whole = client.completions.create(model="m", prompt=["Once upon a time", "1, 2, 3,"], max_tokens=6, temperature=0)
    chunks = list(client.completions.create(model="m", prompt=["Once upon a time", "1, 2, 3,"], max_tokens=6,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    texts = {0: "", 1: ""}
    for c in chunks[:-1]:
        texts[c.choices[0].index] += c.choices[0].text
    assert [texts[0], texts[1]] == [c.text for c in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_models(client, url):
    models = client.models.list()
    assert len(models.data) == 1 and models.data[0].object == "model" and models.data[0].owned_by == "pytgi"
    info = requests.get(f"{url}/info", timeout=10).json()
    assert models.data[0].id == info["model_id"]
    assert client.models.retrieve(info["model_id"]).id == info["model_id"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_invocations_dispatches_openai_bodies(url):
    chat_body = requests.post(f"{url}/invocations", json={"messages": QUESTION, "max_tokens": 3}, timeout=60).json()
    assert chat_body["object"] == "chat.completion"
    completion = requests.post(f"{url}/invocations", json={"prompt": "Hi", "max_tokens": 3}, timeout=60).json()
    assert completion["object"] == "text_completion"
    error = requests.post(f"{url}/invocations", json={"messages": [], "max_tokens": 3}, timeout=60)
    assert error.status_code == 400 and error.json()["error"]["param"] == "messages"
    generate = requests.post(f"{url}/invocations", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}, timeout=60)
    assert isinstance(generate.json(), list)


def test_disconnect_cancels_every_choice(url):
    async def leave_early(session, i):
        body = {"model": "m", "messages": [{"role": "user", "content": f"Story {i}"}], "max_tokens": 300, "n": 2,
                "stream": True}
        async with session.post(f"{url}/v1/chat/completions", json=body) as response:
            seen = 0
            async for line in response.content:
                if line.startswith(b"data:"):
                    seen += 1
                    if seen == 4:  # both role chunks and a token or two
                        return

    async def run():
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(leave_early(session, i) for i in range(4)))

    wait_idle(url)
    before = metric(url, 'tgi_request_failure{err="dropped"}', absent=0)
    asyncio.run(run())
    assert_kv_returned(url)
    assert metric(url, 'tgi_request_failure{err="dropped"}') - before == 4 * 2  # every choice of every request


# ------------------------------------------------------------------------------ TGI clients


def test_huggingface_hub_chat_completion(url):
    client = InferenceClient(url)
    whole = client.chat_completion(QUESTION, max_tokens=8, temperature=0)
    assert "Paris" in whole.choices[0].message.content and whole.choices[0].finish_reason in ("stop", "length")
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat_completion(QUESTION, max_tokens=8, temperature=0, stream=True))
    assert streamed == whole.choices[0].message.content


def test_text_generation_client_chat(url):
    from text_generation import Client
    from text_generation.types import Message

    client = Client(url)
    whole = client.chat([Message(role="user", content="What is the capital of France?")], max_tokens=8, temperature=0)
    assert "Paris" in whole.choices[0].message.content
    chunks = []
    # text-generation 0.7.0 json-decodes every `data:` line, `[DONE]` included (TGI sends it too):
    # the stream must end there, after the chunk that carries the finish reason, and nowhere else.
    with pytest.raises(json.JSONDecodeError) as ended:
        for chunk in client.chat([Message(role="user", content="What is the capital of France?")], max_tokens=8,
                                 temperature=0, stream=True):
            chunks.append(chunk)
    assert ended.value.doc.strip() == "[DONE]", ended.value.doc
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


# ----------------------------------------------------------------------- strict server


@pytest.fixture(scope="module")
def strict():
    server = start_launcher("--strict-model-name", "--api-key", "secret", "--max-concurrent-requests", "1")
    yield server
    stop_launcher(server)


def test_strict_model_auth_and_overload(strict):
    served = requests.get(f"{strict.url}/info", timeout=10).json()["model_id"]
    client = OpenAI(base_url=f"{strict.url}/v1", api_key="secret", max_retries=0)
    ok = client.chat.completions.create(model=served, messages=QUESTION, max_tokens=2)
    assert ok.model == served
    assert client.chat.completions.create(model="tgi", messages=QUESTION, max_tokens=2).model == "tgi"
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=2)
    assert info.value.code == "model_not_found" and info.value.param == "model"
    with pytest.raises(openai.AuthenticationError) as info:
        OpenAI(base_url=f"{strict.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert info.value.code == "invalid_api_key"

    async def overload():
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer secret"}) as session:
            body = {"model": served, "messages": STORY, "max_tokens": 200, "stream": True}
            async with session.post(f"{strict.url}/v1/chat/completions", json=body) as holding:
                await holding.content.readline()  # the stream is open: its permit is taken
                async with session.post(f"{strict.url}/v1/completions", json={"prompt": "x"}) as refused:
                    return refused.status, refused.headers.get("Retry-After"), await refused.json()

    status, retry_after, body = asyncio.run(overload())
    assert status == 429 and retry_after == "1" and body["error"]["type"] == "rate_limit_error"
