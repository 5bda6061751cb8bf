"""TGI's native routes. Handlers are thin: parse → Infer → shape the response (the typed bodies
of router/api_models.py, which the OpenAPI document is generated from)."""

from __future__ import annotations

import json
import time

from aiohttp import web

from router import bounds
from router.api_models import (
    BestOfSequence,
    Details,
    ErrorResponse,
    GenerateResponse,
    PrefillToken,
    SimpleToken,
    StreamDetails,
    StreamResponse,
    Token,
)
from router.errors import UnhealthyError, ValidationError
from router.events import ErrorEvent, Finish, TokenEvent, TokenInfo
from router.http.sse import ClientGone, SseWriter
from router.infer import Generated
from router.schemas import parse_generate_request
from router.state import STATE
from router.validation import ValidRequest

COMPUTE_TYPE = "cpu+optimized"
# The LoRA adapter a request ran with (router/adapters.py): shown on its access line (router/app.py).
ADAPTER = web.RequestKey("adapter", str)


def note_adapter(request: web.Request, valid: ValidRequest) -> None:
    if valid.adapter_id:
        request[ADAPTER] = valid.adapter_id


def token_json(token: TokenInfo) -> Token:
    return Token(id=token.id, text=token.text, logprob=token.logprob, special=token.special)


def prefill_token_json(token: TokenInfo) -> PrefillToken:
    return PrefillToken(id=token.id, text=token.text, logprob=token.logprob)


def details_json(generated: Generated) -> Details:
    finish = generated.finish
    details = Details(
        finish_reason=finish.finish_reason, generated_tokens=finish.generated_tokens, seed=finish.seed,
        prefill=[prefill_token_json(t) for t in finish.prefill],
        tokens=[token_json(t.token) for t in generated.tokens],
    )
    if any(t.top_tokens for t in generated.tokens):
        details["top_tokens"] = [[token_json(x) for x in t.top_tokens] for t in generated.tokens]
    return details


def best_of_json(generated: Generated) -> BestOfSequence:
    return BestOfSequence(generated_text=generated.finish.generated_text, **details_json(generated))


def generate_json(best: Generated, others: list[Generated], details: bool) -> GenerateResponse:
    """The body of /generate (one element of /'s list); `details`: details or decoder_input_details."""
    body = GenerateResponse(generated_text=best.finish.generated_text)
    if details:
        body["details"] = details_json(best)
        if others:
            body["details"]["best_of_sequences"] = [best_of_json(g) for g in others]
    return body


def timing_headers(generated: Generated, start: float) -> dict[str, str]:
    finish = generated.finish
    now = time.monotonic()
    inference = finish.finished_at - finish.batched_at
    ms = lambda seconds: str(int(max(seconds, 0) * 1000))  # noqa: E731
    return {
        "x-compute-type": COMPUTE_TYPE,
        "x-compute-time": f"{now - start:.6f}",
        "x-compute-characters": str(len(generated.request.input_text)),
        "x-total-time": ms(now - start),
        "x-validation-time": ms(generated.validated_at - start),
        "x-queue-time": ms(finish.batched_at - finish.queued_at),
        "x-inference-time": ms(inference),
        "x-time-per-token": ms(inference / max(finish.generated_tokens, 1)),
        "x-prompt-tokens": str(finish.input_length),
        "x-generated-tokens": str(finish.generated_tokens),
    }


async def read_json(request: web.Request):
    # Parsed from the bytes, as serde_json does: the Content-Type's charset is not trusted (an
    # unknown one made `request.json()` raise LookupError), and invalid UTF-8 is a syntax error.
    try:
        return bounds.loads(await request.read())
    except bounds.JsonTooComplex as error:
        raise ValidationError(f"Failed to deserialize the JSON body into the target type: {error}",
                              prefix=False) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        error_400 = ValidationError(f"Failed to parse the request body as JSON: {error}", prefix=False)
        error_400.status = 400  # a syntax error, not a wrong shape (axum: 400 vs 422)
        raise error_400 from error


async def tokenize_with_offsets(tokenizer, text: str,
                                add_special_tokens: bool = True) -> list[tuple[int, int, int]]:
    """(id, start, stop) per token; text the tokenizer cannot take (a lone surrogate from a
    `\\ud800` escape) is a 422, as it is for generation (router/validation.py)."""
    try:
        return await tokenizer.aencode_with_offsets(text, add_special_tokens)
    except Exception as error:  # the Rust tokenizer's failures surface as assorted exceptions
        raise ValidationError(f"tokenizer error {error}") from error


class TgiRoutes:
    """Handlers read the AppState from the app at request time: it only exists after startup,
    while routes must be registered before the app starts.

    `invocations(request, body)` may answer `/invocations` bodies that are not generate-shaped
    (the OpenAI routes take chat and completion bodies); it returns None for the others."""

    def __init__(self, invocations=None) -> None:
        self._invocations = invocations

    def add_to(self, app: web.Application) -> None:
        app.router.add_post("/generate", self.generate)
        app.router.add_post("/generate_stream", self.generate_stream)
        app.router.add_post("/", self.compat)
        app.router.add_post("/invocations", self.invocations)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_get("/info", self.info)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ping", self.health)
        app.router.add_get("/metrics", self.metrics)

    async def generate(self, request: web.Request) -> web.Response:
        body = parse_generate_request(await read_json(request), compat=False)
        return await self._generate(request, body, compat=False)

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, parse_generate_request(await read_json(request), compat=False))


    async def invocations(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        if self._invocations is not None:
            response = await self._invocations(request, body)
            if response is not None:
                return response
        return await self.compat(request, body)

    async def compat(self, request: web.Request, body=None) -> web.StreamResponse:
        """`POST /` and `/invocations`: a list for non-stream bodies, SSE for `stream: true`."""
        body = parse_generate_request(await read_json(request) if body is None else body, compat=True)
        if body.stream:
            return await self._stream(request, body)
        return await self._generate(request, body, compat=True)

    async def _generate(self, request: web.Request, body, compat: bool) -> web.Response:
        start = time.monotonic()
        state = request.app[STATE]
        infer = state.infer
        state.metrics.request_count.inc()
        # TGI takes a permit before validating (an overloaded server answers 429 first), and one
        # more per extra best_of sequence.
        infer.acquire()
        permits = 1
        try:
            valid = await infer.validate(body)
            note_adapter(request, valid)
            if valid.parameters.best_of > 1:
                infer.acquire(valid.parameters.best_of - 1)
                permits = valid.parameters.best_of
                best, others = await infer.generate_best_of(valid)
            else:
                best, others = await infer.generate(valid), []
        finally:
            infer.release(permits)
        params = valid.parameters
        payload = generate_json(best, others, params.details)  # decoder_input_details implies details
        return web.json_response([payload] if compat else payload, headers=timing_headers(best, start))

    async def _stream(self, request: web.Request, body) -> web.StreamResponse:
        state = request.app[STATE]
        infer = state.infer
        state.metrics.request_count.inc()
        body.stream = True
        # Admission and validation happen before the stream opens so that clients get real
        # 429 / 422 statuses; anything later arrives as an error event.
        infer.acquire()
        try:
            valid = await infer.validate(body)
            note_adapter(request, valid)
            writer = await SseWriter.open(request, {
                "x-compute-type": COMPUTE_TYPE, "x-compute-characters": str(len(valid.input_text))},
                keep_alive_seconds=state.config.sse_keep_alive_seconds)
            events = writer.with_keep_alive(infer.stream(valid))
            try:
                async for event in events:
                    await writer.send(self._stream_event(event, valid.parameters.details))
            except ClientGone:
                pass  # leaving the iterator cancels the request
            finally:
                await events.aclose()
            await writer.close()
            return writer.response
        finally:
            infer.release()

    @staticmethod
    def _stream_event(event, details: bool) -> StreamResponse | ErrorResponse:
        if isinstance(event, ErrorEvent):
            return event.error.to_tgi()
        assert isinstance(event, TokenEvent)
        finish: Finish | None = event.finish
        last = None
        if finish and details:
            last = StreamDetails(finish_reason=finish.finish_reason, generated_tokens=finish.generated_tokens,
                                 seed=finish.seed, input_length=finish.input_length)
        out = StreamResponse(index=event.index, token=token_json(event.token),
                             generated_text=finish.generated_text if finish else None, details=last)
        if event.top_tokens:
            out["top_tokens"] = [token_json(t) for t in event.top_tokens]
        return out

    async def tokenize(self, request: web.Request) -> web.Response:
        body = parse_generate_request(await read_json(request), compat=False)
        state = request.app[STATE]
        state.infer.validator.refuse_certainly_too_long(body.inputs)
        tokens = await tokenize_with_offsets(state.tokenizer, body.inputs)
        return web.json_response([
            SimpleToken(id=token_id, text=body.inputs[start:stop], start=start, stop=stop)
            for token_id, start, stop in tokens
        ])

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response(request.app[STATE].info_json())

    async def health(self, request: web.Request) -> web.Response:
        if not await request.app[STATE].check_health():
            raise UnhealthyError()
        return web.Response(status=200)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=request.app[STATE].metrics.render(), content_type="text/plain", charset="utf-8")
