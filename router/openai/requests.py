"""OpenAI request bodies (`/v1/chat/completions`, `/v1/completions`) → typed, validated requests.

Every rule answers 400 `invalid_request_error` with `param` naming the field, in OpenAI's wording
(router/openai/fields.py reads one field; router/openai/chat_fields.py checks a chat body's
messages, tools and formats). Unknown fields are ignored, as vLLM and TGI do.

Sampling semantics (README "OpenAI API" lists them):
- `temperature` ∈ [0, 2], default 1 with sampling; 0 = greedy. `top_p` ∈ [0, 1]: 1 = off and
  0 = greedy. `frequency_penalty` / `presence_penalty` ∈ [-2, 2], OpenAI's additive form.
- `logit_bias`: token-id string keys (in the vocabulary) → bias ∈ [-100, 100].
- `stop`: a string or a list (at most `--max-stop-sequences`: the validator's rule), matched on
  text and stripped.
- `n` ∈ [1, MAX_N]; each choice samples with its own seed (`seed + i` when a seed is given).
- TGI/vLLM extras: `top_k` (≤ 0 = off), `repetition_penalty` (> 0), `typical_p` ∈ (0, 1],
  `min_p` ∈ [0, 1], `ignore_eos`.
- `tools` / `tool_choice` / `response_format` / `grammar` are read into typed values
  (chat_fields.py) and combined into one grammar (constraints.py); whether it compiles is
  checked by the handler before the request is queued.
- `tool_prompt` (TGI's): the text that introduces the tools where the chat template cannot show
  them; `user` is logged with the request.
- `chat_template_kwargs` (vLLM's extra): an object of extra chat-template variables, none of them
  one the renderer sets itself (router.openai.chat_template.RESERVED_KWARGS).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from router import bounds
from router.errors import InvalidRequestError
from router.limits import Limits
from router.openai.chat_fields import (
    read_messages,
    read_response_format,
    read_template_kwargs,
    read_tool_choice,
    read_tools,
)
from router.openai.constraints import Constraint, ContentFormat, Tool, ToolChoice, build_constraint
from router.openai.fields import (
    is_ids,
    missing,
    read_bool,
    read_int,
    read_number,
    read_object,
    read_str,
    require_object,
    type_error,
    value_error,
)

SEED_RANGE = (-(2**63), 2**64 - 1)
_TOKEN_ID = re.compile(r"^[0-9]{1,10}\Z")


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


@dataclass(slots=True)
class ChatRequest:
    model: str | None
    messages: list[dict[str, Any]]  # content normalized to a string (or None beside tool_calls)
    sampling: Sampling
    logprobs: bool = False
    top_logprobs: int = 0
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = ToolChoice("none")
    # What `response_format` or TGI's `grammar` extra asks the content to be (None: free text).
    content_format: ContentFormat | None = None
    parallel_tool_calls: bool | None = None
    tool_prompt: str | None = None  # TGI's: leads the tools' description where the template has none
    user: str | None = None  # shown on the request's access line (routes.note_user)
    chat_template_kwargs: dict[str, Any] | None = None
    # The grammar that honours tools / tool_choice / the content format (None: unconstrained).
    constraint: Constraint | None = None

    @property
    def tool_specs(self) -> list[dict[str, Any]] | None:
        """The tools as sent, for the chat template (None: no tools)."""
        return [tool.spec for tool in self.tools] or None

    @property
    def tools_active(self) -> bool:
        return self.tool_choice.mode != "none"


@dataclass(slots=True)
class CompletionRequest:
    model: str | None
    prompts: list[str | list[int]]
    sampling: Sampling
    echo: bool = False
    logprobs: int | None = None
    user: str | None = None  # shown on the request's access line (routes.note_user)


# ---------------------------------------------------------------------------- shared sampling


def _sampling(body: dict, limits: Limits, *, max_tokens: int | None,
              min_max_tokens: int = 1) -> Sampling:
    s = Sampling()
    s.max_tokens = max_tokens
    if s.max_tokens is not None and s.max_tokens < min_max_tokens:
        param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        raise value_error(param, f"expected an integer >= {min_max_tokens}, but got {s.max_tokens} instead.")
    s.temperature = read_number(body, "temperature", 0.0, 2.0)
    s.top_p = read_number(body, "top_p", 0.0, 1.0)
    s.frequency_penalty = read_number(body, "frequency_penalty", -2.0, 2.0)
    s.presence_penalty = read_number(body, "presence_penalty", -2.0, 2.0)
    s.min_p = read_number(body, "min_p", 0.0, 1.0)
    s.typical_p = read_number(body, "typical_p", 0.0, 1.0, open_low=True)
    s.repetition_penalty = read_number(body, "repetition_penalty", 0.0, math.inf, open_low=True)
    top_k = read_int(body, "top_k", -bounds.I32_MAX - 1, bounds.I32_MAX)  # TGI's i32; <= 0 means off
    s.top_k = top_k if top_k is not None and top_k > 0 else None
    s.logit_bias = _logit_bias(body.get("logit_bias"), limits.vocab_size)
    s.stop = _stop(body.get("stop"))
    seed = read_int(body, "seed", *SEED_RANGE)
    s.seed = None if seed is None else seed % 2**64
    n = read_int(body, "n", 1, limits.max_n)
    s.n = 1 if n is None else n
    s.ignore_eos = bool(read_bool(body, "ignore_eos", False))
    s.stream = bool(read_bool(body, "stream", False))
    options = read_object(body, "stream_options")
    if options is not None:
        if not s.stream:
            raise InvalidRequestError("The 'stream_options' parameter is only allowed when 'stream' is "
                                      "enabled.", "stream_options")
        s.include_usage = bool(read_bool(options, "include_usage", False, "stream_options.include_usage"))
    return s


def _logit_bias(value: Any, vocab_size: int) -> tuple[tuple[int, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise type_error("logit_bias", "an object mapping token ids to bias values", value)
    if len(value) > bounds.MAX_LOGIT_BIAS:
        raise value_error("logit_bias", f"at most {bounds.MAX_LOGIT_BIAS} entries are allowed, but got "
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


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise type_error("stop", "a string or an array of strings", value)
    # How many and how long: the validator's rules (router/validation.py), for both APIs.
    return tuple(stops)


# ------------------------------------------------------------------------------------ chat


def parse_chat_request(body: Any, limits: Limits) -> ChatRequest:
    body = require_object(body)
    model = read_str(body, "model")
    if body.get("messages") is None:
        raise missing("messages")
    messages = read_messages(body["messages"], limits.max_input_tokens)
    if body.get("functions") is not None or body.get("function_call") is not None:
        raise InvalidRequestError("'functions' and 'function_call' are deprecated and not supported; use "
                                  "'tools' and 'tool_choice'.", "functions")
    # Both are checked, whichever is used (max_completion_tokens wins): a bad value is never ignored.
    max_completion_tokens = read_int(body, "max_completion_tokens", 1)
    max_tokens = read_int(body, "max_tokens", 1)
    if max_completion_tokens is not None:
        max_tokens = max_completion_tokens
    sampling = _sampling(body, limits, max_tokens=max_tokens)
    logprobs = bool(read_bool(body, "logprobs", False))
    top_logprobs = read_int(body, "top_logprobs", 0, limits.max_top_n_tokens)
    if top_logprobs is not None and not logprobs:
        raise InvalidRequestError("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs")
    tools = read_tools(body.get("tools"))
    tool_choice = read_tool_choice(body.get("tool_choice"), tools)
    if body.get("grammar") is not None and body.get("response_format") is not None:
        raise InvalidRequestError("'grammar' and 'response_format' cannot both be set.", "grammar")
    content = (read_response_format(body.get("response_format"), "response_format")
               or read_response_format(body.get("grammar"), "grammar"))
    parallel_tool_calls = read_bool(body, "parallel_tool_calls")
    return ChatRequest(
        model=model, messages=messages, sampling=sampling, logprobs=logprobs, top_logprobs=top_logprobs or 0,
        tools=tools, tool_choice=tool_choice, content_format=content, parallel_tool_calls=parallel_tool_calls,
        tool_prompt=read_str(body, "tool_prompt"), user=read_str(body, "user"),
        chat_template_kwargs=read_template_kwargs(body),
        constraint=build_constraint(tools, tool_choice, content, parallel_tool_calls),
    )


# ------------------------------------------------------------------------------ completions


def parse_completion_request(body: Any, limits: Limits) -> CompletionRequest:
    body = require_object(body)
    model = read_str(body, "model")
    if body.get("prompt") is None:
        raise missing("prompt")
    prompts = _prompts(body["prompt"], limits)
    suffix = body.get("suffix")
    if suffix is not None and suffix != "":
        raise InvalidRequestError("'suffix' is not supported: this server does not do fill-in-the-middle "
                                  "completion.", "suffix", code="unsupported_parameter")
    echo = bool(read_bool(body, "echo", False))
    max_tokens = read_int(body, "max_tokens")
    sampling = _sampling(body, limits, max_tokens=16 if max_tokens is None else max_tokens,
                         min_max_tokens=0 if echo else 1)
    logprobs = read_int(body, "logprobs", 0, limits.max_top_n_tokens)
    best_of = read_int(body, "best_of", 1)
    if best_of is not None and best_of not in (1, sampling.n):
        raise InvalidRequestError("'best_of' other than 'n' is not supported (use 'n').", "best_of",
                                  code="unsupported_parameter")
    if len(prompts) * sampling.n > limits.max_n * limits.max_client_batch_size:
        raise value_error("n", "too many choices in one request.")
    return CompletionRequest(model=model, prompts=prompts, sampling=sampling, echo=echo, logprobs=logprobs,
                             user=read_str(body, "user"))


def _prompts(value: Any, limits: Limits) -> list[str | list[int]]:
    if isinstance(value, str):
        prompts: list[str | list[int]] = [value]
    elif value and is_ids(value):
        prompts = [value]  # one prompt as token ids
    elif isinstance(value, list):
        if not value:
            raise InvalidRequestError("Invalid 'prompt': empty array. Expected an array with minimum "
                                      "length 1.", "prompt", code="empty_array")
        prompts = []
        for item in value:
            if not isinstance(item, str) and not is_ids(item):
                raise type_error("prompt", "a string, an array of strings, an array of token ids or an "
                                           "array of token-id arrays", value)
            prompts.append(item)
    else:
        raise type_error("prompt", "a string or an array", value)
    if len(prompts) > limits.max_client_batch_size:
        raise value_error("prompt", f"at most {limits.max_client_batch_size} prompts per request "
                                    f"(--max-client-batch-size), but got {len(prompts)}.")
    for prompt in prompts:
        if len(prompt) == 0:
            raise value_error("prompt", "a prompt cannot be empty.")
        if isinstance(prompt, list) and not all(0 <= t < limits.vocab_size for t in prompt):
            raise value_error("prompt", f"token ids must be between 0 and {limits.vocab_size - 1}.")
    return prompts
