"""The OpenAI routes in-process, over a scripted `Infer.stream`: stream errors, cancellation of
every choice, admission before validation, and the error envelopes of the middleware."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from aiohttp.test_utils import TestClient, TestServer

from router.adapters import Adapters
from router.app import create_app
from router.config import RouterConfig
from router.errors import GenerationError
from router.events import ErrorEvent, Finish, TokenEvent, TokenInfo
from router.infer import Infer
from router.limits import Limits
from router.metrics import Metrics
from router.validation import Validator

MESSAGES = [{"role": "user", "content": "hi"}]


def config(**overrides) -> RouterConfig:
    values = dict(
        master_shard_uds_path="/nonexistent", hostname="127.0.0.1", port=0, model_id="served/model", revision=None,
        max_concurrent_requests=8, max_best_of=2, max_stop_sequences=4, max_top_n_tokens=5, max_input_tokens=None,
        max_total_tokens=None, waiting_served_ratio=1.2, max_batch_prefill_tokens=None, max_batch_total_tokens=None,
        max_waiting_tokens=20, max_batch_size=None, validation_workers=1, api_key=None, cors_allow_origin=(),
        json_output=False, otlp_endpoint=None, otlp_service_name="x", payload_limit=100_000, max_client_batch_size=4,
        disable_grammar_support=False, tokenizer_config_path=None, prefix_caching=True,
    )
    values.update(overrides)
    return RouterConfig(**values)


class ScriptedInfer(Infer):
    """`stream` plays a script per call: a list of ("token", text) / ("error", message) /
    ("hang", None) steps, or "hang" (never starts). Records which streams were closed before their end."""

    def __init__(self, tokenizer, scripts, permits=8, adapters: tuple[str, ...] = ()):
        validator = Validator(tokenizer, Limits(max_best_of=2, max_stop_sequences=4, max_top_n_tokens=5,
                                                          max_input_tokens=1000, max_total_tokens=2048),
                              adapters=Adapters("served/model", adapters))
        super().__init__(validator, tokenizer, queue=None, metrics=Metrics(1000, 2048), max_concurrent_requests=permits)
        self.scripts = list(scripts)
        self.cancelled: list[int] = []
        self.started = 0
        self.adapter_ids: list[str] = []  # each stream's ValidRequest.adapter_id

    async def stream(self, valid):
        number = self.started
        self.started += 1
        self.adapter_ids.append(valid.adapter_id)
        script = self.scripts[number % len(self.scripts)]
        finished = False
        try:
            if script == "hang":
                await asyncio.Event().wait()
            for i, (kind, value) in enumerate(script, start=1):
                await asyncio.sleep(0)
                if kind == "hang":
                    await asyncio.Event().wait()
                if kind == "error":
                    finished = True
                    yield ErrorEvent(GenerationError(value))
                    return
                last = i == len(script)
                finish = None
                if last:
                    finished = True
                    finish = Finish("".join(v for _, v in script), "eos_token", len(script), None, (), valid.input_length,
                                    0.0, 0.0, 0.0)
                yield TokenEvent(i, TokenInfo(100 + i, value, -0.5, False), (), finish, value)
        finally:
            if not finished:
                self.cancelled.append(number)


class State:
    def __init__(self, cfg, tokenizer, infer):
        self.config, self.tokenizer, self.infer, self.metrics = cfg, tokenizer, infer, infer.metrics
        self.limits = Limits(max_input_tokens=1000, max_total_tokens=2048, max_batch_prefill_tokens=512,
                             max_batch_total_tokens=4096, num_blocks=256, block_size=16,
                             vocab_size=tokenizer.vocab_size)

    def start(self):
        pass

    async def stop(self):
        pass


def run(router_tokenizer, scripts, scenario, permits=8, adapters=(), **overrides):
    async def main():
        cfg = config(max_concurrent_requests=permits, **overrides)
        infer = ScriptedInfer(router_tokenizer, scripts, permits, adapters)
        client = TestClient(TestServer(create_app(cfg, State(cfg, router_tokenizer, infer))))
        try:
            await client.start_server()
            return await scenario(client, infer)
        finally:
            await client.close()

    return asyncio.run(main())


def sse(text: str) -> list:
    return [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]


def test_error_mid_stream_is_one_error_event_then_done(router_tokenizer):
    async def scenario(client, infer):
        response = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "stream": True,
                                                                   "stream_options": {"include_usage": True}})
        assert response.status == 200
        return sse(await response.text())

    events = run(router_tokenizer, [[("token", "a"), ("error", "shard died")]], scenario)
    role, token, error, done = events
    assert json.loads(role)["choices"][0]["delta"]["role"] == "assistant"
    assert json.loads(token)["choices"][0]["delta"]["content"] == "a"
    assert json.loads(error) == {"error": {"message": "Request failed during generation: shard died",
                                           "type": "server_error", "param": None, "code": "generation"}}
    assert done == "[DONE]"  # no usage chunk after an error


def test_one_failed_choice_cancels_the_others(router_tokenizer):
    async def scenario(client, infer):
        body = {"messages": MESSAGES, "n": 3}
        response = await client.post("/v1/chat/completions", json=body)
        return response.status, await response.json(), infer

    # Choice 0 leads (the others start once it has a token and its prompt KV is shared).
    status, body, infer = run(router_tokenizer, [[("token", "x"), ("hang", None)], [("error", "boom")], "hang"],
                              scenario)
    assert status == 500 and body["error"]["code"] == "generation"
    assert sorted(infer.cancelled) == [0, 2] and infer.permits == 8  # every permit back


def test_client_disconnect_cancels_every_choice(router_tokenizer):
    async def scenario(client, infer):
        response = await client.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2, "stream": True})
        await response.content.readline()
        response.close()
        for _ in range(100):
            if sorted(infer.cancelled) == [0, 1, 2, 3] and infer.permits == 8:
                break
            await asyncio.sleep(0.01)
        return infer

    infer = run(router_tokenizer, [[("token", "x"), ("hang", None)]], scenario)
    assert sorted(infer.cancelled) == [0, 1, 2, 3] and infer.permits == 8


def test_admission_before_validation_and_retry_after(router_tokenizer):
    async def scenario(client, infer):
        infer.permits = 0
        response = await client.post("/v1/chat/completions", json={"messages": []})  # invalid, but 429 first
        return response.status, response.headers.get("Retry-After"), await response.json()

    status, retry_after, body = run(router_tokenizer, [[("token", "x")]], scenario)
    assert status == 429 and retry_after == "1"
    assert body["error"] == {"message": "Model is overloaded", "type": "rate_limit_error", "param": None,
                             "code": "overloaded"}


def test_too_many_generations_for_the_permits(router_tokenizer):
    async def scenario(client, infer):
        response = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "n": 3})
        return response.status, await response.json(), infer.permits

    status, body, permits = run(router_tokenizer, [[("token", "x")]], scenario, permits=2)
    assert status == 400 and body["error"]["param"] == "n" and "--max-concurrent-requests" in body["error"]["message"]
    assert permits == 2


def test_unexpected_exceptions_get_the_envelope(router_tokenizer, monkeypatch):
    from router.openai import requests as openai_requests

    def broken(*args, **kwargs):
        raise KeyError("bug")

    monkeypatch.setattr("router.openai.routes.parse_chat_request", broken)
    assert openai_requests.parse_chat_request is not broken

    async def scenario(client, infer):
        response = await client.post("/v1/chat/completions", json={"messages": MESSAGES})
        return response.status, await response.json(), infer.permits

    status, body, permits = run(router_tokenizer, [[("token", "x")]], scenario)
    assert status == 500 and body["error"]["type"] == "server_error" and permits == 8


@pytest.mark.parametrize("model,status", [("served/model", 200), ("tgi", 200), (None, 200), ("other", 404)])
def test_strict_model_name(router_tokenizer, model, status):
    async def scenario(client, infer):
        body = {"messages": MESSAGES} if model is None else {"model": model, "messages": MESSAGES}
        response = await client.post("/v1/chat/completions", json=body)
        return response.status, await response.json()

    got, body = run(router_tokenizer, [[("token", "x")]], scenario, strict_model_name=True)
    assert got == status
    if status == 200:
        assert body["model"] == (model or "served/model")
    else:
        assert body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"


def test_api_key_envelope_only_on_openai_paths(router_tokenizer):
    async def scenario(client, infer):
        openai = await client.get("/v1/models")
        tgi = await client.post("/generate", json={"inputs": "x"})
        return openai.status, await openai.json(), tgi.status, await tgi.json()

    status, body, tgi_status, tgi_body = run(router_tokenizer, [[("token", "x")]], scenario, api_key="k")
    assert status == 401 and body["error"]["type"] == "authentication_error" and body["error"]["code"] == "invalid_api_key"
    assert tgi_status == 401 and tgi_body == {"error": "Unauthorized", "error_type": "authentication"}


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def test_tool_prompt_leads_the_tools_description(router_tokenizer):
    """TGI's `tool_prompt` replaces the built-in lead of the tools' description (SmolLM2's template
    does not show tools, so the description goes into the system message); the call format the
    grammar enforces is stated either way. Without tools it changes nothing."""
    async def scenario(client, infer):
        texts = []
        for extra in ({}, {"tool_prompt": "Use exactly one of these."}, {"tool_prompt": "Unused.", "tools": None}):
            body = {"messages": MESSAGES, "tools": TOOLS, **extra}
            response = await client.post("/chat_tokenize", json={k: v for k, v in body.items() if v is not None})
            assert response.status == 200, await response.text()
            texts.append((await response.json())["templated_text"])
        return texts

    default, led, no_tools = run(router_tokenizer, [[("token", "x")]], scenario)
    assert "You may call one or more of these functions:\n<tools>" in default and "Use exactly" not in default
    assert "Use exactly one of these.\n<tools>" in led and "You may call" not in led
    assert "<tool_call>" in led and "get_weather" in led
    assert "Unused." not in no_tools and "<tools>" not in no_tools


def test_user_is_on_the_access_line(router_tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="router.app")

    async def scenario(client, infer):
        for body in ({"messages": MESSAGES, "user": "user-42\n" + "x" * 300}, {"messages": MESSAGES}):
            response = await client.post("/v1/chat/completions", json=body)
            assert response.status == 200

    run(router_tokenizer, [[("token", "x")]], scenario)
    lines = [r.getMessage() for r in caplog.records if r.name == "router.app" and "/v1/chat" in r.getMessage()]
    assert len(lines) == 2
    assert lines[0].endswith(" user=" + repr("user-42\n" + "x" * 120)) and "user=" not in lines[1]


def test_stop_count_is_the_validators_rule_with_its_param(router_tokenizer):
    """One rule for both APIs (router/validation.py); the OpenAI answer names the field."""
    async def scenario(client, infer):
        response = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "stop": list("abcde")})
        return response.status, await response.json()

    status, body = run(router_tokenizer, [[("token", "x")]], scenario)
    assert status == 400 and body["error"]["param"] == "stop"
    assert body["error"]["message"] == "`stop` supports up to 4 stop sequences. Given: 5"


def test_chat_tokenize_applies_the_stop_rule(router_tokenizer):
    async def scenario(client, infer):
        response = await client.post("/chat_tokenize", json={"messages": MESSAGES, "stop": [""] * 5})
        return response.status, await response.json()

    status, body = run(router_tokenizer, [[("token", "x")]], scenario)
    assert status == 422 and body == {"error": "Input validation error: `stop` supports up to 4 stop sequences. "
                                               "Given: 5", "error_type": "validation"}


ADAPTERS = ("org/sql-lora", "chat")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("model,adapter", [("org/sql-lora", "org/sql-lora"), ("chat", "chat"), ("served/model", ""),
                                           ("tgi", ""), (None, "")])
def test_model_field_selects_the_adapter(router_tokenizer, path, model, adapter, caplog):
    async def scenario(client, infer):
        body = {"messages": MESSAGES} if path.endswith("chat/completions") else {"prompt": "hi"}
        if model is not None:
            body["model"] = model
        response = await client.post(path, json=body)
        return response.status, await response.json(), infer.adapter_ids

    with caplog.at_level(logging.INFO, logger="router.app"):
        status, body, adapter_ids = run(router_tokenizer, [[("token", "x")]], scenario, adapters=ADAPTERS)
    assert status == 200 and adapter_ids == [adapter]
    assert body["model"] == (model or "served/model")
    access = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"POST {path}")]
    assert len(access) == 1 and (f"adapter={adapter!r}" in access[0]) == bool(adapter), access


@pytest.mark.parametrize("adapters,status", [(ADAPTERS, 404), ((), 200)])
def test_unknown_model_is_404_when_adapters_are_loaded(router_tokenizer, adapters, status):
    """With adapters loaded, a misspelt one must not silently run the base model; without any, a
    foreign name (clients send "gpt-4o") runs the served model, as TGI does."""
    async def scenario(client, infer):
        response = await client.post("/v1/chat/completions", json={"model": "org/sql-lorra", "messages": MESSAGES})
        return response.status, await response.json(), infer.adapter_ids

    got, body, adapter_ids = run(router_tokenizer, [[("token", "x")]], scenario, adapters=adapters)
    assert got == status
    if status == 404:
        error = body["error"]
        assert error["code"] == "model_not_found" and error["param"] == "model" and adapter_ids == []
        assert "`org/sql-lorra`" in error["message"] and "`org/sql-lora`, `chat`" in error["message"]
    else:
        assert adapter_ids == [""]


def test_models_lists_the_adapters(router_tokenizer):
    async def scenario(client, infer):
        listing = await (await client.get("/v1/models")).json()
        one = await client.get("/v1/models/org/sql-lora")
        missing = await client.get("/v1/models/org/other")
        return listing, one.status, await one.json(), missing.status

    listing, status, card, missing = run(router_tokenizer, [[("token", "x")]], scenario, adapters=ADAPTERS)
    assert [(m["id"], m.get("parent")) for m in listing["data"]] == [
        ("served/model", None), ("org/sql-lora", "served/model"), ("chat", "served/model")]
    assert status == 200 and card["id"] == "org/sql-lora" and card["parent"] == "served/model"
    assert missing == 404
