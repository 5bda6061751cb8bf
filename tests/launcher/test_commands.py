"""Argv and environment of download-weights, the shards and the router; GPU counting."""

from __future__ import annotations

from launcher import commands, gpu
from launcher.config import LauncherArgs


def test_shard_argv_single_and_sharded():
    args = LauncherArgs(shard_uds_path="/tmp/p")
    assert commands.build_shard_argv(args, 0, 1) == [
        "text-generation-server", "serve", "--logger-level", "INFO", "--uds-path", "/tmp/p"]
    args = LauncherArgs(model_id="org/m", revision="r1", trust_remote_code=True, json_output=True,
                        dtype="bfloat16", quantize="int8", shard_uds_path="/tmp/p", log_level="warn")
    assert commands.build_shard_argv(args, 1, 2) == [
        "text-generation-server", "serve", "org/m", "--revision", "r1", "--trust-remote-code",
        "--json-output",
        "--logger-level", "WARNING", "--uds-path", "/tmp/p", "--sharded", "--dtype", "bfloat16",
        "--quantize", "int8"]


def test_multinode_shards_get_global_ranks_local_ranks_and_tcp():
    args = LauncherArgs(shard_uds_path="/tmp/p", nnodes=2, node_rank=1, shard_tcp_address="10.0.0.2:29600")
    assert commands.build_shard_argv(args, 3, 4)[-2:] == ["--tcp-address", "10.0.0.2:29600"]
    env = commands.shard_env(args, 3, 4, {})
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("3", "1", "4")
    assert env["LOCAL_WORLD_SIZE"] == "2"  # this node's shards: LOCAL_RANK 1 takes cuda:1, not cuda:3


def test_shards_run_on_cuda_when_the_launcher_counted_gpus():
    """--device cuda makes a shard whose torch sees no GPU refuse to start (not serve on the CPU)."""
    gpu_args = LauncherArgs(shard_uds_path="/tmp/p", num_gpus=2)
    assert commands.build_shard_argv(gpu_args, 1, 2)[-3:] == ["--sharded", "--device", "cuda"]
    assert "--device" not in commands.build_shard_argv(LauncherArgs(shard_uds_path="/tmp/p"), 0, 1)
    assert commands.shard_env(gpu_args, 1, 2, {})["LOCAL_WORLD_SIZE"] == "2"


def test_download_argv():
    assert commands.build_download_argv(LauncherArgs(model_id="org/m", revision="main")) == [
        "text-generation-server", "download-weights", "org/m", "--revision", "main", "--logger-level", "INFO"]
    # The adapters are fetched by the same one process, not by every shard at once.
    assert commands.build_download_argv(LauncherArgs(lora_adapters="a=/x,org/b@v1"))[-2:] == [
        "--lora-adapters", "a=/x,org/b@v1"]


def test_shard_env():
    args = LauncherArgs(master_addr="10.0.0.1", master_port=1234, huggingface_hub_cache="/hub",
                        weights_cache_override="/w", watermark_gamma=0.4, max_batch_size=8,
                        cuda_memory_fraction=0.5)
    env = commands.shard_env(args, 1, 4, {"PATH": "/bin", "HF_API_TOKEN": "tok"})
    assert env["RANK"] == "1" and env["WORLD_SIZE"] == "4"
    assert env["MASTER_ADDR"] == "10.0.0.1" and env["MASTER_PORT"] == "1234"
    assert env["HUGGINGFACE_HUB_CACHE"] == "/hub" and env["WEIGHTS_CACHE_OVERRIDE"] == "/w"
    assert env["WATERMARK_GAMMA"] == "0.4" and env["WATERMARK_DELTA"] == "2.0"  # the default runs, and is shown
    assert env["MAX_BATCH_SIZE"] == "8" and env["CUDA_MEMORY_FRACTION"] == "0.5"
    assert env["HF_TOKEN"] == "tok" and env["PATH"] == "/bin" and env["PYTHONUNBUFFERED"] == "1"


def test_router_argv_passes_only_what_the_user_set():
    args = LauncherArgs(shard_uds_path="/tmp/p", hostname="127.0.0.1", port=8080)
    assert commands.build_router_argv(args) == [
        "text-generation-router", "--master-shard-uds-path", "/tmp/p-0", "--hostname", "127.0.0.1",
        "--port", "8080"]


def test_router_argv_with_every_option_set():
    values = dict(
        model_id="org/m", revision="r", max_concurrent_requests=10, max_best_of=3, max_stop_sequences=2,
        max_top_n_tokens=7, max_input_length=100, max_total_tokens=200, waiting_served_ratio=1.2,
        max_batch_prefill_tokens=512, max_batch_total_tokens=4096, max_waiting_tokens=10, max_batch_size=4,
        validation_workers=3, api_key="k", cors_allow_origin=("https://a", "https://b"), json_output=True,
        otlp_endpoint="http://otel:4317", otlp_service_name="svc", payload_limit=1000,
        max_client_batch_size=2,
        disable_grammar_support=True, tokenizer_config_path="/t.json", disable_prefix_caching=True,
        reasoning_parser="none", api_key_file="/keys", request_timeout=30.0, graceful_termination_timeout=20, client_header_timeout=5.0,
        client_body_timeout=10.0,
        # not router options: never passed
        dtype="float16", num_shard=2, watermark_delta=1.0, shard_uds_path="/tmp/text-generation-server",
    )
    args = LauncherArgs(**values, explicit=frozenset(values))
    argv = commands.build_router_argv(args)
    assert argv[:11] == [
        "text-generation-router", "--master-shard-uds-path", "/tmp/text-generation-server-0",
        "--hostname", "0.0.0.0", "--port", "3000", "--model-id", "org/m", "--revision", "r",
    ]
    assert _options(argv[11:]) == _options([
        "--max-input-tokens", "100",
        "--max-concurrent-requests", "10", "--max-best-of", "3", "--max-stop-sequences", "2",
        "--max-top-n-tokens", "7", "--max-total-tokens", "200", "--waiting-served-ratio", "1.2",
        "--max-batch-prefill-tokens", "512", "--max-batch-total-tokens", "4096", "--max-waiting-tokens", "10",
        "--max-batch-size", "4", "--validation-workers", "3",
        "--cors-allow-origin", "https://a", "--cors-allow-origin", "https://b", "--json-output",
        "--otlp-endpoint", "http://otel:4317", "--otlp-service-name", "svc", "--payload-limit", "1000",
        "--max-client-batch-size", "2", "--disable-grammar-support", "--tokenizer-config-path", "/t.json",
        "--disable-prefix-caching", "--reasoning-parser", "none", "--api-key-file", "/keys",
        "--request-timeout", "30.0",
        "--graceful-termination-timeout", "20", "--client-header-timeout", "5.0", "--client-body-timeout", "10.0",
    ])


def _options(argv: list[str]) -> dict[str, list[str]]:
    """--flag value... pairs (a bare flag has no values), in any order; repeats keep their order."""
    parsed: dict[str, list[str]] = {}
    flag = None
    for token in argv:
        if token.startswith("--"):
            flag = token
            parsed.setdefault(flag, [])
        else:
            parsed[flag].append(token)
    return parsed


def test_api_key_reaches_the_router_through_its_environment_not_its_argv():
    args = LauncherArgs(shard_uds_path="/tmp/p", api_key="s3cret", explicit=frozenset({"api_key"}))
    assert not any("s3cret" in arg or arg == "--api-key" for arg in commands.build_router_argv(args))
    base = {"PATH": "/bin", "API_KEY": "s3cret"}  # the launcher's own env, when the key came from there
    assert commands.router_env(args, base)["API_KEY"] == "s3cret"
    # No other child gets it; nor does the router when no key is set.
    assert "API_KEY" not in commands.shard_env(args, 0, 1, base)
    assert "API_KEY" not in commands.child_env(args, base)
    assert "API_KEY" not in commands.router_env(LauncherArgs(shard_uds_path="/tmp/p"), {"API_KEY": ""})


def test_router_argv_false_flags_are_omitted():
    args = LauncherArgs(shard_uds_path="/tmp/p", json_output=False,
                        explicit=frozenset({"json_output", "disable_grammar_support"}))
    assert "--json-output" not in commands.build_router_argv(args)


def test_gpu_count(monkeypatch):
    monkeypatch.setattr(gpu, "nvidia_smi_count", lambda env: 5)
    assert gpu.count_visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1"}) == 2
    assert gpu.count_visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-abc, GPU-def,GPU-1"}) == 3
    assert gpu.count_visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert gpu.count_visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == 0
    assert gpu.count_visible_gpus({"CUDA_VISIBLE_DEVICES": "0,-1,2"}) == 1
    assert gpu.count_visible_gpus({"NVIDIA_VISIBLE_DEVICES": "all"}) == 5
    assert gpu.count_visible_gpus({"NVIDIA_VISIBLE_DEVICES": "void"}) == 0
    assert gpu.count_visible_gpus({"CUDA_VISIBLE_DEVICES": "3", "NVIDIA_VISIBLE_DEVICES": "all"}) == 1
    assert gpu.count_visible_gpus({}) == 5


def test_gpu_count_without_nvidia_smi():
    assert gpu.nvidia_smi_count({"PATH": "/nonexistent"}) == 0


def test_cuda_graphs_reach_the_shards_only_when_set():
    def argv(**fields):
        return commands.build_shard_argv(LauncherArgs(shard_uds_path="/tmp/p", **fields), 0, 1)

    assert argv(cuda_graphs="1,2,4")[-2:] == ["--cuda-graphs", "1,2,4"]
    assert argv(cuda_graphs="0")[-2:] == ["--cuda-graphs", "0"]
    assert "--cuda-graphs" not in argv()  # the shards' default


def test_lora_adapters_reach_the_shards_only_when_set():
    def argv(**fields):
        return commands.build_shard_argv(LauncherArgs(shard_uds_path="/tmp/p", **fields), 0, 1)

    assert argv(lora_adapters="org/a,b=/tmp/b")[-2:] == ["--lora-adapters", "org/a,b=/tmp/b"]
    assert "--lora-adapters" not in argv()
