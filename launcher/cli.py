"""`text-generation-launcher`: TGI's launcher flags and env vars → LauncherArgs → Supervisor.

Precedence for every option: command-line flag > TGI-named env var > SageMaker env var
(HF_MODEL_ID, SM_NUM_GPUS, …; see config.SAGEMAKER_ENV) > default. Errors are one line on stderr
(`error: …`) with exit code 2, before anything starts.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

import click
from click.core import ParameterSource

from launcher import config
from launcher.config import ConfigError, LauncherArgs
from router.options import BY_NAME as ROUTER_OPTIONS

_DEFAULTS = config.defaults()
_NO_ENV = {"env"}  # TGI's -e/--env has no env var


def _option(*decls: str, help: str, **kwargs):
    """A click option with TGI's env var (the name in upper case) and LauncherArgs' default."""
    long = next(d for d in decls if d.startswith("--"))
    name = long[2:].split("/")[0].replace("-", "_")
    if name not in _NO_ENV:
        kwargs.setdefault("envvar", name.upper())
    if kwargs.get("multiple"):
        kwargs.setdefault("default", ())
    else:
        kwargs.setdefault("default", _DEFAULTS[name])
    kwargs.setdefault("show_default", kwargs["default"] not in (None, ()))
    return click.Option([*decls, name], help=help, **kwargs)


def _router_option(*decls: str):
    """An option the router reads (router/options.py): its help, type and default written there once."""
    spec = ROUTER_OPTIONS[decls[-1][2:].replace("-", "_")]
    if spec.type is bool:
        return _option(*decls, is_flag=True, help=spec.help)
    if spec.type is tuple:
        return _option(*decls, multiple=True, help=spec.help)
    kind = click.Choice(spec.choices) if spec.choices else spec.type
    return _option(*decls, type=kind, help=spec.help)


_OPTIONS = [
    _option("--model-id",
            help="Hub model id or local folder/.gguf file (default: the bundled SmolLM2-135M-Instruct)."),
    _option("--revision", help="Hub revision: a commit, branch or `refs/pr/N`."),
    _router_option("--validation-workers"),
    _option("--sharded", type=click.BOOL, metavar="true|false",
            help="Shard the model over several processes (see --num-shard)."),
    _option("--num-shard", type=int, help="Number of shards (default: one per visible GPU, or 1 on CPU)."),
    _option("--quantize", type=click.Choice(config.QUANTIZE_CHOICES, case_sensitive=False),
            help="Weight quantization at load, CPU only: int8 (per-channel weights, dynamic int8 "
                 "activations), int4 (grouped weights, bf16 activations), or gguf (a GGUF model's own Q4_0/Q4_1/"
                 "Q8_0 blocks, no requantization). TGI's GPU methods are rejected."),
    _option("--dtype", type=click.Choice(config.DTYPE_CHOICES),
            help="Weights dtype. Default: float32 on CPU; on GPU the checkpoint's float16 or bfloat16 "
                 "(config.json `torch_dtype`), else bfloat16 (float16 on GPUs before compute capability "
                 "8.0)."),
    _option("--trust-remote-code", is_flag=True, help="Allow the model repository's own Python code to run."),
    _router_option("--max-concurrent-requests"),
    _router_option("--max-best-of"),
    _router_option("--max-stop-sequences"),
    _router_option("--max-top-n-tokens"),
    _router_option("--max-input-tokens"),
    _option("--max-input-length", type=int,
            help="Deprecated alias of --max-input-tokens (setting both is an error)."),
    _router_option("--max-total-tokens"),
    _router_option("--waiting-served-ratio"),
    _router_option("--max-batch-prefill-tokens"),
    _router_option("--max-batch-total-tokens"),
    _router_option("--max-waiting-tokens"),
    _router_option("--max-batch-size"),
    _option("--speculate", type=int, metavar="N",
            help="Speculative decoding: up to N draft tokens per request and step, looked up in the request's "
                 "own prompt and output (n-gram) and verified in the same step; greedy output is unchanged. "
                 "0: off. Fastest where answers copy the prompt (rewrite, extract, code edit)."),
    _option("--lora-adapters", metavar="IDS",
            help="LoRA adapters to load, comma-separated (TGI's syntax): `org/name`, `org/name@revision` or "
                 "`name=/local/path`. A request picks one with `adapter_id` (TGI API) or `model` (OpenAI API)."),
    _option("--cuda-graphs", metavar="SIZES",
            help="Decode batch sizes the shards capture as CUDA graphs, comma-separated (TGI's default: "
                 "1,2,4,8,16,32); 0: none. Default: none yet (see the README). CUDA with flash-attn only."),
    _option("--hostname", help="Address the HTTP server binds (env HOSTNAME, as in TGI)."),
    _option("-p", "--port", type=int, help="HTTP port."),
    _option("--shard-uds-path",
            help="Unix socket prefix; shard r listens on {path}-{r}, and a missing directory is created "
                 "with mode 0700 (default: in a private temp dir, mode 0700, removed at exit)."),
    _option("--master-addr", help="torch.distributed master address (MASTER_ADDR for the shards)."),
    _option("--master-port", type=int, help="torch.distributed master port (MASTER_PORT for the shards)."),
    _option("--nnodes", type=int, help="Multi-node: number of nodes, each running this launcher with --num-shard shards."),
    _option("--node-rank", type=int, help="Multi-node: this node's index; node 0 runs the router and the first shards."),
    _option("--shard-tcp-address", metavar="HOST:PORT",
            help="Multi-node: this node's shards also listen on HOST:PORT+i (i = local shard) for the router "
                 "on node 0. Unauthenticated gRPC: bind a private-network address."),
    _option("--huggingface-hub-cache",
            help="Hub cache folder for downloads (HUGGINGFACE_HUB_CACHE for children)."),
    _option("--weights-cache-override",
            help="Exported as WEIGHTS_CACHE_OVERRIDE to download-weights and the shards."),
    _option("--cuda-memory-fraction", type=float,
            help="Fraction of each GPU's total memory a shard may use, as in TGI: weights, activations and KV "
                 "cache; the KV cache takes 90% of what the warmup leaves of that share (TGI_WIGGLE_ROOM). "
                 "CUDA only."),
    _router_option("--json-output"),
    _router_option("--otlp-endpoint"),
    _router_option("--otlp-service-name"),
    _router_option("--cors-allow-origin"),
    _option("--api-key", help="Require `Authorization: Bearer KEY` on every route but /health, /ping, "
                              "/live, /ready, /info, /metrics and the docs. Prefer the API_KEY env var "
                              "or --api-key-file: a command line is visible in ps."),
    _router_option("--api-key-file"),
    _option("--watermark-gamma", type=float,
            help="Requests with `watermark: true`: the share of the vocabulary on the green list, in (0, 1)."),
    _option("--watermark-delta", type=float,
            help="Requests with `watermark: true`: the logit bonus of green-list tokens, >= 0."),
    _router_option("--tokenizer-config-path"),
    _router_option("--disable-grammar-support"),
    _router_option("--max-client-batch-size"),
    _router_option("--strict-model-name"),
    _router_option("--reasoning-parser"),
    _router_option("--payload-limit"),
    _router_option("-g", "--graceful-termination-timeout"),
    _router_option("--disable-prefix-caching"),
    _router_option("--request-timeout"),
    _router_option("--client-header-timeout"),
    _router_option("--client-body-timeout"),
    _router_option("--disable-playground"),
    _option("--usage-stats", type=click.Choice(config.USAGE_STATS_CHOICES, case_sensitive=False),
            help="Accepted for TGI compatibility; pytgi never sends usage statistics."),
    _option("-e", "--env", is_flag=True,
            help="Log information about the runtime environment at start-up."),
]


class LauncherCommand(click.Command):
    """Maps SageMaker env vars to defaults, and prints usage errors as one `error: …` line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        extra.setdefault("default_map", config.sagemaker_defaults(os.environ))
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as error:
            click.echo(f"error: {error.format_message()}", err=True)
            sys.exit(error.exit_code)
        except click.Abort:
            sys.exit(130)
        sys.exit(code or 0)


def _build_args(ctx: click.Context, params: dict) -> LauncherArgs:
    explicit = frozenset(
        name for name in params
        if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)
    )
    # click.Choice(case_sensitive=False) already returns the choice as written there (lower case).
    values = {name: (tuple(value) if isinstance(value, list) else value) for name, value in params.items()}
    return LauncherArgs(**values, log_level=os.environ.get("LOG_LEVEL", "info"), explicit=explicit)


def _main(**params) -> int:
    from launcher.gpu import count_visible_gpus

    ctx = click.get_current_context()
    args = _build_args(ctx, params)
    env = dict(os.environ)
    try:
        config.validate(args)
        num_gpus = count_visible_gpus(env)
        num_shard = config.resolve_num_shard(args.sharded, args.num_shard, num_gpus)
        config.validate_shards(args, num_shard)
    except ConfigError as error:
        raise click.UsageError(str(error)) from None

    return launch(replace(args, num_gpus=num_gpus), num_shard, env)


def launch(args: LauncherArgs, num_shard: int, env: dict[str, str]) -> int:
    """Log the start-up summary and run the supervisor until shutdown; returns the exit code."""
    from launcher.supervisor import Supervisor

    supervisor = Supervisor(args, num_shard, env)
    out = supervisor.out
    if args.env:
        out.log("INFO", "runtime environment", env_info(env))
    out.log("INFO", f"args: {args.redacted()}")
    if num_shard > 1:
        out.log("INFO", f"sharding the model on {num_shard} processes")
    if args.trust_remote_code:
        out.log("WARN", f"--trust-remote-code is set: trusting that {args.model_id or 'the model'} "
                        "contains no malicious code")
    if args.usage_stats != "off":
        out.log("INFO", "--usage-stats is accepted for compatibility; pytgi never sends usage statistics")
    return supervisor.run()


main = LauncherCommand(
    "text-generation-launcher",
    callback=_main,
    params=_OPTIONS,
    help="Serve a model over TGI's HTTP API: spawns the shards and the router and supervises them.",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
main = click.version_option(package_name="pytgi",
                            message="text-generation-launcher (pytgi) %(version)s")(main)


def env_info(env: dict[str, str]) -> list[str]:
    """TGI's `--env` report, for bug reports: versions, devices, the variables that matter."""
    import platform

    from launcher.gpu import count_visible_gpus

    lines = [
        f"pytgi {_version('pytgi')}",
        f"python {sys.version.split()[0]} ({sys.executable})",
        f"platform {platform.platform()} ({platform.machine()}), {os.cpu_count()} CPUs",
    ]
    for package in ("torch", "transformers", "tokenizers", "huggingface_hub", "grpcio", "aiohttp"):
        lines.append(f"{package} {_version(package)}")
    lines.append(f"visible GPUs: {count_visible_gpus(env)}")
    for var in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "HF_HOME", "HUGGINGFACE_HUB_CACHE",
                "HF_HUB_OFFLINE", "PYTGI_CACHE", "LOG_LEVEL"):
        if var in env:
            lines.append(f"{var}={env[var]}")
    return lines


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def flag_table() -> str:
    """The Markdown table of every launcher flag (for the README), generated from the click command."""
    rows = ["| Flag | Env var | Default | Description |", "|---|---|---|---|"]
    for param in main.params:
        if not isinstance(param, click.Option) or param.name in ("help", "version"):
            continue
        flags = ", ".join(f"`{opt}`" for opt in sorted(param.opts, key=len))
        if not param.is_flag and param.metavar is not None:
            flags += f" `{param.metavar}`"
        elif isinstance(param.type, click.Choice):
            flags += f" `{'|'.join(param.type.choices)}`"
        env = f"`{param.envvar}`" if param.envvar else ""
        default = param.default
        if default is None or default == ():
            shown = ""
        elif isinstance(default, bool):
            shown = f"`{str(default).lower()}`"
        else:
            shown = f"`{default}`"
        cells = (flags, env, shown, param.help or "")
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
