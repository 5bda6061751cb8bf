"""`text-generation-server`: `serve` a model over gRPC, or `download-weights` (resolve/convert only)."""

from __future__ import annotations

import asyncio
import logging
import sys

import click

log = logging.getLogger("shard")


@click.group()
def main() -> None:
    """pytgi shard server."""


def _common(fn):
    fn = click.argument("model_id", required=False, default=None, envvar="MODEL_ID")(fn)
    fn = click.option("--revision", envvar="REVISION", default=None, help="Hub revision (branch, tag or commit).")(fn)
    fn = click.option("--trust-remote-code", is_flag=True, envvar="TRUST_REMOTE_CODE", help="Allow custom modeling code.")(fn)
    fn = click.option("--json-output", is_flag=True, envvar="JSON_OUTPUT", help="Log JSON lines on stdout.")(fn)
    fn = click.option("--logger-level", default="INFO", envvar="LOG_LEVEL", show_default=True)(fn)
    return fn


@main.command()
@_common
@click.option("--uds-path", default="/tmp/text-generation-server", envvar="SHARD_UDS_PATH", show_default=True,
              help="Socket path prefix; rank r listens on {uds-path}-{r}.")
@click.option("--sharded", is_flag=True, envvar="SHARDED", help="Join a tensor-parallel group (RANK/WORLD_SIZE env).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None, envvar="DTYPE",
              help="Weights dtype. Default: float32 on CPU; on CUDA the checkpoint's float16/bfloat16, "
                   "else bfloat16 (float16 on GPUs before compute capability 8.0).")
@click.option("--block-size", type=int, default=None, envvar="BLOCK_SIZE",
              help="Tokens per KV block (default: the attention backend's, 16 on CPU, 256 with flash-attn).")
@click.option("--device", default=None, metavar="cpu|cuda|cuda:N",
              help="cuda: GPU LOCAL_RANK, one per shard of this node, and an error if torch sees none (the launcher "
                   "passes it when it counts GPUs); cuda:N: that GPU (one shard). Default: CUDA if torch sees it, else CPU.")
@click.option("--quantize", type=click.Choice(["int8", "int4", "gguf"]), default=None, envvar="QUANTIZE",
              help="Quantize the linear layers' weights at load (int8, int4), or serve a GGUF file's own quantized "
                   "weights (gguf). CPU only. Default: none (dense weights in --dtype).")
@click.option("--tcp-address", default=None, envvar="SHARD_TCP_ADDRESS", metavar="HOST:PORT",
              help="Multi-node: also serve on TCP at HOST, port PORT + LOCAL_RANK, and advertise it to the router.")
@click.option("--cuda-graphs", default=None, envvar="CUDA_GRAPHS", metavar="SIZES",
              help="Decode batch sizes to capture as CUDA graphs, e.g. 1,2,4,8,16,32; 0: none "
                   "(CUDA with flash-attn only).")
@click.option("--speculate", type=int, default=None, envvar="SPECULATE", metavar="N",
              help="Speculative decoding: each greedy decode row drafts up to N tokens from its own prompt and "
                   "output (n-gram lookup) and verifies them in the same step; 0..16, default 0 (off).")
@click.option("--lora-adapters", default=None, envvar="LORA_ADAPTERS", metavar="LIST",
              help="LoRA adapters to load, comma-separated: id (a hub repo), id@revision, or name=path; requests "
                   "pick one by id (Request.adapter_id). Llama-family fast path only.")
def serve(model_id, revision, trust_remote_code, json_output, logger_level, uds_path, sharded, dtype, block_size,
          device, quantize, tcp_address, cuda_graphs, speculate, lora_adapters):
    """Load MODEL_ID (default: the bundled SmolLM2-135M-Instruct) and serve it over gRPC."""
    from shard.config import build_config
    from shard.log import setup_logging

    try:
        config = build_config(
            model_id, revision=revision, uds_path=uds_path, sharded=sharded, dtype=dtype,
            trust_remote_code=trust_remote_code, json_output=json_output, log_level=logger_level,
            block_size=block_size, device=device, quantize=quantize, tcp_address=tcp_address,
            cuda_graphs=cuda_graphs, speculate=speculate, lora_adapters=lora_adapters,
        )
    except ValueError as error:
        sys.exit(f"error: {error}")
    setup_logging(config.log_level, config.json_output, config.rank)
    from shard.server import serve as serve_grpc

    asyncio.run(serve_grpc(lambda: _load(config), config))


def _load(config):
    """Resolve, load and wrap the model; a user error is one line on stderr and exit 1."""
    from dataclasses import replace

    import torch

    from shard.distributed import init_tp_group
    from shard.dtype import choose_dtype
    from shard.engine import Engine
    from shard.kv_cache import cap_process_memory
    from shard.layers.quant import choose_quantize
    from shard.lora import load_adapters
    from shard.model_source import ModelSourceError, gguf_origin, resolve_model
    from shard.models import UnsupportedModelError, get_model
    from shard.models.base import ModelContext

    torch.set_num_threads(config.num_threads)
    try:
        source = resolve_model(
            config.model_id, revision=config.revision, cache_dir=config.cache_dir,
            hub_cache_dir=config.hub_cache_dir, offline=config.offline,
            trust_remote_code=config.trust_remote_code, progress=log.info,
        )
        # The dtype and the kernels, decided once: they need the checkpoint, so not at build_config.
        quantize = choose_quantize(config.quantize, config.device.type, gguf_origin(source.path) is not None,
                                   _is_fast_path(source.path))
        log.info("weights %s (%s)", quantize.method or "dense", quantize.reason)
        choice = choose_dtype(config.dtype, config.device, source.path)
        log.info("dtype %s (%s)", str(choice.dtype).removeprefix("torch."), choice.reason)
        config = replace(config, dtype=choice.dtype, quantize=quantize.method)
        cap_process_memory(config.device, config.memory_fraction)  # before the weights take their share
        tp = init_tp_group(config)
        cpu_kernel = None
        if config.device.type == "cpu" and config.attention == "paged":
            from shard.cpu_kernels import load_paged_attention

            cpu_kernel = load_paged_attention(config.cache_dir)
        fused_ops = None
        if config.device.type == "cpu":
            from shard.cpu_kernels import load_fused_ops

            fused_ops = load_fused_ops(config.cache_dir)
        adapters = load_adapters(config.lora_adapters, hub_cache_dir=config.hub_cache_dir, offline=config.offline,
                                 progress=log.info)
        for adapter in adapters:
            log.info("LoRA adapter %s", adapter.describe())
        ctx = ModelContext(tp, config.device, config.dtype, config.block_size, config.trust_remote_code, config.quantize,
                           config.attention, cpu_kernel, fused_ops, adapters)
        model = get_model(source.path, ctx)
    except (ModelSourceError, UnsupportedModelError, FileNotFoundError, KeyError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    log.info("loaded %s (%s, %s%s) from %s", source.model_id, model.info.impl, config.dtype,
             f", {config.quantize} weights" if config.quantize else "", source.path)
    return Engine(config, model, tp, source.path)


def _is_fast_path(folder) -> bool:
    """Served by shard/models/llama.py (the only implementation with GGUF kernels)."""
    import json

    from shard.models import FAST_PATH

    try:
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return bool(architectures) and architectures[0] in FAST_PATH


@main.command("download-weights")
@_common
@click.option("--lora-adapters", default=None, envvar="LORA_ADAPTERS", metavar="LIST",
              help="LoRA adapters to fetch too (the syntax of serve's option); their folders are printed after the model's.")
def download_weights(model_id, revision, trust_remote_code, json_output, logger_level, lora_adapters):
    """Resolve MODEL_ID (and the LoRA adapters) into local folders (download or GGUF conversion) and
    print their paths: done once by the launcher, so that N shards do not fetch them side by side."""
    from shard.config import build_config
    from shard.log import setup_logging
    from shard.model_source import ModelSourceError, resolve_adapter, resolve_model

    try:
        config = build_config(
            model_id, revision=revision, uds_path="", sharded=False, dtype=None,
            trust_remote_code=trust_remote_code, json_output=json_output, log_level=logger_level,
            lora_adapters=lora_adapters,
        )
    except ValueError as error:
        sys.exit(f"error: {error}")
    setup_logging(config.log_level, config.json_output, 0)
    try:
        source = resolve_model(
            config.model_id, revision=config.revision, cache_dir=config.cache_dir,
            hub_cache_dir=config.hub_cache_dir, offline=config.offline,
            trust_remote_code=config.trust_remote_code, progress=log.info,
        )
        adapters = [resolve_adapter(spec.source, revision=spec.revision, hub_cache_dir=config.hub_cache_dir,
                                    offline=config.offline, progress=log.info) for spec in config.lora_adapters]
    except ModelSourceError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    for path in (source.path, *adapters):
        print(path)


if __name__ == "__main__":
    main()
