"""The command lines and environments of the launcher's children, as pure functions.

The router's option names come from router/options.py (`ROUTER_OPTIONS` below): a new router
option needs no change here. `build_router_argv` adds only what the launcher decides itself
(the shard socket, host and port, the model, and --max-input-tokens under either launcher name).
"""

from __future__ import annotations

from collections.abc import Mapping

from launcher.config import LauncherArgs, shard_log_level
from router import options as router_options

SHARD_EXE = "text-generation-server"
ROUTER_EXE = "text-generation-router"


def socket_path(args: LauncherArgs, rank: int) -> str:
    assert args.shard_uds_path is not None, "the supervisor picks the private socket dir first"
    return f"{args.shard_uds_path}-{rank}"


def _model_args(args: LauncherArgs) -> list[str]:
    argv = [args.model_id] if args.model_id else []  # none: the shard's bundled default
    if args.revision:
        argv += ["--revision", args.revision]
    if args.trust_remote_code:
        argv.append("--trust-remote-code")
    if args.json_output:
        argv.append("--json-output")
    return argv + ["--logger-level", shard_log_level(args.log_level)]


def build_download_argv(args: LauncherArgs) -> list[str]:
    """`download-weights`: resolve/convert the model and fetch the adapters once, before N shards
    load them."""
    argv = [SHARD_EXE, "download-weights", *_model_args(args)]
    return argv + ["--lora-adapters", args.lora_adapters] if args.lora_adapters else argv


def build_shard_argv(args: LauncherArgs, rank: int, world_size: int) -> list[str]:
    """Every rank gets the same argv; RANK/WORLD_SIZE come through the environment."""
    argv = [SHARD_EXE, "serve", *_model_args(args), "--uds-path", args.shard_uds_path]
    if world_size > 1:
        argv.append("--sharded")
    if args.dtype:
        argv += ["--dtype", args.dtype]
    if args.num_gpus:
        # The shard must not fall back to the CPU when its torch cannot see the GPUs counted here.
        argv += ["--device", "cuda"]
    if args.quantize:
        argv += ["--quantize", args.quantize]
    if args.cuda_graphs is not None:
        argv += ["--cuda-graphs", args.cuda_graphs]
    if args.speculate:
        argv += ["--speculate", str(args.speculate)]
    if args.lora_adapters:
        argv += ["--lora-adapters", args.lora_adapters]
    if args.shard_tcp_address:
        argv += ["--tcp-address", args.shard_tcp_address]
    return argv


def child_env(args: LauncherArgs, base: Mapping[str, str]) -> dict[str, str]:
    """What every child gets: the launcher's environment plus the cache/token settings."""
    env = dict(base)
    env["PYTHONUNBUFFERED"] = "1"  # our pipes are not terminals: keep prints line by line
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    env.pop("API_KEY", None)  # the router's secret (router_env); no other child needs it
    if "HF_TOKEN" not in env and env.get("HF_API_TOKEN"):
        env["HF_TOKEN"] = env["HF_API_TOKEN"]
    if args.huggingface_hub_cache:
        env["HUGGINGFACE_HUB_CACHE"] = args.huggingface_hub_cache
    if args.weights_cache_override:
        env["WEIGHTS_CACHE_OVERRIDE"] = args.weights_cache_override
    return env


def shard_env(args: LauncherArgs, rank: int, world_size: int, base: Mapping[str, str]) -> dict[str, str]:
    env = child_env(args, base)
    local_world_size = world_size // args.nnodes  # the shards of this node; shard i takes its GPU i
    local_rank = rank - args.node_rank * local_world_size
    env.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
               LOCAL_WORLD_SIZE=str(local_world_size), MASTER_ADDR=args.master_addr,
               MASTER_PORT=str(args.master_port))
    optional = {
        "CUDA_MEMORY_FRACTION": args.cuda_memory_fraction,
        "WATERMARK_GAMMA": args.watermark_gamma,
        "WATERMARK_DELTA": args.watermark_delta,
        "MAX_BATCH_SIZE": args.max_batch_size,
        "MAX_TOTAL_TOKENS": args.max_total_tokens,
    }
    env.update({key: str(value) for key, value in optional.items() if value is not None})
    return env


# The router's options (router/options.py), passed only when the user set them (the same defaults
# apply otherwise). Flags (bool) are passed bare when true; tuples repeat the option.
# max_input_tokens has two launcher names (below). Not --api-key: any local user can read a
# command line (ps, /proc/PID/cmdline), so the key goes in router_env.
ROUTER_OPTIONS = tuple(option.name for option in router_options.OPTIONS if option.name != "max_input_tokens")


def build_router_argv(args: LauncherArgs) -> list[str]:
    argv = [ROUTER_EXE, "--master-shard-uds-path", socket_path(args, 0),
            "--hostname", args.hostname, "--port", str(args.port)]
    if args.model_id:
        argv += ["--model-id", args.model_id]  # none: the router's bundled default, like the shards
    if args.revision:
        argv += ["--revision", args.revision]
    if args.is_set("max_input_tokens") or args.is_set("max_input_length"):
        argv += ["--max-input-tokens", str(args.effective_max_input_tokens)]
    for name in ROUTER_OPTIONS:
        if not args.is_set(name):
            continue
        flag, value = "--" + name.replace("_", "-"), getattr(args, name)
        if isinstance(value, bool):
            argv += [flag] if value else []
        elif isinstance(value, tuple):
            for item in value:
                argv += [flag, item]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def router_env(args: LauncherArgs, base: Mapping[str, str]) -> dict[str, str]:
    """The router reads its key from API_KEY (TGI's name): a process's environment is readable
    only by its owner and root."""
    env = child_env(args, base)
    if args.api_key is not None:
        env["API_KEY"] = args.api_key
    return env
