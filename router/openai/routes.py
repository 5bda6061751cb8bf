"""OpenAI-compatible routes: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, and
`/chat_tokenize`. Handlers are thin: parse (requests) → admission → template → validate →
run the choices (choices, Infer.stream) → shape (responses).

Admission comes first, as on TGI's routes (an overloaded server answers 429 before any parsing),
one permit per generation (`n` × prompts); permits are released when the response is done.
`n` choices and several prompts run as concurrent entries (router/openai/choices.py).

Errors after a stream has started arrive as one `data: {"error": {…}}` event, followed by
`data: [DONE]` (vLLM's behaviour; the OpenAI SDK raises at the error event).
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import aclosing
from dataclasses import replace

from aiohttp import web

from pytgi_common.grammar import GrammarError
from router import bounds
from router.api_models import ChatTokenizeResponse, SimpleToken
from router.errors import ContextLengthError, InvalidRequestError, RouterError, ValidationError
from router.events import ErrorEvent, TokenEvent
from router.grammar.validator import GrammarNotSupported
from router.http.sse import ClientGone, SseWriter
from router.openai import reasoning
from router.openai.chat_template import ChatTemplate
from router.openai.choices import collect, merge_streams, per_choice
from router.openai.constraints import Constraint, tool_prompt
from router.openai.models import Model, ModelList
from router.openai.requests import ChatRequest, Sampling, parse_chat_request, parse_completion_request
from router.openai.responses import ChatShaper, CompletionShaper, TokenStrings
from router.routes import note_adapter, read_json, tokenize_with_offsets
from router.schemas import GenerateParameters, GenerateRequest
from router.state import STATE, VERSION, AppState
from router.validation import ValidRequest

FINGERPRINT = f"pytgi-{VERSION}"
# Set on requests answered by these handlers (also via /invocations): errors use OpenAI's envelope.
OPENAI_REQUEST = web.RequestKey("openai", bool)
# OpenAI's `user` (an end-user id for abuse monitoring): shown on the request's access line.
END_USER = web.RequestKey("end_user", str)
# Content types read as JSON: JSON itself, and what curl (-d) and fetch (string body) send by default.
JSON_CONTENT_TYPES = ("application/json", "application/x-www-form-urlencoded", "text/plain")


async def read_openai_json(request: web.Request):
    if "Content-Type" in request.headers:
        mime = request.content_type
        if mime not in JSON_CONTENT_TYPES and not mime.endswith("+json"):
            raise InvalidRequestError(
                f"Unsupported Content-Type {mime!r}: send the body as JSON with "
                "'Content-Type: application/json'.",
                status=415, code="unsupported_media_type")
    try:
        return bounds.loads(await request.read())
    except bounds.JsonTooComplex as error:
        raise InvalidRequestError(f"The JSON body of your request is too complex: {error}.",
                                  code="invalid_json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidRequestError(f"We could not parse the JSON body of your request: {error}. The API "
                                  "expects a JSON payload.", code="invalid_json") from error


def generate_parameters(s: Sampling, top_n: int, decoder_input_details: bool = False) -> GenerateParameters:
    """OpenAI sampling → TGI parameters. OpenAI samples by default (`do_sample`); whether the
    values mean greedy is decided by the validator (pytgi_common/sampling.py), as for TGI's routes.
    OpenAI's "off" values (top_p / typical_p 1) are TGI's absent ones (TGI refuses 1), and top_p 0
    (only the most likely token) is argmax: temperature 0."""
    return GenerateParameters(
        do_sample=True, temperature=0.0 if s.top_p == 0.0 else s.temperature,
        top_p=None if s.top_p in (0.0, 1.0) else s.top_p, top_k=s.top_k,
        typical_p=None if s.typical_p == 1.0 else s.typical_p, min_p=s.min_p or None,
        repetition_penalty=s.repetition_penalty, frequency_penalty=s.frequency_penalty,
        presence_penalty=s.presence_penalty,
        max_new_tokens=None if s.max_tokens is None else max(s.max_tokens, 1),
        stop=list(s.stop), seed=s.seed, details=True, decoder_input_details=decoder_input_details,
        top_n_tokens=top_n,
    )


def with_system_text(messages: list[dict], text: str) -> list[dict]:
    """`messages` with `text` appended to the system message (one is added when there is none)."""
    if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def context_error(error: ContextLengthError, what: str) -> InvalidRequestError:
    if error.kind == "total":
        message = (f"This model's maximum context length is {error.limit} tokens. However, you requested "
                   f"{error.input_length + error.max_new_tokens} tokens ({error.input_length} in the {what}, "
                   f"{error.max_new_tokens} in the completion). Please reduce the length of the {what} or "
                   "completion.")
    else:
        message = (f"This model's maximum input length is {error.limit} tokens. However, your {what} "
                   f"resulted in {error.input_length} tokens. Please reduce the length of the {what}.")
    return InvalidRequestError(message, what, code="context_length_exceeded")


async def check_constraint(validator, constraint: Constraint | None) -> None:
    """Compile-check `constraint` (off the event loop; pinned on the shards while the request
    runs). Called once the request passed every cheaper rule: a request refused anyway never
    costs a compile. Failures are OpenAI 400s on the field the grammar came from."""
    if constraint is None:
        return
    try:
        await validator.check(constraint.grammar_type, constraint.grammar, constraint.param)
    except GrammarNotSupported as error:
        raise InvalidRequestError(f"'{constraint.param}' is not supported by this server (constrained decoding "
                                  "is disabled or unavailable).", constraint.param,
                                  code="unsupported_parameter") from error
    except GrammarError as error:
        raise InvalidRequestError(error.message, constraint.param, code="invalid_value") from error


def model_not_found(message: str) -> RouterError:
    return RouterError(message, status=404, error_type="model_not_found", param="model", code="model_not_found")


def note_user(request: web.Request, user: str | None) -> None:
    if user:
        request[END_USER] = user[:bounds.MAX_LOGGED_USER]


class Context:
    """Per-server objects the OpenAI routes need, built at startup."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        config = state.config
        self.template = ChatTemplate.from_tokenizer(state.tokenizer)
        templates = "\n".join(filter(None, [self.template.template, *self.template.named.values()]))
        self.reasoning = reasoning.resolve(config.reasoning_parser, templates)
        self.tokens = TokenStrings(state.tokenizer)
        self.limits = state.limits
        self.grammars = state.infer.validator.grammar
        self.created = int(time.time())
        # Importing transformers' renderer takes seconds: off the loop, and awaited before a render.
        self._warm = asyncio.get_running_loop().run_in_executor(None, self.template.warm_up)

    def select_model(self, requested: str | None) -> tuple[str, str]:
        """The `model` to answer with, and the LoRA adapter it names ("": the base model; the rule:
        router/adapters.py). Any other name runs the base model (lenient, like TGI) unless adapters
        are loaded (a misspelt adapter must not silently run the base model) or
        --strict-model-name is set: then it is a 404."""
        adapters = self.state.infer.validator.adapters
        if requested is None:
            return self.state.config.model_id, ""
        adapter = adapters.resolve(requested)
        if adapter is None and (adapters.ids or self.state.config.strict_model_name):
            raise model_not_found(f"The model {adapters.unknown(requested)}.")
        return requested, adapter or ""

    def model_cards(self) -> list[Model]:
        """The base model, then each LoRA adapter (`parent`: the base model, as vLLM lists them)."""
        base = self.state.config.model_id
        return [Model(id=base, object="model", created=self.created, owned_by="pytgi"),
                *(Model(id=adapter, object="model", created=self.created, owned_by="pytgi", parent=base)
                  for adapter in self.state.infer.validator.adapters.ids)]

    async def render(self, chat: ChatRequest) -> str:
        await asyncio.shield(self._warm)
        messages, tools = chat.messages, chat.tool_specs
        if chat.tools_active and not self.template.uses_tools(tools):
            # The template cannot show the tools: tell the model about them and about the call
            # format the grammar enforces, in the system message.
            messages = with_system_text(messages, tool_prompt(chat.tools, chat.tool_prompt))
        elif chat.tools_active and chat.tool_prompt:
            messages = with_system_text(messages, chat.tool_prompt)  # TGI: only the prompt then
        try:
            return await self.template.arender(messages, tools, chat.chat_template_kwargs)
        except RouterError as error:
            error.param = "messages"
            raise

    async def validate(self, prompt: str | list[int], sampling: Sampling, *, add_special_tokens: bool,
                       top_n: int, what: str, adapter_id: str, decoder_input_details: bool = False,
                       constraint=None) -> ValidRequest:
        ids = tuple(prompt) if isinstance(prompt, list) else None
        parameters = generate_parameters(sampling, top_n, decoder_input_details)
        parameters.adapter_id = adapter_id
        # A token-id prompt is decoded only once it is known to fit: decoding is work proportional
        # to a length the client chose.
        request = GenerateRequest(inputs=prompt if ids is None else " ", parameters=parameters,
                                  add_special_tokens=add_special_tokens, input_ids=ids)
        try:
            valid = await self.state.infer.validate(request)
        except ContextLengthError as error:
            raise context_error(error, what) from error
        except ValidationError as error:
            raise InvalidRequestError(error.reason, error.param) from error
        if ids is not None:
            valid = replace(valid, input_text=self.state.tokenizer.decode(ids))
        params = replace(valid.parameters, logit_bias=sampling.logit_bias, ignore_eos=sampling.ignore_eos,
                         include_stop=False, skip_special_tokens=True)
        if constraint is not None:
            params = replace(params, grammar_type=constraint.grammar_type, grammar=constraint.grammar)
        return replace(valid, parameters=params)


class Permits:
    """The admission permits one OpenAI request holds: one taken on entry (so an overloaded server
    answers 429 before any validation, like TGI), one more per extra generation ('n' × prompts),
    all given back on exit."""

    def __init__(self, state: AppState) -> None:
        self.infer = state.infer
        self.limit = state.config.max_concurrent_requests
        self.held = 0

    def __enter__(self) -> "Permits":
        self.infer.acquire()
        self.held = 1
        return self

    def cover(self, generations: int) -> None:
        if generations > self.limit:
            raise InvalidRequestError(f"This request asks for {generations} generations ('n' × prompts), more "
                                      f"than --max-concurrent-requests ({self.limit}).", "n")
        if generations > self.held:
            self.infer.acquire(generations - self.held)
            self.held = generations

    def __exit__(self, *exc) -> None:
        self.infer.release(self.held)


class OpenAIRoutes:
    def __init__(self) -> None:
        self.ctx: Context | None = None

    def add_to(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)
        app.router.add_post("/chat_tokenize", self.chat_tokenize)

    async def startup(self, app: web.Application) -> None:
        """Runs after the AppState exists (registered after the state's own startup)."""
        self.ctx = Context(app[STATE])

    async def invocations(self, request: web.Request, body) -> web.StreamResponse | None:
        """SageMaker `/invocations`: chat bodies (`messages`) and completion bodies (`prompt`)."""
        if isinstance(body, dict) and "messages" in body:
            return await self.chat_completions(request, body)
        if isinstance(body, dict) and "prompt" in body and "inputs" not in body:
            return await self.completions(request, body)
        return None

    # ------------------------------------------------------------------------------- chat

    async def chat_completions(self, request: web.Request, body=None) -> web.StreamResponse:
        body = await self._begin(request, body)
        ctx = self.ctx
        infer = ctx.state.infer
        with Permits(ctx.state) as permits:
            chat = parse_chat_request(body, ctx.limits)
            note_user(request, chat.user)
            model, adapter_id = ctx.select_model(chat.model)
            constraint = chat.constraint
            prompt = await ctx.render(chat)
            valid = await ctx.validate(prompt, chat.sampling, add_special_tokens=False, top_n=chat.top_logprobs,
                                       what="messages", adapter_id=adapter_id, constraint=constraint)
            note_adapter(request, valid)
            await check_constraint(ctx.grammars, constraint)
            valids = per_choice(valid, chat.sampling.n)
            permits.cover(len(valids))
            shaper = ChatShaper(model, FINGERPRINT, ctx.tokens, include_usage=chat.sampling.include_usage,
                                logprobs=chat.logprobs,
                                tool_calls=constraint is not None and constraint.tool_call,
                                # A grammar that shapes the whole output leaves no room for `<think>`.
                                reasoning=ctx.reasoning and (constraint is None or constraint.free_text),
                                inside=reasoning.starts_inside(prompt))
            shaper.prompt_tokens = valid.input_length
            if chat.sampling.stream:
                first = [shaper.role_chunk(i) for i in range(len(valids))]
                return await self._stream(request, valids, shaper, first, shaper.chunks)
            choices = await collect(infer, valids, [0] * len(valids))
            return web.json_response(shaper.response(choices))

    # ------------------------------------------------------------------------ completions

    async def completions(self, request: web.Request, body=None) -> web.StreamResponse:
        body = await self._begin(request, body)
        ctx = self.ctx
        infer = ctx.state.infer
        with Permits(ctx.state) as permits:
            req = parse_completion_request(body, ctx.limits)
            note_user(request, req.user)
            model, adapter_id = ctx.select_model(req.model)
            sampling = req.sampling
            score_only = sampling.max_tokens == 0  # echo + max_tokens 0: the prompt's logprobs only
            details = req.echo and req.logprobs is not None
            valids, prompt_indexes, texts, prompt_tokens = [], [], [], 0
            for index, prompt in enumerate(req.prompts):
                valid = await ctx.validate(prompt, sampling, add_special_tokens=True, top_n=req.logprobs or 0,
                                           what="prompt", adapter_id=adapter_id, decoder_input_details=details)
                note_adapter(request, valid)
                prompt_tokens += valid.input_length
                texts.append(valid.input_text)
                valids += per_choice(valid, sampling.n)
                prompt_indexes += [index] * sampling.n
            permits.cover(len(valids))
            shaper = CompletionShaper(model, FINGERPRINT, ctx.tokens, include_usage=sampling.include_usage,
                                      prompts=texts, echo=req.echo, logprobs=req.logprobs,
                                      score_only=score_only)
            shaper.prompt_tokens = prompt_tokens
            if sampling.stream:
                return await self._stream(request, valids, shaper, [],
                                          lambda i, event: shaper.chunks(i, prompt_indexes[i], event))
            return web.json_response(shaper.response(await collect(infer, valids, prompt_indexes)))

    async def _begin(self, request: web.Request, body):
        """Every OpenAI request: errors in the OpenAI envelope (also on /invocations), the body,
        the request counter."""
        request[OPENAI_REQUEST] = True
        if body is None:
            body = await read_openai_json(request)
        self.ctx.state.metrics.request_count.inc()
        return body

    # ----------------------------------------------------------------------------- stream

    async def _stream(self, request: web.Request, valids, shaper, first: list[dict],
                      shape) -> web.StreamResponse:
        config = self.ctx.state.config
        writer = await SseWriter.open(request, keep_alive_seconds=config.sse_keep_alive_seconds)
        try:
            for chunk in first:
                await writer.send(chunk)
            failed = False
            events = writer.with_keep_alive(merge_streams(self.ctx.state.infer, valids))
            async with aclosing(events):
                async for index, event in events:
                    if isinstance(event, ErrorEvent):
                        await writer.send(event.error.to_openai())
                        failed = True
                        break
                    assert isinstance(event, TokenEvent)
                    for chunk in shape(index, event):
                        await writer.send(chunk)
            if shaper.include_usage and not failed:
                await writer.send(shaper.usage_chunk())
            await writer.send("[DONE]")
        except ClientGone:
            pass  # closing the merged stream above cancelled every choice
        await writer.close()
        return writer.response

    # ---------------------------------------------------------------------- models, tokenize

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(ModelList(object="list", data=self.ctx.model_cards()))

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        for card in self.ctx.model_cards():
            if card["id"] == name:
                return web.json_response(card)
        raise model_not_found(f"The model `{name}` does not exist.")

    async def chat_tokenize(self, request: web.Request) -> web.Response:
        """TGI's `/chat_tokenize`: the templated prompt and its tokens (TGI error shape)."""
        chat = parse_chat_request(await read_json(request), self.ctx.limits)
        validator = self.ctx.state.infer.validator
        validator.check_stop(chat.sampling.stop)  # the body is a chat request: its rules hold here too
        prompt = await self.ctx.render(chat)
        validator.refuse_certainly_too_long(prompt)
        tokens = await tokenize_with_offsets(self.ctx.state.tokenizer, prompt, add_special_tokens=False)
        return web.json_response(ChatTokenizeResponse(
            tokenize_response=[SimpleToken(id=i, text=prompt[start:stop], start=start, stop=stop)
                               for i, start, stop in tokens],
            templated_text=prompt))
