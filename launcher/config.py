"""LauncherArgs: the launcher's one frozen configuration, built at the CLI edge (launcher/cli.py).

The defaults of every flag live here (the click options read them from the dataclass fields).
`explicit` records which options the user set (flag, TGI env var or SageMaker env var): the
router only receives those, so its own defaults apply otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

from pytgi_common.adapters import parse_lora_adapters
from router.options import BY_NAME as ROUTER_OPTIONS
from shard.graph_sizes import parse_cuda_graphs
from shard.speculation import check_speculate
from shard.watermark import Watermark

# TGI's quantization methods plus pytgi's CPU ones. Only IMPLEMENTED_QUANTIZE is served; the
# others are accepted by the parser (TGI deployments pass them) and rejected with one line.
QUANTIZE_CHOICES = (
    "int8", "int4", "gguf",
    "awq", "compressed-tensors", "eetq", "exl2", "gptq", "marlin",
    "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4", "fp8",
)
IMPLEMENTED_QUANTIZE = ("int8", "int4", "gguf")
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
USAGE_STATS_CHOICES = ("on", "off", "no-stack")
MAX_UDS_PATH = 107  # sockaddr_un.sun_path is 108 bytes including the NUL

# SageMaker's names (TGI's sagemaker-entrypoint.sh) → the launcher option they set. They apply
# only when neither the TGI-named env var nor the flag is given (see cli.py: they become
# click's default_map, which ranks below both).
SAGEMAKER_ENV = {
    "HF_MODEL_ID": "model_id",
    "SM_NUM_GPUS": "num_shard",
    "HF_MODEL_REVISION": "revision",
    "HF_MODEL_QUANTIZE": "quantize",
    "HF_MODEL_TRUST_REMOTE_CODE": "trust_remote_code",
}


def _router(name: str) -> object:
    """The router's default for an option the launcher forwards (router/options.py, written once)."""
    return ROUTER_OPTIONS[name].default


class ConfigError(ValueError):
    """A contradictory or impossible combination of options (one line, shown before starting)."""


@dataclass(frozen=True, slots=True)
class LauncherArgs:
    model_id: str | None = None  # None: the bundled SmolLM2-135M-Instruct
    revision: str | None = None
    validation_workers: int = _router("validation_workers")
    sharded: bool | None = None
    num_shard: int | None = None
    quantize: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False
    max_concurrent_requests: int = _router("max_concurrent_requests")
    max_best_of: int = _router("max_best_of")
    max_stop_sequences: int = _router("max_stop_sequences")
    max_top_n_tokens: int = _router("max_top_n_tokens")
    max_input_tokens: int | None = _router("max_input_tokens")
    max_input_length: int | None = None
    max_total_tokens: int | None = _router("max_total_tokens")
    waiting_served_ratio: float = _router("waiting_served_ratio")
    max_batch_prefill_tokens: int | None = _router("max_batch_prefill_tokens")
    max_batch_total_tokens: int | None = _router("max_batch_total_tokens")
    max_waiting_tokens: int = _router("max_waiting_tokens")
    max_batch_size: int | None = _router("max_batch_size")
    cuda_graphs: str | None = None  # TGI's format: "1,2,4,8", "0": none; None: the shards' default
    speculate: int = 0  # n-gram draft tokens a decode row may verify per step (shard/speculation.py)
    lora_adapters: str | None = None  # TGI's list syntax (pytgi_common/adapters.py); the shards load them
    hostname: str = "0.0.0.0"
    port: int = 3000
    shard_uds_path: str | None = None  # None: {a private 0700 temp dir}/shard, made by the supervisor
    master_addr: str = "localhost"
    master_port: int = 29500
    # Multi-node (torchrun's names): this launcher runs shards node_rank * num_shard ... + num_shard - 1
    # of nnodes * num_shard; node 0 also runs the router, which reaches every rank over TCP.
    nnodes: int = 1
    node_rank: int = 0
    shard_tcp_address: str | None = None  # HOST:PORT; local shard i listens on HOST:PORT+i
    huggingface_hub_cache: str | None = None
    weights_cache_override: str | None = None
    # TGI's meaning: the share of each GPU's TOTAL memory a shard may use (weights, activations
    # and KV cache); the shard's CUDA_MEMORY_FRACTION.
    cuda_memory_fraction: float = 1.0
    json_output: bool = _router("json_output")
    otlp_endpoint: str | None = _router("otlp_endpoint")
    otlp_service_name: str = _router("otlp_service_name")
    cors_allow_origin: tuple[str, ...] = _router("cors_allow_origin")
    api_key: str | None = None
    api_key_file: str | None = _router("api_key_file")
    # Requests with `watermark: true` (Kirchenbauer et al.): green-list share and logit bonus, read
    # by the shards (WATERMARK_GAMMA / WATERMARK_DELTA; shard/watermark.py). TGI's defaults.
    watermark_gamma: float = Watermark().gamma
    watermark_delta: float = Watermark().delta
    tokenizer_config_path: str | None = _router("tokenizer_config_path")
    disable_grammar_support: bool = _router("disable_grammar_support")
    max_client_batch_size: int = _router("max_client_batch_size")
    strict_model_name: bool = _router("strict_model_name")
    reasoning_parser: str = _router("reasoning_parser")
    payload_limit: int = _router("payload_limit")
    graceful_termination_timeout: int = _router("graceful_termination_timeout")
    request_timeout: float | None = _router("request_timeout")
    client_header_timeout: float = _router("client_header_timeout")
    client_body_timeout: float = _router("client_body_timeout")
    disable_prefix_caching: bool = _router("disable_prefix_caching")
    disable_playground: bool = _router("disable_playground")
    usage_stats: str = "off"
    env: bool = False
    # Not flags: LOG_LEVEL (TGI's env-only filter), the GPUs cli.py counted (launcher/gpu.py: the
    # shards then run on CUDA, and refuse to start if torch sees none) and which options the user set.
    log_level: str = "info"
    num_gpus: int = 0
    explicit: frozenset[str] = field(default_factory=frozenset, repr=False)

    @property
    def effective_max_input_tokens(self) -> int | None:
        return self.max_input_tokens if self.max_input_tokens is not None else self.max_input_length

    def is_set(self, name: str) -> bool:
        return name in self.explicit

    def redacted(self) -> LauncherArgs:
        """A copy safe to log (the API key hidden)."""
        return replace(self, api_key="***") if self.api_key else self


def defaults() -> dict[str, object]:
    return {f.name: f.default for f in fields(LauncherArgs) if f.name != "explicit"}


def sagemaker_defaults(env: Mapping[str, str]) -> dict[str, str]:
    """Option values implied by SageMaker env vars. SM_NUM_GPUS=0 (a CPU instance) sets nothing."""
    mapped = {}
    for var, name in SAGEMAKER_ENV.items():
        value = env.get(var, "").strip()
        if not value or (var == "SM_NUM_GPUS" and value == "0"):
            continue
        mapped[name] = value
    return mapped


def resolve_num_shard(sharded: bool | None, num_shard: int | None, visible_gpus: int) -> int:
    """TGI's find_num_shards (shared/reference/tgi-reference.md §1.2); on CPU the GPU count is 0."""
    if num_shard is not None and num_shard < 1:
        raise ConfigError("`num_shard` cannot be < 1")
    if sharded is True and num_shard is None:
        if visible_gpus <= 1:
            raise ConfigError(
                f"--sharded true needs more than one visible GPU (found {visible_gpus}); "
                "pass --num-shard N to shard on CPU")
        return visible_gpus
    if sharded is True and num_shard is not None and num_shard <= 1:
        raise ConfigError(
            f"--sharded true is incompatible with --num-shard {num_shard}; use --num-shard >= 2")
    if num_shard is not None:
        return num_shard
    if sharded is False:
        return 1
    return max(visible_gpus, 1)


def validate(args: LauncherArgs) -> None:
    """Reject contradictions before anything starts; the message is one line."""
    if args.quantize is not None and args.quantize not in IMPLEMENTED_QUANTIZE:
        raise ConfigError(
            f"--quantize {args.quantize} is not supported; pytgi implements "
            f"{', '.join(IMPLEMENTED_QUANTIZE[:-1])} and {IMPLEMENTED_QUANTIZE[-1]} (CPU weight quantization)")
    if args.max_input_tokens is not None and args.max_input_length is not None:
        raise ConfigError(
            f"both --max-input-tokens ({args.max_input_tokens}) and --max-input-length "
            f"({args.max_input_length}) are set; use only --max-input-tokens "
            "(--max-input-length is deprecated)")
    for name in ("validation_workers", "max_concurrent_requests", "max_client_batch_size", "payload_limit",
                 "max_batch_size", "max_input_tokens", "max_input_length", "max_total_tokens",
                 "max_batch_prefill_tokens", "max_batch_total_tokens"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ConfigError(f"`{name}` must be > 0 (got {value})")
    for name in ("max_stop_sequences", "max_top_n_tokens", "max_waiting_tokens",
                 "graceful_termination_timeout"):
        if getattr(args, name) < 0:
            raise ConfigError(f"`{name}` must be >= 0 (got {getattr(args, name)})")
    if args.max_best_of < 1:
        raise ConfigError("`max_best_of` must be >= 1")
    if args.waiting_served_ratio < 0:
        raise ConfigError(f"`waiting_served_ratio` must be >= 0 (got {args.waiting_served_ratio})")
    if not 0 < args.cuda_memory_fraction <= 1:
        raise ConfigError(f"`cuda_memory_fraction` must be in (0, 1] (got {args.cuda_memory_fraction})")
    try:
        parse_cuda_graphs(args.cuda_graphs)  # the shard's own parser: one format, checked before any start
        Watermark(args.watermark_gamma, args.watermark_delta)  # the shard's own rule, likewise
        check_speculate(args.speculate)  # and again
        parse_lora_adapters(args.lora_adapters, args.model_id)  # and again
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} is not a valid TCP port")
    if not 0 < args.master_port < 65536:
        raise ConfigError(f"--master-port {args.master_port} is not a valid TCP port")
    max_input, max_total = args.effective_max_input_tokens, args.max_total_tokens
    prefill, batch_total = args.max_batch_prefill_tokens, args.max_batch_total_tokens
    if max_input is not None and max_total is not None and max_input >= max_total:
        raise ConfigError(f"`max_input_tokens`({max_input}) must be < `max_total_tokens`({max_total})")
    if max_total is not None and batch_total is not None and max_total > batch_total:
        raise ConfigError(
            f"`max_total_tokens` must be <= `max_batch_total_tokens`. Given: {max_total} and {batch_total}")
    if prefill is not None and max_input is not None and prefill < max_input:
        raise ConfigError(
            f"`max_batch_prefill_tokens` must be >= `max_input_tokens`. Given: {prefill} and {max_input}")
    if prefill is not None and batch_total is not None and prefill > batch_total:
        raise ConfigError(
            "`max_batch_prefill_tokens` must be <= `max_batch_total_tokens`. "
            f"Given: {prefill} and {batch_total}")
    if args.shard_uds_path == "":
        raise ConfigError("--shard-uds-path must not be empty")
    if args.request_timeout is not None and args.request_timeout <= 0:
        raise ConfigError(f"`request_timeout` must be > 0 (got {args.request_timeout})")
    for name in ("client_header_timeout", "client_body_timeout"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"`{name}` must be > 0 (got {getattr(args, name)})")
    if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise ConfigError(f"--node-rank must be in [0, --nnodes) (got {args.node_rank} of {args.nnodes})")
    if args.nnodes > 1 and not args.shard_tcp_address:
        raise ConfigError("--nnodes > 1 needs --shard-tcp-address HOST:PORT (this node's address the router can reach)")


def validate_shards(args: LauncherArgs, num_shard: int) -> None:
    """Checks that need the resolved shard count (a private socket dir is checked once made)."""
    if args.shard_uds_path is None:
        return
    longest = f"{args.shard_uds_path}-{num_shard * args.nnodes - 1}"
    if len(longest.encode()) > MAX_UDS_PATH:
        raise ConfigError(
            f"--shard-uds-path is too long: {longest!r} exceeds the {MAX_UDS_PATH}-byte unix socket limit")


def shard_log_level(log_level: str) -> str:
    """Map TGI's LOG_LEVEL (a level or a tracing filter) to a Python logging level for the shards."""
    value = log_level.strip().lower()
    simple = {"trace": "DEBUG", "debug": "DEBUG", "info": "INFO", "warn": "WARNING", "warning": "WARNING",
              "error": "ERROR", "critical": "CRITICAL"}
    return simple.get(value, "INFO")
