"""The OpenAPI document against the code: the app's route table, the request dataclasses and
parsers, the error envelopes; and the docs routes (Swagger UI from the swagger-ui-bundle package)."""

from __future__ import annotations

import dataclasses

import pytest
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate as validate_spec

from router.app import create_app
from router.errors import InvalidRequestError, OverloadedError, RouterError, UnhealthyError, ValidationError
from router.http.docs import ASSETS
from router.http.openapi import DOCUMENT_PATH, ROUTE_FAMILIES, build_document
from router.http.openapi_schemas import INTEGER_KINDS
from router.limits import MAX_N, Limits
from router.openai.chat_fields import _FUNCTION_NAME, RESPONSE_FORMATS
from router.openai.requests import parse_chat_request, parse_completion_request
from router.schemas import _PARAMETER_FIELDS, GRAMMAR_TYPES, GenerateParameters, parse_generate_request
from router.state import VERSION
from tests.router.helpers import serve_app
from tests.router.openai.test_routes import ScriptedInfer, State, config

LIMITS = Limits(
    max_best_of=2,
    max_stop_sequences=4,
    max_top_n_tokens=5,
    max_input_tokens=64,
    max_total_tokens=96,
    max_client_batch_size=4,
    vocab_size=49152,
)
DOCUMENT = build_document(LIMITS, VERSION, tuple(ASSETS))


def schema_validator(name: str) -> OAS30Validator:
    """A validator for one component schema, its $refs resolved within the document."""
    return OAS30Validator({"$ref": f"#/components/schemas/{name}", "components": DOCUMENT["components"]})


def test_document_is_valid_openapi_3_0():
    validate_spec(DOCUMENT)
    assert DOCUMENT["openapi"].startswith("3.0.")


def test_every_registered_route_is_documented_and_vice_versa():
    app = create_app(config())
    registered = {
        (route.method, route.resource.canonical) for route in app.router.routes() if route.method != "HEAD"
    }  # aiohttp adds HEAD beside every GET
    documented = {(method.upper(), path) for path, item in DOCUMENT["paths"].items() for method in item}
    assert registered == documented
    assert set(ROUTE_FAMILIES) == set(DOCUMENT["paths"])
    # --disable-playground: its routes leave the document with it (POST / stays).
    app = create_app(config(disable_playground=True))
    registered = {(route.method, route.resource.canonical) for route in app.router.routes() if route.method != "HEAD"}
    document = build_document(LIMITS, VERSION, tuple(ASSETS), playground=False)
    assert registered == {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    assert ("GET", "/") not in registered and ("POST", "/") in registered


def test_generate_parameters_are_the_dataclass_fields_the_parser_reads():
    properties = DOCUMENT["components"]["schemas"]["GenerateParameters"]["properties"]
    fields = [field.name for field in dataclasses.fields(GenerateParameters)]
    assert list(properties) == fields
    assert set(_PARAMETER_FIELDS) == set(fields)
    assert properties["max_new_tokens"]["maximum"] == LIMITS.max_total_tokens - 1
    assert properties["stop"]["maxItems"] == LIMITS.max_stop_sequences
    assert properties["top_n_tokens"]["maximum"] == LIMITS.max_top_n_tokens
    variants = DOCUMENT["components"]["schemas"]["Grammar"]["oneOf"]
    assert {kind for v in variants for kind in v["properties"]["type"]["enum"]} == set(GRAMMAR_TYPES)


@pytest.mark.parametrize("name", sorted(INTEGER_KINDS))
def test_integer_widths_are_the_parser_s(name):
    properties = DOCUMENT["components"]["schemas"]["TokenizeRequest"]["properties"]["parameters"][
        "properties"
    ]
    low, high = properties[name]["minimum"], properties[name]["maximum"]
    parse_generate_request({"inputs": "x", "parameters": {name: high}}, compat=False)
    parse_generate_request({"inputs": "x", "parameters": {name: low}}, compat=False)
    for outside in (low - 1, high + 1):
        with pytest.raises(ValidationError):
            parse_generate_request({"inputs": "x", "parameters": {name: outside}}, compat=False)


def test_openai_constants_are_the_parser_s():
    chat = DOCUMENT["components"]["schemas"]["ChatRequest"]["properties"]
    tool_name = chat["tools"]["items"]["properties"]["function"]["properties"]["name"]
    assert tool_name["pattern"] == _FUNCTION_NAME.pattern
    assert {
        kind for variant in chat["response_format"]["oneOf"] for kind in variant["properties"]["type"]["enum"]
    } == set(RESPONSE_FORMATS)
    assert chat["n"]["maximum"] == MAX_N == LIMITS.max_n


def test_error_responses_use_the_envelope_of_the_route_family():
    refs = {
        "tgi": ["#/components/schemas/ErrorResponse"],
        "openai": ["#/components/schemas/OpenAIErrorResponse"],
    }
    refs["either"] = refs["tgi"] + refs["openai"]
    for path, item in DOCUMENT["paths"].items():
        family = ROUTE_FAMILIES[path]
        for operation in item.values():
            for status, response in operation["responses"].items():
                if int(status) < 400:
                    continue
                schema = response["content"]["application/json"]["schema"]
                found = [s["$ref"] for s in schema.get("oneOf", [schema])]
                assert found == refs[family], (path, status)


@pytest.mark.parametrize(
    "error",
    [
        ValidationError("`inputs` cannot be empty"),
        OverloadedError(),
        UnhealthyError(),
        InvalidRequestError(
            "Missing required parameter: 'messages'.", "messages", code="missing_required_parameter"
        ),
        RouterError("The model `x` does not exist.", status=404, error_type="model_not_found", param="model"),
    ],
)
def test_the_error_classes_match_the_documented_envelopes(error):
    schema_validator("ErrorResponse").validate(error.to_tgi())
    schema_validator("OpenAIErrorResponse").validate(error.to_openai())


def test_documented_request_bodies_parse_and_parsed_bodies_validate():
    openai_limits = Limits(
        max_stop_sequences=4, max_top_n_tokens=5, max_client_batch_size=4, vocab_size=LIMITS.vocab_size,
        max_input_tokens=1024, max_total_tokens=2048,
    )
    generate = {
        "inputs": "Hi",
        "parameters": {
            "best_of": 2,
            "temperature": 0.5,
            "repetition_penalty": 1.1,
            "frequency_penalty": 0.1,
            "top_k": 10,
            "top_p": 0.9,
            "typical_p": 0.9,
            "do_sample": True,
            "max_new_tokens": 8,
            "return_full_text": None,
            "stop": ["x"],
            "truncate": 10,
            "watermark": False,
            "details": True,
            "decoder_input_details": False,
            "seed": None,
            "top_n_tokens": 2,
            "grammar": {"type": "regex", "value": "[a-z]+"},
            "adapter_id": None,
            "presence_penalty": 0.5,
            "min_p": 0.1,
        },
    }
    chat = {
        "model": "tgi",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ],
        "max_tokens": 4,
        "temperature": 0,
        "stop": "\n",
        "seed": -1,
        "n": 2,
        "logprobs": True,
        "top_logprobs": 2,
        "tools": [
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    completion = {"prompt": ["Hello", [1, 2, 3]], "max_tokens": 0, "echo": True, "logprobs": 1, "suffix": ""}
    for name, body, parse in [
        (
            "CompatGenerateRequest",
            {**generate, "stream": False},
            lambda b: parse_generate_request(b, compat=True),
        ),
        ("ChatRequest", chat, lambda b: parse_chat_request(b, openai_limits)),
        ("CompletionRequest", completion, lambda b: parse_completion_request(b, openai_limits)),
    ]:
        schema_validator(name).validate(body)
        parse(body)
    assert not schema_validator("GenerateRequest").is_valid({"inputs": "", "parameters": {}})
    assert not schema_validator("ChatRequest").is_valid({**chat, "n": 9})


class DocsState(State):
    """The OpenAI tests' AppState stand-in, with the limits the document reads."""

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer, ScriptedInfer(tokenizer, [[("token", "x")]]))
        self.limits = LIMITS


def serve(router_tokenizer, scenario, **overrides):
    cfg = config(**overrides)
    return serve_app(lambda: create_app(cfg, DocsState(cfg, router_tokenizer)), scenario)


def test_docs_page_assets_and_document_are_served_and_public(router_tokenizer):
    async def scenario(client):
        redirect = await client.get("/docs", allow_redirects=False)
        assert redirect.status == 302 and redirect.headers["Location"] == "docs/"
        page = await client.get("/docs")  # follows the redirect
        assert page.status == 200 and page.content_type == "text/html"
        html = await page.text()
        assert (
            "../api-doc/openapi.json" in html and "http://" not in html and "https://" not in html
        )  # no CDN
        for name, media_type in ASSETS.items():
            assert f"./{name}" in html
            asset = await client.get(f"/docs/{name}")
            assert asset.status == 200 and asset.content_type == media_type, name
            assert len(await asset.read()) > 0
        unknown = await client.get("/docs/swagger-ui.js.map", headers={"Authorization": "Bearer secret"})
        assert (
            unknown.status == 404 and (await unknown.json())["error_type"] == "not_found"
        )  # only the page's files
        document = await client.get(DOCUMENT_PATH)
        assert document.status == 200 and document.content_type == "application/json"
        assert (await client.post("/generate", json={"inputs": "x"})).status == 401  # the key is enforced
        return await document.json()

    document = serve(router_tokenizer, scenario, api_key="secret")
    assert document == build_document(LIMITS, VERSION, tuple(ASSETS))  # from the state's limits
