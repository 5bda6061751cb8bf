"""The OpenAPI 3.0 document of every HTTP route the router serves (TGI's `/api-doc/openapi.json`).

Built from the code, with the server's live limits, never kept as a copy: the component schemas
come from router/http/openapi_schemas.py (request bodies from the parsers' own fields and rules,
response bodies generated from the typed dicts the routes build); the paths are written out here.
Error responses use the envelope of the route's family: TGI `{"error", "error_type"}` on the
native routes, OpenAI `{"error": {"message", "type", "param", "code"}}` on `/v1/*`; SageMaker's
`/invocations` answers in the envelope of the body it was sent (`ROUTE_FAMILIES`).

tests/router/http/test_openapi.py checks the paths against the app's route table and the document
against the OpenAPI 3.0 schema, test_openapi_responses.py real responses against their schemas.
OpenAPI 3.0 (not 3.1) because the bundled Swagger UI 4 renders 3.0.
"""

from __future__ import annotations

from typing import Any

from router.api_models import ChatTokenizeResponse, ErrorResponse, GenerateResponse, Info, SimpleToken
from router.http import playground
from router.http.openapi_schemas import component_schemas, object_schema, ref
from router.limits import Limits
from router.openai.models import ChatCompletion, Completion, Model, ModelList, OpenAIErrorResponse

OPENAPI_VERSION = "3.0.3"
DOCUMENT_PATH = "/api-doc/openapi.json"
# Which error envelope a path answers 4xx/5xx in: "tgi", "openai" or "either" (follows the body).
ROUTE_FAMILIES = {
    "/": "tgi", "/generate": "tgi", "/generate_stream": "tgi", "/tokenize": "tgi", "/chat_tokenize": "tgi",
    "/info": "tgi", "/health": "tgi", "/ping": "tgi", "/metrics": "tgi", "/live": "tgi", "/ready": "tgi",
    "/invocations": "either",
    "/v1/chat/completions": "openai", "/v1/completions": "openai", "/v1/models": "openai",
    "/v1/models/{model}": "openai",
    DOCUMENT_PATH: "tgi", "/docs": "tgi", "/docs/": "tgi", "/docs/{asset}": "tgi",
    playground.ASSET_PREFIX + "{asset}": "tgi",
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


# ------------------------------------------------------------------------------- operations

_ERROR_STATUSES = {
    400: "Malformed JSON, or (OpenAI routes, /chat_tokenize) an invalid request.",
    401: "Missing or wrong API key (only with --api-key).",
    404: "Unknown model (OpenAI routes: with --strict-model-name or LoRA adapters loaded), or not one of "
         "the UI's files (/docs, /playground).",
    408: "The body was not received within --client-body-timeout, or the request ran past --request-timeout.",
    413: "Body larger than --payload-limit.",
    415: "Body sent with a non-JSON Content-Type.",
    422: "Invalid request (TGI's validation, chat template).",
    424: "The generation failed on a shard.",
    429: "Too many concurrent requests (--max-concurrent-requests).",
    500: "The generation ended without its last token.",
    503: "A shard is unhealthy (/health), or the router is draining (every route but the public ones).",
}


def _errors(family: str, statuses: tuple[int, ...]) -> dict[str, Any]:
    schema = {"tgi": ref(ErrorResponse), "openai": ref(OpenAIErrorResponse),
              "either": {"oneOf": [ref(ErrorResponse), ref(OpenAIErrorResponse)]}}[family]
    return {str(status): _json(schema, _ERROR_STATUSES[status]) for status in statuses}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _sse(description: str) -> dict[str, Any]:
    # The schema of one event (what schemathesis checks each event against; 3.2's itemSchema).
    event = object_schema({"data": {"type": "string"}, "event": {"type": "string"}}, ("data",),
                          description=description)
    return {"text/event-stream": {"schema": event}}


def _operation(summary: str, tag: str, responses: dict[str, Any], body: dict[str, Any] | None = None,
               **extra: Any) -> dict[str, Any]:
    out = {"summary": summary, "tags": [tag], "operationId": extra.pop("operation_id"),
           "responses": responses, **extra}
    if body is not None:
        out["requestBody"] = _body(body)
    return out


_GENERATION_ERRORS = (400, 401, 408, 413, 422, 424, 429, 500, 503)
_TOKENIZE_ERRORS = (400, 401, 408, 413, 422, 503)
_OPENAI_ERRORS = (400, 401, 404, 408, 413, 415, 429, 500, 503)
# The events' JSON is described by components (SSE has no schema for `data` in OpenAPI 3.0).
_TGI_STREAM = "`data: <StreamResponse JSON>` events; an error arrives as a `data: <ErrorResponse>` event."
_CHAT_STREAM = ("`data: <ChatCompletionChunk JSON>` events, then `data: [DONE]`; an error arrives as a "
                "`data: <OpenAIErrorResponse>` event.")
_COMPLETION_STREAM = _CHAT_STREAM.replace("ChatCompletionChunk", "CompletionChunk")


def _probe(status: str) -> dict[str, Any]:
    return object_schema({"status": {"type": "string", "enum": [status]}}, ("status",))


def _tgi_paths() -> dict[str, Any]:
    generate = _json(ref(GenerateResponse), "The generation.")
    compat_ok = {"description": "A one-element list of generations, or an SSE stream with `stream: true`.",
                 "content": {"application/json": {"schema": {"type": "array",
                                                             "items": ref(GenerateResponse)}},
                             **_sse(_TGI_STREAM)}}
    healthy = {"200": {"description": "Every shard answers."}, **_errors("tgi", (503,))}
    return {
        "/": {"post": _operation("Generate (TGI compat: a list, or SSE when `stream` is true)", "TGI",
                                 {"200": compat_ok, **_errors("tgi", _GENERATION_ERRORS)},
                                 ref("CompatGenerateRequest"), operation_id="compat_generate")},
        "/generate": {"post": _operation("Generate tokens", "TGI", {"200": generate,
                                                                     **_errors("tgi", _GENERATION_ERRORS)},
                                         ref("GenerateRequest"), operation_id="generate")},
        "/generate_stream": {"post": _operation(
            "Generate a stream of tokens (Server-Sent Events)", "TGI",
            {"200": {"description": "The token stream.", "content": _sse(_TGI_STREAM)},
             **_errors("tgi", _GENERATION_ERRORS)},
            ref("GenerateRequest"), operation_id="generate_stream")},
        "/tokenize": {"post": _operation("Tokenize `inputs`", "TGI", {
            "200": _json({"type": "array", "items": ref(SimpleToken)}, "Tokens with character offsets."),
            **_errors("tgi", _TOKENIZE_ERRORS)}, ref("TokenizeRequest"), operation_id="tokenize")},
        "/chat_tokenize": {"post": _operation("Render the chat template and tokenize it", "TGI", {
            "200": _json(ref(ChatTokenizeResponse), "The templated prompt and its tokens."),
            **_errors("tgi", _TOKENIZE_ERRORS)}, ref("ChatRequest"), operation_id="chat_tokenize")},
        "/invocations": {"post": _operation(
            "SageMaker: a TGI compat body, or an OpenAI chat or completion body", "SageMaker",
            {"200": {"description": "The answer of the route the body belongs to.",
                     "content": {"application/json": {"schema": {"oneOf": [
                         {"type": "array", "items": ref(GenerateResponse)}, ref(ChatCompletion),
                         ref(Completion)]}},
                     **_sse(f"TGI: {_TGI_STREAM} Chat: {_CHAT_STREAM} Completions: {_COMPLETION_STREAM}")}},
             **_errors("either", (*_GENERATION_ERRORS, 404))},
            # anyOf: a body with `messages` is a chat even when it also has `inputs`.
            {"anyOf": [ref("CompatGenerateRequest"), ref("ChatRequest"), ref("CompletionRequest")]},
            operation_id="invocations")},
        "/info": {"get": _operation("Model and router limits", "TGI",
                                    {"200": _json(ref(Info), "Server info.")}, operation_id="info")},
        "/health": {"get": _operation("Health of the shards", "TGI", healthy, operation_id="health")},
        "/ping": {"get": _operation("Health (SageMaker's path)", "SageMaker", healthy, operation_id="ping")},
        "/live": {"get": _operation("Liveness: the event loop answers (never asks the shards)", "Probes", {
            "200": _json(_probe("live"), "Alive.")}, operation_id="live")},
        "/ready": {"get": _operation("Readiness: accepting requests (503 once draining)", "Probes", {
            "200": _json(_probe("ready"), "Ready."), **_errors("tgi", (503,))}, operation_id="ready")},
        "/metrics": {"get": _operation("Prometheus metrics", "TGI", {"200": {
            "description": "Prometheus text format.",
            "content": {"text/plain": {"schema": {"type": "string"}}}}},
            operation_id="metrics")},
    }


def _openai_paths() -> dict[str, Any]:
    chat_ok = {"description": "The completion, or an SSE stream with `stream: true`.",
               "content": {"application/json": {"schema": ref(ChatCompletion)}, **_sse(_CHAT_STREAM)}}
    completion_ok = {"description": "The completion, or an SSE stream with `stream: true`.",
                     "content": {"application/json": {"schema": ref(Completion)}, **_sse(_COMPLETION_STREAM)}}
    model_parameter = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "/v1/chat/completions": {"post": _operation(
            "OpenAI chat completions", "OpenAI", {"200": chat_ok, **_errors("openai", _OPENAI_ERRORS)},
            ref("ChatRequest"), operation_id="chat_completions")},
        "/v1/completions": {"post": _operation(
            "OpenAI completions", "OpenAI", {"200": completion_ok, **_errors("openai", _OPENAI_ERRORS)},
            ref("CompletionRequest"), operation_id="completions")},
        "/v1/models": {"get": _operation("The served model and its LoRA adapters", "OpenAI", {
            "200": _json(ref(ModelList), "The base model, then each adapter."), **_errors("openai", (401, 503))},
            operation_id="models")},
        "/v1/models/{model}": {"get": _operation("One model by id", "OpenAI", {
            "200": _json(ref(Model), "The model."), **_errors("openai", (401, 404, 503))},
            operation_id="model", parameters=[model_parameter])},
    }


def _docs_paths(asset_names: tuple[str, ...]) -> dict[str, Any]:
    asset_types = {"text/css": {"schema": {"type": "string"}},
                   "text/javascript": {"schema": {"type": "string"}},
                   "image/png": {"schema": {"type": "string", "format": "binary"}}}
    asset_parameter = {"name": "asset", "in": "path", "required": True,
                       "schema": {"type": "string", "enum": list(asset_names)}}
    return {
        DOCUMENT_PATH: {"get": _operation("This document", "Docs", {
            "200": _json({"type": "object"}, "OpenAPI 3.0 document.")}, operation_id="openapi")},
        "/docs": {"get": _operation("Redirect to /docs/", "Docs", {"302": {"description": "To `docs/`."}},
                                    operation_id="docs_redirect")},
        "/docs/": {"get": _operation("Swagger UI", "Docs", {"200": {
            "description": "The page.", "content": {"text/html": {"schema": {"type": "string"}}}}},
            operation_id="docs")},
        "/docs/{asset}": {"get": _operation("Swagger UI files (from the swagger-ui-bundle package)", "Docs", {
            "200": {"description": "The file.", "content": asset_types}, **_errors("tgi", (404,))},
            operation_id="docs_asset", parameters=[asset_parameter])},
    }


def _playground_paths() -> dict[str, Any]:
    """router/http/playground.py; absent with --disable-playground (GET / then answers 405, as in TGI)."""
    asset_types = {media_type: {"schema": {"type": "string"}} for media_type in playground.ASSETS.values()}
    asset_parameter = {"name": "asset", "in": "path", "required": True,
                       "schema": {"type": "string", "enum": list(playground.ASSETS)}}
    return {
        "/": {"get": _operation("The browser playground (a page; public, it asks for the API key itself)",
                                "Playground", {"200": {"description": "The page.", "content": {
                                    "text/html": {"schema": {"type": "string"}}}}},
                                operation_id="playground")},
        playground.ASSET_PREFIX + "{asset}": {"get": _operation(
            "The playground's files (shipped in the package)", "Playground", {
                "200": {"description": "The file.", "content": asset_types}, **_errors("tgi", (404,))},
            operation_id="playground_asset", parameters=[asset_parameter])},
    }


def _merge(*groups: dict[str, Any]) -> dict[str, Any]:
    """Path items by path: `/` has TGI's POST and the playground's GET."""
    paths: dict[str, Any] = {}
    for group in groups:
        for path, item in group.items():
            paths.setdefault(path, {}).update(item)
    return paths


def build_document(limits: Limits, version: str, asset_names: tuple[str, ...], playground: bool = True) -> dict[str, Any]:
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "pytgi", "version": version, "license": {"name": "Apache-2.0"},
                 "description": "Text Generation Inference compatible router (TGI and OpenAI APIs). "
                                "With --api-key, every route except /health, /ping, /info, /metrics, "
                                "/live, /ready, the docs and the playground's page and files (GET) needs "
                                "`Authorization: Bearer <key>`."},
        "paths": _merge(_tgi_paths(), _openai_paths(), _docs_paths(asset_names),
                        _playground_paths() if playground else {}),
        "components": {"schemas": component_schemas(limits)},
    }
