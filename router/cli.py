"""`text-generation-router`: the HTTP front end. Options mirror the launcher's (same names and
env vars); the launcher passes only what the user set, so these defaults apply otherwise."""

from __future__ import annotations

import asyncio
import os
import sys

import click

from router.auth import read_key_file
from router.config import RouterConfig
from router.reasoning import CHOICES as REASONING_PARSERS


@click.command(context_settings={"show_default": True})
@click.option("--master-shard-uds-path", default="/tmp/text-generation-server-0", envvar="MASTER_SHARD_UDS_PATH")
@click.option("--hostname", default="0.0.0.0", envvar="HOSTNAME")
@click.option("--port", "-p", default=3000, type=int, envvar="PORT")
@click.option("--model-id", default="HuggingFaceTB/SmolLM2-135M-Instruct", envvar="MODEL_ID", help="Name reported by /info.")
@click.option("--revision", default=None, envvar="REVISION")
@click.option("--max-concurrent-requests", default=128, type=int, envvar="MAX_CONCURRENT_REQUESTS")
@click.option("--max-best-of", default=2, type=int, envvar="MAX_BEST_OF")
@click.option("--max-stop-sequences", default=4, type=int, envvar="MAX_STOP_SEQUENCES")
@click.option("--max-top-n-tokens", default=5, type=int, envvar="MAX_TOP_N_TOKENS")
@click.option("--max-input-tokens", default=None, type=int, envvar="MAX_INPUT_TOKENS")
@click.option("--max-total-tokens", default=None, type=int, envvar="MAX_TOTAL_TOKENS")
@click.option("--waiting-served-ratio", default=1.2, type=float, envvar="WAITING_SERVED_RATIO")
@click.option("--max-batch-prefill-tokens", default=None, type=int, envvar="MAX_BATCH_PREFILL_TOKENS")
@click.option("--max-batch-total-tokens", default=None, type=int, envvar="MAX_BATCH_TOTAL_TOKENS")
@click.option("--max-waiting-tokens", default=20, type=int, envvar="MAX_WAITING_TOKENS")
@click.option("--max-batch-size", default=None, type=int, envvar="MAX_BATCH_SIZE")
@click.option("--validation-workers", default=2, type=int, envvar="VALIDATION_WORKERS")
@click.option("--api-key", default=None, envvar="API_KEY",
              help="Prefer the API_KEY env var (as the launcher passes it): a command line is visible in ps.")
@click.option("--cors-allow-origin", multiple=True, envvar="CORS_ALLOW_ORIGIN",
              help="Origin allowed to read responses cross-origin (repeatable; `*`: any). "
                   "Default: none, CORS off.")
@click.option("--json-output", is_flag=True, envvar="JSON_OUTPUT")
@click.option("--otlp-endpoint", default=None, envvar="OTLP_ENDPOINT",
              help="OTLP/gRPC collector for traces, e.g. http://127.0.0.1:4317 (none: no tracing).")
@click.option("--otlp-service-name", default="text-generation-inference.router", envvar="OTLP_SERVICE_NAME")
@click.option("--payload-limit", default=2_000_000, type=int, envvar="PAYLOAD_LIMIT")
@click.option("--max-client-batch-size", default=4, type=int, envvar="MAX_CLIENT_BATCH_SIZE")
@click.option("--disable-grammar-support", is_flag=True, envvar="DISABLE_GRAMMAR_SUPPORT")
@click.option("--tokenizer-config-path", default=None, envvar="TOKENIZER_CONFIG_PATH")
@click.option("--disable-prefix-caching", is_flag=True, envvar="DISABLE_PREFIX_CACHING")
@click.option("--log-level", default="info", envvar="LOG_LEVEL")
@click.option("--strict-model-name", is_flag=True, envvar="STRICT_MODEL_NAME",
              help="OpenAI routes: 404 for a `model` other than the served one or \"tgi\".")
@click.option("--reasoning-parser", default="auto", envvar="REASONING_PARSER",
              type=click.Choice(REASONING_PARSERS),
              help="Chat: `<think>` sections as `reasoning_content` (auto: when the chat template has them).")
@click.option("--api-key-file", default=None, envvar="API_KEY_FILE", type=click.Path(dir_okay=False),
              help="More accepted API keys, one per line (blank and # lines ignored).")
@click.option("--request-timeout", default=None, type=float, envvar="REQUEST_TIMEOUT",
              help="Seconds a generation may take from queueing to its last token (408 after). Default: none.")
@click.option("--graceful-termination-timeout", default=90.0, type=float, envvar="GRACEFUL_TERMINATION_TIMEOUT",
              help="On SIGTERM: seconds in-flight requests may run on while new ones get 503.")
@click.option("--client-header-timeout", default=15.0, type=float, envvar="CLIENT_HEADER_TIMEOUT",
              help="Seconds to receive a request's headers (also the idle keep-alive limit).")
@click.option("--client-body-timeout", default=60.0, type=float, envvar="CLIENT_BODY_TIMEOUT",
              help="Seconds to receive a request's body once its headers arrived (408 after).")
def main(disable_prefix_caching: bool, cors_allow_origin: tuple[str, ...], **options) -> None:
    """Serve TGI's HTTP API in front of running shards."""
    config = RouterConfig(prefix_caching=not disable_prefix_caching, cors_allow_origin=tuple(cors_allow_origin),
                          **options)
    try:
        config.check()
        if config.api_key_file:
            read_key_file(config.api_key_file)  # fail now, before connecting to the shards
    except ValueError as error:
        sys.exit(f"error: {error}")
    # The router uses transformers only to render chat templates; without these, importing it
    # pulls in torch (+2 s, +250 MB) and logs advice about missing frameworks.
    os.environ.setdefault("USE_TORCH", "0")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from router.app import create_app
    from router.log import setup_logging
    from router.server import serve

    setup_logging(config.log_level, config.json_output)
    asyncio.run(serve(create_app(config), config))


if __name__ == "__main__":
    main()
