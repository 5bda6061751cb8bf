"""Router errors: each knows its HTTP status, TGI `error_type` and message.

Native TGI routes answer `{"error": message, "error_type": error_type}` (`to_tgi`: api_models'
ErrorResponse); the OpenAI routes (`/v1/*`) wrap the same error in OpenAI's envelope (`to_openai`:
router/openai/models.py's OpenAIErrorResponse). Messages follow TGI's
`InferError` / `ValidationError` display strings (router/src/infer/mod.rs, validation.rs).
"""

from __future__ import annotations

from router.api_models import ErrorResponse
from router.openai.models import ErrorType, OpenAIError, OpenAIErrorResponse


class RouterError(Exception):
    """Base of every error a route turns into an HTTP response."""

    status: int = 500
    error_type: str = "internal"
    # OpenAI envelope extras: the request field at fault, and OpenAI's string code
    # (e.g. "context_length_exceeded"); `code` falls back to `error_type`.
    param: str | None = None
    code: str | None = None

    def __init__(self, message: str, *, status: int | None = None, error_type: str | None = None,
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if error_type is not None:
            self.error_type = error_type
        if param is not None:
            self.param = param
        if code is not None:
            self.code = code

    def to_tgi(self) -> ErrorResponse:
        return ErrorResponse(error=self.message, error_type=self.error_type)

    @property
    def openai_status(self) -> int:
        """OpenAI answers invalid requests with 400 where TGI uses 422, and a failed generation
        (TGI's 424) is a server error to OpenAI clients."""
        return {422: 400, 424: 500}.get(self.status, self.status)

    def to_openai(self) -> OpenAIErrorResponse:
        return OpenAIErrorResponse(error=OpenAIError(
            message=self.message, type=_openai_type(self.openai_status), param=self.param,
            code=self.code or self.error_type))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.error_type!r}, {self.message!r})"


def _openai_type(status: int) -> ErrorType:
    # OpenAI's `type` names the error family; `code` carries TGI's finer error_type.
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if 400 <= status < 500:
        return "invalid_request_error"
    return "server_error"


class ValidationError(RouterError):
    """422 `validation`. TGI prefixes the message with "Input validation error: ".

    `prefix=False` keeps the message as given: request-body deserialization errors, which TGI
    (axum's Json extractor) reports without the prefix.
    """

    status = 422
    error_type = "validation"

    def __init__(self, message: str, *, prefix: bool = True, param: str | None = None) -> None:
        self.reason = message  # the bare rule text, without the prefix
        # `param`: the field the rule is about, for the OpenAI routes' 400 (TGI's body has no such key)
        super().__init__(f"Input validation error: {message}" if prefix else message, param=param)


class InvalidRequestError(RouterError):
    """400 on the OpenAI routes: a request that breaks one of their rules; `param` names the
    field (OpenAI's `invalid_request_error`)."""

    status = 400
    error_type = "validation"

    def __init__(self, message: str, param: str | None = None, *, code: str | None = None,
                 status: int | None = None) -> None:
        super().__init__(message, param=param, code=code, status=status)


class ContextLengthError(ValidationError):
    """A prompt (plus the tokens to generate) that does not fit the model's limits. The TGI message
    is kept; the numbers let the OpenAI layer word it OpenAI's way."""

    code = "context_length_exceeded"

    def __init__(self, message: str, *, input_length: int, max_new_tokens: int, limit: int,
                 kind: str) -> None:
        super().__init__(message)
        self.input_length = input_length
        self.max_new_tokens = max_new_tokens
        self.limit = limit
        self.kind = kind  # "total": input + max_new_tokens > limit; "input": input > limit


class OverloadedError(RouterError):
    status = 429
    error_type = "overloaded"

    def __init__(self, message: str = "Model is overloaded") -> None:
        super().__init__(message)


class GenerationError(RouterError):
    """424: the request failed while it ran. `detail` is what went wrong inside (a shard's error
    text, with its socket path): for the log and the request's trace, never for the client."""

    status = 424
    error_type = "generation"

    def __init__(self, message: str, detail: str | None = None) -> None:
        self.detail = detail
        super().__init__(f"Request failed during generation: {message}")


class IncompleteGenerationError(RouterError):
    status = 500
    error_type = "incomplete_generation"

    def __init__(self, message: str = "Incomplete generation") -> None:
        super().__init__(message)


class UnhealthyError(RouterError):
    status = 503
    error_type = "healthcheck"

    def __init__(self, message: str = "unhealthy") -> None:
        super().__init__(message)


class TemplateError(RouterError):
    status = 422
    error_type = "template_error"

    def __init__(self, message: str) -> None:
        super().__init__(f"Template error: {message}")


class PayloadTooLargeError(RouterError):
    status = 413
    error_type = "payload_too_large"

    def __init__(self, message: str = "Payload Too Large") -> None:
        super().__init__(message)


class RequestTimeoutError(RouterError):
    """408: the request ran past a server deadline (`--request-timeout` for the whole generation,
    or `--client-body-timeout` for receiving the body). 408 rather than 504 because no gateway
    waited on an upstream: the limit is this server's policy for this request. OpenAI's SDK and
    LiteLLM read 408 as a timeout (and retry it), which is what a client should do about it."""

    status = 408
    error_type = "request_timeout"


class DrainingError(RouterError):
    """503 while the router shuts down: in-flight requests finish, new ones go elsewhere."""

    status = 503
    error_type = "unavailable"

    def __init__(self, message: str = "The server is shutting down; retry on another replica") -> None:
        super().__init__(message)


class AuthenticationError(RouterError):
    """401: no or wrong API key. TGI's body is `{"error": "Unauthorized", ...}`; the OpenAI
    envelope carries OpenAI's own message and code."""

    status = 401
    error_type = "authentication"
    code = "invalid_api_key"

    def __init__(self, message: str = "Unauthorized") -> None:
        super().__init__(message)
