"""Shard process edges: one-line errors, JSON logs, warmup sizing from a memory budget."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from pytgi_proto import generate_pb2 as pb
from shard.distributed import TPGroup
from shard.engine import Engine
from shard.log import JsonFormatter
from shard.models import get_model
from shard.models.base import ModelContext
from tests.conftest import make_config

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("model", ["/nonexistent/model", "./missing.gguf"])
def test_missing_model_is_one_line_not_a_traceback(model, tmp_path):
    result = subprocess.run([str(BIN / "text-generation-server"), "serve", model, "--uds-path", str(tmp_path / "s")],
                            capture_output=True, text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin"})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model path not found:"), result.stderr
    assert "Traceback" not in result.stderr


def test_json_log_lines():
    record = logging.LogRecord("shard.engine", logging.INFO, __file__, 1, "KV cache: %d blocks", (7,), None)
    entry = json.loads(JsonFormatter(rank=1).format(record))
    assert entry["message"] == "KV cache: 7 blocks" and entry["rank"] == 1 and entry["level"] == "INFO"


def test_warmup_sizes_the_cache_from_tokens_or_memory(tiny_llama):
    config = make_config(str(tiny_llama), block_size=4)
    model = get_model(tiny_llama, ModelContext(TPGroup(), config.device, config.dtype, 4))
    engine = Engine(config, model, TPGroup(), tiny_llama)
    warm = pb.WarmupRequest(max_prefill_tokens=32, max_batch_total_tokens=100, batch=pb.Batch(id=0, requests=[
        pb.Request(id=0, input_ids=list(range(3, 35)), stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=2))]))
    response = engine.warmup(warm)
    assert response.num_blocks == 1 + 25 and response.max_supported_total_tokens == 100
    assert response.max_total_tokens == 100 and response.max_input_tokens == 99  # capped by capacity
    assert not engine.batches  # the warmup batch is gone
    spec = model.info.kv_spec
    small = Engine(replace(config, memory_fraction=1e-15), model, TPGroup(), tiny_llama)
    with pytest.raises(RuntimeError, match="not enough memory"):
        small.warmup(pb.WarmupRequest(max_prefill_tokens=1))
    budget = Engine(replace(config, memory_fraction=0.001), model, TPGroup(), tiny_llama).warmup(pb.WarmupRequest(max_prefill_tokens=1))
    assert budget.num_blocks > 100 and budget.max_total_tokens == 512  # max_position_embeddings
    assert budget.max_supported_total_tokens == (budget.num_blocks - 1) * spec.block_size
