"""Real responses against the OpenAPI document's response schemas (generated from the typed bodies
of router/api_models.py and router/openai/models.py): what the routes send is what the document
describes. Every documented object is closed, so a key sent but not documented fails too."""

from __future__ import annotations

import json

import pytest
from jsonschema.exceptions import ValidationError as SchemaError
from openapi_schema_validator import OAS30Validator

from pytgi_proto import generate_pb2 as pb
from router.errors import GenerationError
from router.events import ErrorEvent, Finish, TokenEvent, TokenInfo
from router.http.openapi_schemas import ref, response_schemas
from router.infer import Generated
from router.limits import Limits
from router.routes import TgiRoutes, generate_json
from router.state import AppState
from tests.router.openai.test_routes import MESSAGES, config, run, sse


def check(name: str, body) -> None:
    """`body` is a valid `name` (a component schema, its $refs resolved within the components)."""
    OAS30Validator({**ref(name), "components": {"schemas": response_schemas()}}).validate(body)


def test_documented_objects_are_closed_and_keep_null_apart_from_absent():
    token = {"id": 1, "text": "a", "logprob": None, "special": False}
    check("Token", token)
    with pytest.raises(SchemaError):
        check("Token", {**token, "extra": 1})  # a key the class does not have
    with pytest.raises(SchemaError):
        check("Token", {k: v for k, v in token.items() if k != "logprob"})  # sent with null, never absent
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
             "system_fingerprint": "f", "choices": []}
    check("ChatCompletionChunk", chunk)  # `usage` only with include_usage
    check("ChatCompletionChunk", {**chunk, "usage": None})
    check("ChatCompletionChunk", {**chunk, "usage": usage})
    with pytest.raises(SchemaError):
        check("ChatCompletionChunk", {**chunk, "object": "chat.completion"})  # one value: an enum


# ------------------------------------------------------------------------------ TGI routes


def tgi_bodies(router_tokenizer):
    async def scenario(client, infer):
        details = {"details": True, "decoder_input_details": True}
        out = {}
        response = await client.post("/generate", json={"inputs": "hi", "parameters": details})
        out["generate"] = response.status, await response.json()
        response = await client.post("/", json={"inputs": "hi"})
        out["compat"] = response.status, await response.json()
        response = await client.post("/generate_stream",
                                     json={"inputs": "hi", "parameters": {"details": True}})
        out["stream"] = response.status, [json.loads(e) for e in sse(await response.text())]
        response = await client.post("/tokenize", json={"inputs": "Hello world"})
        out["tokenize"] = response.status, await response.json()
        response = await client.post("/chat_tokenize", json={"messages": MESSAGES})
        out["chat_tokenize"] = response.status, await response.json()
        response = await client.post("/generate", json={"inputs": ""})
        out["error"] = response.status, await response.json()
        return out

    return run(router_tokenizer, [[("token", "a"), ("token", "b")]], scenario)


def test_tgi_routes_send_the_documented_bodies(router_tokenizer):
    out = tgi_bodies(router_tokenizer)
    assert [status for status, _ in out.values()] == [200, 200, 200, 200, 200, 422]
    check("GenerateResponse", out["generate"][1])
    assert "details" in out["generate"][1]
    [compat] = out["compat"][1]
    check("GenerateResponse", compat)
    events = out["stream"][1]
    for event in events:
        check("StreamResponse", event)
    assert events[-1]["details"]["generated_tokens"] == 2 and events[0]["details"] is None
    for token in out["tokenize"][1]:
        check("SimpleToken", token)
    check("ChatTokenizeResponse", out["chat_tokenize"][1])
    check("ErrorResponse", out["error"][1])


def finish(text: str = "ab", tokens: int = 2, seed: int | None = 7, prefill=()) -> Finish:
    return Finish(generated_text=text, finish_reason="length", generated_tokens=tokens, seed=seed,
                  prefill=prefill, input_length=2, queued_at=0.0, batched_at=0.0, finished_at=0.0)


def test_tgi_shapes_with_every_optional_key():
    top = (TokenInfo(3, "c", -1.5, False), TokenInfo(4, "d", None, True))
    prefill = (TokenInfo(1, "<s>", None, True), TokenInfo(2, "hi", -2.0, False))
    done = finish(prefill=prefill)
    tokens = (TokenEvent(1, TokenInfo(5, "a", -0.1, False), top, None, "a"),
              TokenEvent(2, TokenInfo(6, "b", -0.2, False), top, done, "b"))
    best = Generated(request=None, tokens=tokens, finish=done, validated_at=0.0)
    body = generate_json(best, [best], details=True)
    check("GenerateResponse", body)
    details = body["details"]
    assert {"top_tokens", "best_of_sequences"} <= set(details) and details["seed"] == 7
    check("BestOfSequence", details["best_of_sequences"][0])
    last = TgiRoutes._stream_event(tokens[-1], details=True)
    check("StreamResponse", last)
    assert last["top_tokens"][1]["logprob"] is None and last["details"]["input_length"] == 2
    check("StreamResponse", TgiRoutes._stream_event(tokens[0], details=True))
    check("ErrorResponse", TgiRoutes._stream_event(ErrorEvent(GenerationError("shard died")), details=True))


def test_info_is_the_documented_body():
    state = object.__new__(AppState)  # only what info_json reads: config, limits, the shard's info
    state.config = config()
    state.limits = Limits(max_input_tokens=1000, max_total_tokens=2048)
    state.shard_info = pb.InfoResponse(dtype="torch.float32", device_type="cpu", attention_impl="sdpa",
                                       model_impl="pytgi", world_size=1, use_prefix_caching=True)
    check("Info", state.info_json())


# --------------------------------------------------------------------------- OpenAI routes


def openai_bodies(router_tokenizer, script):
    async def scenario(client, infer):
        async def post(path, body):
            response = await client.post(path, json=body)
            if body.get("stream"):
                text = await response.text()
                return response.status, [e if e == "[DONE]" else json.loads(e) for e in sse(text)]
            return response.status, await response.json()

        chat = {"messages": MESSAGES, "logprobs": True, "top_logprobs": 2, "n": 2}
        stream = {"stream": True, "stream_options": {"include_usage": True}}
        completion = {"prompt": ["Hello", "world"], "logprobs": 2, "echo": True, "max_tokens": 4}
        out = {
            "chat": await post("/v1/chat/completions", chat),
            "chat_stream": await post("/v1/chat/completions", {**chat, **stream}),
            "completion": await post("/v1/completions", completion),
            "completion_stream": await post("/v1/completions", {**completion, **stream}),
            "error": await post("/v1/chat/completions", {"messages": []}),
        }
        models = await client.get("/v1/models")
        out["models"] = models.status, await models.json()
        return out

    return run(router_tokenizer, [script], scenario, model_id="tiny")


def test_openai_routes_send_the_documented_bodies(router_tokenizer):
    out = openai_bodies(router_tokenizer, [("token", " a"), ("token", " b")])
    assert [status for status, _ in out.values()] == [200, 200, 200, 200, 400, 200]
    check("ChatCompletion", out["chat"][1])
    assert out["chat"][1]["choices"][0]["logprobs"]["content"]
    *chunks, done = out["chat_stream"][1]
    assert done == "[DONE]" and chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    for chunk in chunks:
        check("ChatCompletionChunk", chunk)
    check("Completion", out["completion"][1])
    assert out["completion"][1]["choices"][0]["logprobs"]["tokens"]
    *chunks, done = out["completion_stream"][1]
    for chunk in chunks:
        check("CompletionChunk", chunk)
    check("OpenAIErrorResponse", out["error"][1])
    check("ModelList", out["models"][1])
    check("Model", out["models"][1]["data"][0])


def test_an_error_mid_stream_is_the_documented_error_body(router_tokenizer):
    out = openai_bodies(router_tokenizer, [("token", " a"), ("error", "shard died")])
    *chunks, error, done = out["chat_stream"][1]
    for chunk in chunks:
        check("ChatCompletionChunk", chunk)
    check("OpenAIErrorResponse", error)
    assert error["error"]["code"] == "generation" and done == "[DONE]"
