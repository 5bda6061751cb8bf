"""CLI parsing: env vars, SageMaker mapping, shard count, one-line errors, the flag table."""

from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

from launcher import cli, config
from launcher.config import ConfigError, LauncherArgs, resolve_num_shard

ENV_NAMES = [opt.envvar for opt in cli.main.params if isinstance(opt, click.Option) and opt.envvar]
OTHER_ENV = [*config.SAGEMAKER_ENV, "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "LOG_LEVEL"]


@pytest.fixture
def launched(monkeypatch):
    """Run the CLI with a clean environment (no GPU) and capture what it would launch."""
    for name in ENV_NAMES + OTHER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    calls = []

    def fake_launch(args, num_shard, env):
        calls.append((args, num_shard))
        return 0

    monkeypatch.setattr(cli, "launch", fake_launch)

    def invoke(argv=(), env=None):
        result = CliRunner().invoke(cli.main, list(argv), env=env)
        return result, (calls[-1] if calls else (None, None))

    return invoke


def test_defaults(launched):
    result, (args, num_shard) = launched()
    assert result.exit_code == 0, result.output
    assert num_shard == 1
    assert args.model_id is None and args.port == 3000 and args.hostname == "0.0.0.0"
    assert args.max_concurrent_requests == 128 and args.max_best_of == 2 and args.max_stop_sequences == 4
    assert args.max_top_n_tokens == 5 and args.max_client_batch_size == 4 and args.payload_limit == 2_000_000
    assert args.graceful_termination_timeout == 90 and args.shard_uds_path is None  # a private dir
    assert args.master_addr == "localhost" and args.master_port == 29500 and args.validation_workers == 2
    assert args.explicit == frozenset() and args.num_gpus == 0  # CUDA_VISIBLE_DEVICES="": CPU shards


def test_flags_and_env_vars(launched):
    result, (args, _) = launched(
        ["--model-id", "m", "-p", "8080", "--cors-allow-origin", "a", "--cors-allow-origin", "b", "-g", "5",
         "--trust-remote-code", "--sharded", "false"],
        env={"MAX_BATCH_SIZE": "7", "JSON_OUTPUT": "true", "PORT": "9999", "API_KEY": "k",
             "LOG_LEVEL": "debug"},
    )
    assert result.exit_code == 0, result.output
    assert args.model_id == "m" and args.port == 8080  # the flag beats PORT
    assert args.cors_allow_origin == ("a", "b") and args.graceful_termination_timeout == 5
    assert args.trust_remote_code is True and args.sharded is False
    assert args.max_batch_size == 7 and args.json_output is True and args.api_key == "k"
    assert args.log_level == "debug"
    set_by_user = {"model_id", "port", "max_batch_size", "json_output", "api_key", "cors_allow_origin"}
    assert set_by_user <= args.explicit
    assert "max_concurrent_requests" not in args.explicit


def test_every_flag_has_tgis_env_var():
    for opt in cli.main.params:
        if isinstance(opt, click.Option) and opt.name not in ("help", "version", "env"):
            assert opt.envvar == opt.name.upper(), opt.name
    fields = {name for name in config.defaults() if name not in ("log_level", "num_gpus")}  # not flags
    assert fields == {opt.name for opt in cli.main.params if opt.name not in ("help", "version")}


def test_sagemaker_env_maps_when_tgi_names_are_unset(launched):
    sm = {"HF_MODEL_ID": "sm/model", "SM_NUM_GPUS": "2", "HF_MODEL_REVISION": "abc",
          "HF_MODEL_TRUST_REMOTE_CODE": "true"}
    result, (args, num_shard) = launched(env=sm)
    assert result.exit_code == 0, result.output
    assert (args.model_id, args.num_shard, num_shard, args.revision) == ("sm/model", 2, 2, "abc")
    assert args.trust_remote_code is True
    assert {"model_id", "num_shard", "revision", "trust_remote_code"} <= args.explicit

    result, (args, num_shard) = launched(["--revision", "flag"],
                                         env={**sm, "MODEL_ID": "tgi/model", "NUM_SHARD": "3"})
    assert (args.model_id, num_shard, args.revision) == ("tgi/model", 3, "flag")


def test_sagemaker_cpu_instance_num_gpus_0_is_ignored(launched):
    result, (args, num_shard) = launched(env={"SM_NUM_GPUS": "0"})
    assert result.exit_code == 0, result.output
    assert args.num_shard is None and num_shard == 1


def test_sagemaker_quantize_is_rejected_like_the_flag(launched):
    result, _ = launched(env={"HF_MODEL_QUANTIZE": "gptq"})
    assert result.exit_code == 2
    assert result.stderr == "error: --quantize gptq is not supported; pytgi implements int8, int4 and gguf (CPU weight quantization)\n"


@pytest.mark.parametrize("sharded, num_shard, gpus, expected", [
    (True, None, 4, 4),
    (True, 2, 0, 2),
    (False, 3, 8, 3),
    (False, None, 8, 1),
    (None, None, 8, 8),
    (None, None, 0, 1),
    (None, 3, 0, 3),
])
def test_shard_count_table(sharded, num_shard, gpus, expected):
    assert resolve_num_shard(sharded, num_shard, gpus) == expected


@pytest.mark.parametrize("sharded, num_shard, gpus", [
    (True, None, 1), (True, None, 0), (True, 1, 8), (None, 0, 0), (False, 0, 4), (True, 0, 4),
])
def test_shard_count_errors(sharded, num_shard, gpus):
    with pytest.raises(ConfigError):
        resolve_num_shard(sharded, num_shard, gpus)


def test_shard_count_from_visible_gpus(launched):
    result, (args, num_shard) = launched(env={"CUDA_VISIBLE_DEVICES": "0,1,2"})
    assert result.exit_code == 0 and num_shard == 3
    assert args.num_gpus == 3  # the shards start with --device cuda (test_commands.py)


@pytest.mark.parametrize("argv, message", [
    (["--max-input-tokens", "10", "--max-total-tokens", "10"], "must be < `max_total_tokens`"),
    (["--max-total-tokens", "100", "--max-batch-total-tokens", "50"], "must be <= `max_batch_total_tokens`"),
    (["--max-input-tokens", "1", "--max-input-length", "2"], "both --max-input-tokens"),
    (["--max-input-length", "10", "--max-total-tokens", "5"], "must be < `max_total_tokens`"),
    (["--num-shard", "0"], "`num_shard` cannot be < 1"),
    (["--sharded", "true", "--num-shard", "1"], "--sharded true is incompatible with --num-shard 1"),
    (["--sharded", "true"], "--sharded true needs more than one visible GPU"),
    (["--validation-workers", "0"], "`validation_workers` must be > 0"),
    (["--max-input-tokens", "100", "--max-batch-prefill-tokens", "50"], "must be >= `max_input_tokens`"),
    (["--max-batch-prefill-tokens", "100", "--max-batch-total-tokens", "50"],
     "must be <= `max_batch_total_tokens`"),
    (["--nnodes", "2"], "--nnodes > 1 needs --shard-tcp-address HOST:PORT"),
    (["--nnodes", "2", "--node-rank", "2"], "--node-rank must be in [0, --nnodes) (got 2 of 2)"),
    (["--quantize", "awq"], "--quantize awq is not supported; pytgi implements int8, int4 and gguf"),
    (["--quantize", "nonsense"], "Invalid value for '--quantize'"),
    (["--dtype", "float64"], "Invalid value for '--dtype'"),
    (["--port", "70000"], "--port 70000 is not a valid TCP port"),
    (["--max-batch-size", "0"], "`max_batch_size` must be > 0"),
    (["--shard-uds-path", "/tmp/" + "x" * 120], "--shard-uds-path is too long"),
    (["--shard-uds-path", ""], "--shard-uds-path must not be empty"),
    (["--request-timeout", "0"], "`request_timeout` must be > 0"),
    (["--client-body-timeout", "-1"], "`client_body_timeout` must be > 0"),
    (["--port", "abc"], "'abc' is not a valid integer"),
    (["--no-such-flag"], "No such option"),
])
def test_contradictions_are_one_error_line_before_starting(launched, argv, message):
    result, (args, _) = launched(argv)
    assert result.exit_code == 2
    assert args is None  # nothing was launched
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_contradiction_from_env_vars(launched):
    result, _ = launched(env={"MAX_INPUT_TOKENS": "4096", "MAX_TOTAL_TOKENS": "1024"})
    assert result.exit_code == 2
    assert result.stderr == "error: `max_input_tokens`(4096) must be < `max_total_tokens`(1024)\n"


def test_exit_code_of_the_launch_is_the_process_exit_code(launched, monkeypatch):
    monkeypatch.setattr(cli, "launch", lambda args, num_shard, env: 1)
    result = CliRunner().invoke(cli.main, [])
    assert result.exit_code == 1


def test_help_and_version():
    result = CliRunner().invoke(cli.main, ["--help"])
    assert result.exit_code == 0 and "--max-batch-prefill-tokens" in result.output
    result = CliRunner().invoke(cli.main, ["--version"])
    assert result.exit_code == 0 and "pytgi" in result.output


def test_env_info_lists_versions_and_devices():
    lines = cli.env_info({"CUDA_VISIBLE_DEVICES": "0,1", "HF_HOME": "/data"})
    text = "\n".join(lines)
    assert "pytgi " in text and "python " in text and "torch " in text
    assert "visible GPUs: 2" in text and "HF_HOME=/data" in text


def test_api_key_is_redacted_in_the_logged_args():
    args = LauncherArgs(api_key="secret")
    assert "secret" not in repr(args.redacted()) and args.api_key == "secret"


def test_flag_table_renders():
    """`launcher.cli.flag_table()` renders one well-formed row per option (tests/test_readme.py
    checks that the README embeds exactly this table)."""
    table = cli.flag_table()
    rows = table.strip().splitlines()
    assert rows[0] == "| Flag | Env var | Default | Description |"
    options = [opt for opt in cli.main.params
               if isinstance(opt, click.Option) and opt.name not in ("help", "version")]
    assert len(rows) == 2 + len(options)
    for opt, row in zip(options, rows[2:]):
        # four cells: escaped pipes (`true\|false`) stay inside their cell
        assert len(re.split(r"(?<!\\)\|", row.strip().strip("|"))) == 4, row
        assert f"`--{opt.name.replace('_', '-')}`" in row
        if opt.envvar:
            assert f"`{opt.envvar}`" in row
    assert "| `-p`, `--port` | `PORT` | `3000` |" in table


def test_cuda_graphs_from_the_flag_or_tgis_env_var(launched):
    result, (args, _) = launched(env={"CUDA_GRAPHS": "1,2,4"})
    assert result.exit_code == 0 and args.cuda_graphs == "1,2,4" and "cuda_graphs" in args.explicit
    result, (args, _) = launched(["--cuda-graphs", "0"], env={"CUDA_GRAPHS": "1,2,4"})
    assert result.exit_code == 0 and args.cuda_graphs == "0"
    assert launched()[1][0].cuda_graphs is None
    assert launched(["--cuda-graphs", " "])[0].exit_code == 0  # blank: the shards' default, as in the shard


@pytest.mark.parametrize("value", ["0,4", "-1", "2,,4", "a", "1.5"])
def test_cuda_graphs_format_is_checked_before_starting(launched, value):
    result, (args, _) = launched(["--cuda-graphs", value])
    assert result.exit_code == 2 and args is None
    message = f"--cuda-graphs must be positive batch sizes separated by commas, or 0 (got {value!r})"
    assert result.stderr == f"error: {message}\n"


def test_lora_adapters_from_the_flag_or_tgis_env_var(launched):
    result, (args, _) = launched(env={"LORA_ADAPTERS": "org/a,b=/tmp/b@v1"})
    assert result.exit_code == 0 and args.lora_adapters == "org/a,b=/tmp/b@v1"


@pytest.mark.parametrize("value,message", [
    ("a=b=c", "Invalid LoRA adapter format: 'a=b=c' (expected id, id@revision or id=path)"),
    ("org/a,,b", "Invalid LoRA adapter format: '' (expected id, id@revision or id=path)"),
    ("tgi=/tmp/x", "Invalid LoRA adapter id 'tgi': it is reserved for the base model"),
    ("a=/x,a=/y", "LoRA adapter id 'a' is given twice"),
])
def test_lora_adapters_format_is_checked_before_starting(launched, value, message):
    result, (args, _) = launched(["--lora-adapters", value])
    assert result.exit_code == 2 and args is None
    assert result.stderr == f"error: {message}\n"
