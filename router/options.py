"""The router's options, written once.

`text-generation-router`'s click options are generated from `OPTIONS` (router/cli.py), the
launcher builds its options of the same names from it (help, type and default: launcher/cli.py)
and forwards those the user set (launcher/commands.py). So a default shown by either `--help` is
the default that runs, whichever process reads it. Click-free: the launcher imports it before it
decides anything.

Each option's flag is `--name-with-dashes` and its env var the name in upper case (TGI's names).
"""

from __future__ import annotations

from dataclasses import dataclass

from router.openai.reasoning import CHOICES as REASONING_PARSERS


@dataclass(frozen=True, slots=True)
class Option:
    name: str  # the RouterConfig field and the option's dest
    type: type  # int, float, str; bool: a flag; tuple: repeatable (strings)
    default: object
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def envvar(self) -> str:
        return self.name.upper()


def _o(name: str, type_: type, default: object, help: str, choices: tuple[str, ...] | None = None) -> Option:
    return Option(name, type_, default, help, choices)


# The options the launcher also takes and forwards (the ones the user set). max_input_tokens is
# forwarded too, under either of the launcher's two names (--max-input-length, TGI's old alias).
OPTIONS: tuple[Option, ...] = (
    _o("validation_workers", int, 2, "Tokenizer/validation workers in the router; must be > 0."),
    _o("max_concurrent_requests", int, 128, "Requests in flight before new ones get 429."),
    _o("max_best_of", int, 2, "Largest `best_of` a request may ask for."),
    _o("max_stop_sequences", int, 4, "Most stop sequences per request."),
    _o("max_top_n_tokens", int, 5, "Largest `top_n_tokens` per request."),
    _o("max_input_tokens", int, None, "Longest prompt in tokens (default: decided by the router/shards)."),
    _o("max_total_tokens", int, None, "Longest prompt + generation in tokens (default: decided at warmup)."),
    # TGI's launcher default (its router's own, 1.2, never runs under the launcher).
    _o("waiting_served_ratio", float, 0.3,
       "Waiting/running ratio that forces a prefill into a decode batch (shards without chunked prefill)."),
    _o("max_batch_prefill_tokens", int, None,
       "Token budget of one prefill step (default: 512 on CPU, 4096 on GPU)."),
    _o("max_batch_total_tokens", int, None,
       "Token budget of a whole batch incl. KV cache (default: inferred at warmup)."),
    _o("max_waiting_tokens", int, 20,
       "Decode steps a waiting request may wait before a forced prefill (shards without chunked prefill)."),
    _o("max_batch_size", int, None, "Most requests in one batch (default: no limit)."),
    _o("json_output", bool, False, "Log JSON lines (under the launcher: launcher, router and shards)."),
    _o("otlp_endpoint", str, None,
       "OpenTelemetry gRPC endpoint for the router's traces, e.g. http://127.0.0.1:4317."),
    _o("otlp_service_name", str, "text-generation-inference.router", "OpenTelemetry service name."),
    _o("cors_allow_origin", tuple, (),
       "Origin allowed to read responses cross-origin (repeatable; `*`: any; default: none, CORS off)."),
    _o("api_key_file", str, None, "More accepted API keys, one per line (blank and # lines ignored)."),
    _o("tokenizer_config_path", str, None,
       "tokenizer_config.json to use instead of the model's (chat template)."),
    _o("disable_grammar_support", bool, False, "Reject grammar-constrained requests (422)."),
    _o("max_client_batch_size", int, 4, "Most prompts in one /v1/completions request."),
    _o("strict_model_name", bool, False,
       "OpenAI routes: 404 for a `model` other than the served one or \"tgi\" (default: any name)."),
    _o("reasoning_parser", str, "auto",
       "Chat completions: a thinking model's `<think>` section as `reasoning_content`, apart from `content`. "
       "auto: when the chat template has `<think>` and `</think>`; none: off; think (or deepseek_r1, qwen3): "
       "always.", REASONING_PARSERS),
    _o("payload_limit", int, 2_000_000, "Largest HTTP request body in bytes (413 above)."),
    _o("graceful_termination_timeout", int, 90,
       "Seconds between SIGTERM and SIGKILL when stopping the router and shards; the router drains in-flight "
       "requests (streams included) meanwhile, new ones get 503."),
    _o("disable_prefix_caching", bool, False, "Turn off the router's prefix cache."),
    _o("request_timeout", float, None,
       "Seconds a generation may take from queueing to its last token; then it is cancelled and answered "
       "408 (default: no limit)."),
    _o("client_header_timeout", float, 15.0,
       "Seconds the router waits for a request's headers (also the idle keep-alive limit)."),
    _o("client_body_timeout", float, 60.0,
       "Seconds the router waits for a request's body once its headers arrived (408 after)."),
    _o("disable_playground", bool, False,
       "Do not serve the browser playground: GET / then answers 405 as in TGI (POST /, the compat route, "
       "is unaffected)."),
)

BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}
