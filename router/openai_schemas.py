"""OpenAI request bodies (`/v1/chat/completions`, `/v1/completions`) → typed, validated requests.

Every rule answers 400 `invalid_request_error` with `param` naming the field (OpenAI's shape;
the messages follow OpenAI's wording: "Invalid type for 'x': …", "Invalid value for 'x': …",
"Missing required parameter: 'x'."). `null` means "absent" for every optional field (clients such
as `text-generation` send every field, null when unset). Unknown fields are ignored, as vLLM and
TGI do.

Sampling semantics (README "OpenAI API" lists them):
- `temperature` ∈ [0, 2], default 1 with sampling; 0 = greedy. `top_p` ∈ [0, 1]: 1 = off and
  0 = greedy. `frequency_penalty` / `presence_penalty` ∈ [-2, 2], OpenAI's additive form.
- `logit_bias`: token-id string keys (in the vocabulary) → bias ∈ [-100, 100].
- `stop`: a string or a list of at most `--max-stop-sequences`, matched on text and stripped.
- `n` ∈ [1, MAX_N]; each choice samples with its own seed (`seed + i` when a seed is given).
- TGI/vLLM extras: `top_k` (≤ 0 = off), `repetition_penalty` (> 0), `typical_p` ∈ (0, 1],
  `min_p` ∈ [0, 1], `ignore_eos`.
- `tools` / `tool_choice` / `response_format` / `grammar` are checked for shape here; whether they
  can be honoured is decided by the handler (constrained decoding).
- `chat_template_kwargs` (vLLM's extra): an object of extra chat-template variables, none of them
  one the renderer sets itself (router.chat_template.RESERVED_KWARGS).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from router import bounds
from router.chat_template import RESERVED_KWARGS
from router.errors import InvalidRequestError

MAX_N = 8  # most choices per prompt (each one is a generation: `n` concurrency permits)
SEED_RANGE = (-(2**63), 2**64 - 1)
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_TOKEN_ID = re.compile(r"^[0-9]{1,10}\Z")
RESPONSE_FORMATS = ("text", "json_object", "json_schema", "json", "regex")


@dataclass(frozen=True, slots=True)
class OpenAILimits:
    max_stop_sequences: int
    max_top_n_tokens: int
    max_client_batch_size: int
    vocab_size: int  # ids the model can take (its embedding rows and logits, and the tokenizer's)
    max_input_tokens: int  # also bounds the number of chat messages: each takes a prompt token
    max_n: int = MAX_N


@dataclass(slots=True)
class Sampling:
    """What both endpoints share; `None` = the endpoint's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop: tuple[str, ...] = ()
    seed: int | None = None  # already reduced to [0, 2**64)
    n: int = 1
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_p == 0.0


@dataclass(slots=True)
class ChatRequest:
    model: str | None
    messages: list[dict[str, Any]]  # content normalized to a string (or None beside tool_calls)
    sampling: Sampling
    logprobs: bool = False
    top_logprobs: int = 0
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None  # None: "auto" when tools are given
    response_format: dict[str, Any] | None = None
    grammar: dict[str, Any] | None = None  # TGI's extra: {"type": "json"|"regex"|…, "value"}
    tool_prompt: str | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def needs_constraint(self) -> bool:
        """Whether honouring the request needs constrained decoding."""
        tools_active = bool(self.tools) and self.tool_choice != "none"
        text_format = self.response_format is None or self.response_format.get("type") == "text"
        return tools_active or not text_format or self.grammar is not None


@dataclass(slots=True)
class CompletionRequest:
    model: str | None
    prompts: list[str | list[int]]
    sampling: Sampling
    echo: bool = False
    logprobs: int | None = None
    user: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


# ------------------------------------------------------------------------------ field readers


def _kind(value: Any) -> str:
    for kind, name in ((type(None), "null"), (bool, "a boolean"), ((int, float), "a number"),
                       (str, "a string"), (list, "an array")):
        if isinstance(value, kind):
            return name
    return "an object"


def _type_error(param: str, expected: str, value: Any) -> InvalidRequestError:
    return InvalidRequestError(f"Invalid type for '{param}': expected {expected}, but got {_kind(value)} "
                               "instead.", param, code="invalid_type")


def _value_error(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"Invalid value for '{param}': {message}", param, code="invalid_value")


def _missing(param: str) -> InvalidRequestError:
    return InvalidRequestError(f"Missing required parameter: '{param}'.", param,
                               code="missing_required_parameter")


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)


def _bool(body: dict, name: str, default: bool | None = None, param: str | None = None) -> bool | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _type_error(param or name, "a boolean", value)
    return value


def _int(body: dict, name: str, low: int | None = None, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(name, "an integer", value)
    if (low is not None and value < low) or (high is not None and value > high):
        expected = f"between {low} and {high}" if high is not None else f">= {low}"
        raise _value_error(name, f"expected an integer {expected}, but got {value} instead.")
    return value


def _number(body: dict, name: str, low: float, high: float, *, open_low: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(name, "a number", value)
    number = bounds.finite_float(value)  # None: NaN, ±inf, or beyond what a proto float holds
    if number is None or number > high or (number <= low if open_low else number < low):
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        raise _value_error(name, f"expected a number in {interval}, but got {value!r} instead.")
    return number


def _str(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _type_error(name, "a string", value)
    return value


def _object(body: dict, name: str) -> dict | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _type_error(name, "an object", value)
    return value


# ---------------------------------------------------------------------------- shared sampling


def _sampling(body: dict, limits: OpenAILimits, *, max_tokens: int | None,
              min_max_tokens: int = 1) -> Sampling:
    s = Sampling()
    s.max_tokens = max_tokens
    if s.max_tokens is not None and s.max_tokens < min_max_tokens:
        param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        raise _value_error(param, f"expected an integer >= {min_max_tokens}, but got {s.max_tokens} instead.")
    s.temperature = _number(body, "temperature", 0.0, 2.0)
    s.top_p = _number(body, "top_p", 0.0, 1.0)
    s.frequency_penalty = _number(body, "frequency_penalty", -2.0, 2.0)
    s.presence_penalty = _number(body, "presence_penalty", -2.0, 2.0)
    s.min_p = _number(body, "min_p", 0.0, 1.0)
    s.typical_p = _number(body, "typical_p", 0.0, 1.0, open_low=True)
    s.repetition_penalty = _number(body, "repetition_penalty", 0.0, math.inf, open_low=True)
    top_k = _int(body, "top_k", -bounds.I32_MAX - 1, bounds.I32_MAX)  # TGI's i32; <= 0 means off
    s.top_k = top_k if top_k is not None and top_k > 0 else None
    s.logit_bias = _logit_bias(body.get("logit_bias"), limits.vocab_size)
    s.stop = _stop(body.get("stop"), limits.max_stop_sequences)
    seed = _int(body, "seed", *SEED_RANGE)
    s.seed = None if seed is None else seed % 2**64
    n = _int(body, "n", 1, limits.max_n)
    s.n = 1 if n is None else n
    s.ignore_eos = bool(_bool(body, "ignore_eos", False))
    s.stream = bool(_bool(body, "stream", False))
    options = _object(body, "stream_options")
    if options is not None:
        if not s.stream:
            raise InvalidRequestError("The 'stream_options' parameter is only allowed when 'stream' is "
                                      "enabled.", "stream_options")
        s.include_usage = bool(_bool(options, "include_usage", False, "stream_options.include_usage"))
    return s


def _logit_bias(value: Any, vocab_size: int) -> tuple[tuple[int, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise _type_error("logit_bias", "an object mapping token ids to bias values", value)
    if len(value) > bounds.MAX_LOGIT_BIAS:
        raise _value_error("logit_bias", f"at most {bounds.MAX_LOGIT_BIAS} entries are allowed, but got "
                                         f"{len(value)}.")
    bias = []
    for key, amount in value.items():
        if not _TOKEN_ID.match(key):
            raise InvalidRequestError(f"Invalid key in 'logit_bias': {key[:32]!r} is not a token id (an "
                                      "integer string).", "logit_bias", code="invalid_value")
        token_id = int(key)
        if not 0 <= token_id < vocab_size:
            raise InvalidRequestError(f"Invalid key in 'logit_bias': token id {token_id} is outside the "
                                      f"vocabulary (0 to {vocab_size - 1}).", "logit_bias",
                                      code="invalid_value")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not -100 <= amount <= 100:
            raise InvalidRequestError(f"Invalid value in 'logit_bias' for token {key}: expected a number "
                                      f"between -100 and 100, but got {amount!r} instead.", "logit_bias",
                                      code="invalid_value")
        bias.append((token_id, float(amount)))
    return tuple(bias)


def _stop(value: Any, max_stop: int) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _type_error("stop", "a string or an array of strings", value)
    if len(stops) > max_stop:
        raise _value_error("stop", f"at most {max_stop} stop sequences are allowed (--max-stop-sequences), "
                                   f"but got {len(stops)}.")
    return tuple(stops)  # their length is the validator's rule (router/validation.py), for both APIs


def _require_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.", None, code="invalid_type")
    return body


# ------------------------------------------------------------------------------------ chat


def parse_chat_request(body: Any, limits: OpenAILimits) -> ChatRequest:
    body = _require_object(body)
    model = _str(body, "model")
    if body.get("messages") is None:
        raise _missing("messages")
    messages = _messages(body["messages"], limits.max_input_tokens)
    if body.get("functions") is not None or body.get("function_call") is not None:
        raise InvalidRequestError("'functions' and 'function_call' are deprecated and not supported; use "
                                  "'tools' and 'tool_choice'.", "functions")
    # Both are checked, whichever is used (max_completion_tokens wins): a bad value is never ignored.
    max_completion_tokens, max_tokens = _int(body, "max_completion_tokens", 1), _int(body, "max_tokens", 1)
    if max_completion_tokens is not None:
        max_tokens = max_completion_tokens
    sampling = _sampling(body, limits, max_tokens=max_tokens)
    logprobs = bool(_bool(body, "logprobs", False))
    top_logprobs = _int(body, "top_logprobs", 0, limits.max_top_n_tokens)
    if top_logprobs is not None and not logprobs:
        raise InvalidRequestError("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs")
    tools = _tools(body.get("tools"))
    request = ChatRequest(
        model=model, messages=messages, sampling=sampling, logprobs=logprobs, top_logprobs=top_logprobs or 0,
        tools=tools, tool_choice=_tool_choice(body.get("tool_choice"), tools),
        response_format=_response_format(body.get("response_format"), "response_format"),
        grammar=_response_format(body.get("grammar"), "grammar"),
        tool_prompt=_str(body, "tool_prompt"), parallel_tool_calls=_bool(body, "parallel_tool_calls"),
        user=_str(body, "user"), chat_template_kwargs=_template_kwargs(body), raw=body,
    )
    if request.grammar is not None and request.response_format is not None:
        raise InvalidRequestError("'grammar' and 'response_format' cannot both be set.", "grammar")
    return request


def _template_kwargs(body: dict) -> dict[str, Any] | None:
    kwargs = _object(body, "chat_template_kwargs")
    reserved = sorted(RESERVED_KWARGS.intersection(kwargs or ()))
    if reserved:
        raise _value_error("chat_template_kwargs", f"{reserved[0]!r} is set by the server and cannot be "
                                                   "overridden.")
    return kwargs


def _messages(value: Any, max_messages: int) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _type_error("messages", "an array", value)
    if not value:
        raise InvalidRequestError("Invalid 'messages': empty array. Expected an array with minimum length 1.",
                                  "messages", code="empty_array")
    if len(value) > max_messages:
        # Every message takes at least one prompt token: refused before the template renders them.
        raise _value_error("messages", f"at most {max_messages} messages fit this model's input limit "
                                       f"(--max-input-tokens), but got {len(value)}.")
    return [_message(item, f"messages[{i}]") for i, item in enumerate(value)]


def _message(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise _type_error(where, "an object", item)
    role = item.get("role")
    if role is None:
        raise _missing(f"{where}.role")
    if not isinstance(role, str) or not role:
        raise _type_error(f"{where}.role", "a non-empty string", role)
    message = dict(item)  # other keys (name, tool_call_id, …) reach the template unchanged
    tool_calls = item.get("tool_calls")
    if tool_calls is not None:
        if role != "assistant":
            raise _value_error(f"{where}.tool_calls", "only assistant messages may have tool calls.")
        message["tool_calls"] = _tool_calls(tool_calls, f"{where}.tool_calls")
    content = item.get("content")
    if content is None:
        if not (role == "assistant" and tool_calls):
            raise _missing(f"{where}.content")
        message["content"] = None
    else:
        message["content"] = _content(content, f"{where}.content")
    if role == "tool" and item.get("tool_call_id") is not None and not isinstance(item["tool_call_id"], str):
        raise _type_error(f"{where}.tool_call_id", "a string", item["tool_call_id"])
    return message


def _content(content: Any, where: str) -> str:
    """A string, or typed parts: text parts are joined with newlines; other kinds are refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _type_error(where, "a string or an array of content parts", content)
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict):
            raise _type_error(f"{where}[{i}]", "an object", part)
        kind = part.get("type")
        if kind != "text":
            raise InvalidRequestError(
                f"Invalid content part at '{where}[{i}]': only 'text' parts are supported by this text-only "
                f"model, got type {kind!r}.", f"{where}[{i}].type", code="invalid_value")
        if not isinstance(part.get("text"), str):
            raise _type_error(f"{where}[{i}].text", "a string", part.get("text"))
        texts.append(part["text"])
    return "\n".join(texts)


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """Assistant tool calls; `arguments` (a JSON string) is parsed for the template, as vLLM does,
    since templates render it with `tojson` or iterate over it."""
    if not isinstance(value, list):
        raise _type_error(where, "an array", value)
    calls = []
    for i, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequestError(f"Invalid '{where}[{i}]': expected {{\"id\", \"type\": \"function\", "
                                      f"\"function\": {{\"name\", \"arguments\"}}}}.", f"{where}[{i}]")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = bounds.loads(arguments)
            except bounds.JsonTooComplex as error:
                raise _value_error(f"{where}[{i}].function.arguments", f"{error}.") from None
            except ValueError:
                pass  # not JSON: keep the string, the template decides
        calls.append({**call, "function": {**function, "arguments": arguments}})
    return calls


def _tools(value: Any) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise _type_error("tools", "an array", value)
    if len(value) > bounds.MAX_TOOLS:
        raise _value_error("tools", f"at most {bounds.MAX_TOOLS} tools are allowed, but got {len(value)}.")
    names = set()
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _type_error(where, "an object", tool)
        if tool.get("type", "function") != "function":
            raise _value_error(f"{where}.type",
                               f"only 'function' tools are supported, got {tool.get('type')!r}.")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _missing(f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            raise _value_error(f"{where}.function.name", "a function name must be 1 to 64 characters among "
                                                         f"a-z, A-Z, 0-9, '_', '.' and '-', got {name!r}.")
        if name in names:
            raise _value_error(f"{where}.function.name", f"duplicate function name {name!r}.")
        names.add(name)
        for key in ("parameters", "arguments"):  # TGI's clients call the schema `arguments`
            if function.get(key) is not None and not isinstance(function[key], dict):
                raise _type_error(f"{where}.function.{key}", "a JSON schema object", function[key])
        if function.get("description") is not None and not isinstance(function["description"], str):
            raise _type_error(f"{where}.function.description", "a string", function["description"])
    return value or None


def _tool_choice(value: Any, tools: list | None) -> str | dict | None:
    if value is None:
        return None
    names = {t["function"]["name"] for t in tools or ()}
    if isinstance(value, str):
        if value in ("none", "auto"):
            return value
        if value == "required":
            if not tools:
                raise _value_error("tool_choice", "'required' needs 'tools'.")
            return value
        name = value  # TGI: a bare function name
    elif isinstance(value, dict):
        function = value.get("function")
        named = isinstance(function, dict) and isinstance(function.get("name"), str)
        if value.get("type") != "function" or not named:
            raise _value_error("tool_choice", "expected 'none', 'auto', 'required' or "
                                              "{\"type\": \"function\", \"function\": {\"name\": …}}.")
        name = function["name"]
    else:
        raise _type_error("tool_choice", "a string or an object", value)
    if name not in names:
        raise _value_error("tool_choice", f"no tool named {name!r} in 'tools'.")
    return {"type": "function", "function": {"name": name}}


def _response_format(value: Any, param: str) -> dict[str, Any] | None:
    """OpenAI's `text` / `json_object` / `json_schema{name, schema, strict}`, and TGI's grammar
    shapes `{"type": "json" | "json_object" | "regex", "value": …}` (huggingface_hub sends these)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _type_error(param, "an object", value)
    kind = value.get("type")
    allowed = RESPONSE_FORMATS if param == "response_format" else RESPONSE_FORMATS[1:]
    if kind not in allowed:
        raise _value_error(f"{param}.type", f"expected one of {', '.join(map(repr, allowed))}, got {kind!r}.")
    if kind == "json_schema" and "value" not in value:
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise _missing(f"{param}.json_schema")
        if not isinstance(spec.get("name"), str) or not _FUNCTION_NAME.match(spec["name"]):
            raise _value_error(f"{param}.json_schema.name",
                               "expected 1 to 64 characters among a-z, A-Z, 0-9, '_', '.' and '-'.")
        if spec.get("schema") is not None and not isinstance(spec["schema"], dict):
            raise _type_error(f"{param}.json_schema.schema", "a JSON schema object", spec["schema"])
        if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
            raise _type_error(f"{param}.json_schema.strict", "a boolean", spec["strict"])
    elif kind == "regex":
        if not isinstance(value.get("value"), str):
            raise _type_error(f"{param}.value", "a regular expression string", value.get("value"))
    elif kind in ("json", "json_object", "json_schema"):
        schema = value.get("value", value.get("schema"))
        if kind == "json" and schema is None:
            raise _missing(f"{param}.value")
        if schema is not None and not isinstance(schema, (dict, bool)):
            raise _type_error(f"{param}.value", "a JSON schema object", schema)
    return value


# ------------------------------------------------------------------------------ completions


def parse_completion_request(body: Any, limits: OpenAILimits) -> CompletionRequest:
    body = _require_object(body)
    model = _str(body, "model")
    if body.get("prompt") is None:
        raise _missing("prompt")
    prompts = _prompts(body["prompt"], limits)
    suffix = body.get("suffix")
    if suffix is not None and suffix != "":
        raise InvalidRequestError("'suffix' is not supported: this server does not do fill-in-the-middle "
                                  "completion.", "suffix", code="unsupported_parameter")
    echo = bool(_bool(body, "echo", False))
    max_tokens = _int(body, "max_tokens")
    sampling = _sampling(body, limits, max_tokens=16 if max_tokens is None else max_tokens,
                         min_max_tokens=0 if echo else 1)
    logprobs = _int(body, "logprobs", 0, limits.max_top_n_tokens)
    best_of = _int(body, "best_of", 1)
    if best_of is not None and best_of not in (1, sampling.n):
        raise InvalidRequestError("'best_of' other than 'n' is not supported (use 'n').", "best_of",
                                  code="unsupported_parameter")
    if len(prompts) * sampling.n > limits.max_n * limits.max_client_batch_size:
        raise _value_error("n", "too many choices in one request.")
    return CompletionRequest(model=model, prompts=prompts, sampling=sampling, echo=echo, logprobs=logprobs,
                             user=_str(body, "user"), raw=body)


def _prompts(value: Any, limits: OpenAILimits) -> list[str | list[int]]:
    if isinstance(value, str):
        prompts: list[str | list[int]] = [value]
    elif value and _is_ids(value):
        prompts = [value]  # one prompt as token ids
    elif isinstance(value, list):
        if not value:
            raise InvalidRequestError("Invalid 'prompt': empty array. Expected an array with minimum "
                                      "length 1.", "prompt", code="empty_array")
        prompts = []
        for item in value:
            if not isinstance(item, str) and not _is_ids(item):
                raise _type_error("prompt", "a string, an array of strings, an array of token ids or an "
                                            "array of token-id arrays", value)
            prompts.append(item)
    else:
        raise _type_error("prompt", "a string or an array", value)
    if len(prompts) > limits.max_client_batch_size:
        raise _value_error("prompt", f"at most {limits.max_client_batch_size} prompts per request "
                                     f"(--max-client-batch-size), but got {len(prompts)}.")
    for prompt in prompts:
        if len(prompt) == 0:
            raise _value_error("prompt", "a prompt cannot be empty.")
        if isinstance(prompt, list) and not all(0 <= t < limits.vocab_size for t in prompt):
            raise _value_error("prompt", f"token ids must be between 0 and {limits.vocab_size - 1}.")
    return prompts
