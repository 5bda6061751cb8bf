"""`text-generation-router`: the HTTP front end. The options it shares with the launcher are
generated from router/options.py (the launcher's come from the same table); the launcher passes
only those the user set, so the defaults both show apply otherwise."""

from __future__ import annotations

import asyncio
import os
import sys

import click

from router.config import RouterConfig
from router.http.auth import read_key_file
from router.options import OPTIONS, Option


def _click_option(option: Option):
    """A click option from its one definition (router/options.py)."""
    kwargs: dict = dict(default=option.default, envvar=option.envvar, help=option.help)
    if option.type is bool:
        kwargs["is_flag"] = True
    elif option.type is tuple:
        kwargs["multiple"] = True
    else:
        kwargs["type"] = click.Choice(option.choices) if option.choices else option.type
    return click.option(option.flag, **kwargs)


def _shared_options(command):
    for option in reversed(OPTIONS):
        command = _click_option(option)(command)
    return command


# The router's own options (the launcher always passes the first five, and API_KEY / LOG_LEVEL
# through the environment), then the options it shares with the launcher.
@click.command(context_settings={"show_default": True})
@click.option("--master-shard-uds-path", default="/tmp/text-generation-server-0", envvar="MASTER_SHARD_UDS_PATH")
@click.option("--hostname", default="0.0.0.0", envvar="HOSTNAME")
@click.option("--port", "-p", default=3000, type=int, envvar="PORT")
@click.option("--model-id", default="HuggingFaceTB/SmolLM2-135M-Instruct", envvar="MODEL_ID", help="Name reported by /info.")
@click.option("--revision", default=None, envvar="REVISION")
@click.option("--api-key", default=None, envvar="API_KEY",
              help="Prefer the API_KEY env var (as the launcher passes it): a command line is visible in ps.")
@click.option("--log-level", default="info", envvar="LOG_LEVEL")
@_shared_options
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
    from router.http.server import serve

    setup_logging(config.log_level, config.json_output)
    asyncio.run(serve(create_app(config), config))


if __name__ == "__main__":
    main()
