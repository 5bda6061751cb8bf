"""dtype "auto" (shard/dtype.py), its one decision in cli._load, and weights converted on the device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from shard.config import build_config
from shard.distributed import TPGroup
from shard.dtype import checkpoint_dtype, has_bf16, resolve_dtype
from shard.weights import Weights

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@pytest.mark.parametrize("checkpoint, gpu_bf16, expected", [
    (BF16, True, BF16),  # trained in bf16: never squeezed into fp16's range
    (F16, True, F16),  # an fp16 checkpoint stays fp16 even where bf16 exists
    (F16, False, F16),
    (BF16, False, F16),  # no bf16 before compute capability 8.0
    (F32, True, BF16),
    (F32, False, F16),
    (None, True, BF16),  # config.json names no dtype: as float32
    (None, False, F16),
])
def test_auto_on_cuda(checkpoint, gpu_bf16, expected):
    choice = resolve_dtype(None, "cuda", checkpoint, gpu_bf16)
    assert choice.dtype == expected
    assert choice.reason


@pytest.mark.parametrize("checkpoint", [BF16, F16, F32, None])
def test_cpu_keeps_float32_and_an_explicit_dtype_wins(checkpoint):
    assert resolve_dtype(None, "cpu", checkpoint, False).dtype == F32
    for requested in (F16, BF16, F32):
        for device, bf16 in (("cpu", False), ("cuda", True), ("cuda", False)):
            choice = resolve_dtype(requested, device, checkpoint, bf16)
            assert choice.dtype == requested and choice.reason == "--dtype"


def test_reasons_say_why():
    assert "checkpoint" in resolve_dtype(None, "cuda", BF16, True).reason
    assert "compute capability" in resolve_dtype(None, "cuda", BF16, False).reason
    assert resolve_dtype(None, "cuda", F32, True).reason.startswith("float32 checkpoint")
    assert resolve_dtype(None, "cuda", None, True).reason.startswith("unknown checkpoint")


@pytest.mark.parametrize("content, expected", [
    ({"torch_dtype": "bfloat16"}, BF16),
    ({"torch_dtype": "torch.float16"}, F16),
    ({"dtype": "bfloat16"}, BF16),  # transformers >= 4.56 writes `dtype`
    ({"torch_dtype": "float32"}, F32),
    ({"text_config": {"torch_dtype": "bfloat16"}}, BF16),  # multimodal: the text model's
    ({"torch_dtype": "float8_e4m3fn"}, None),
    ({"torch_dtype": None}, None),
    ({}, None),
])
def test_checkpoint_dtype_from_config_json(tmp_path: Path, content, expected):
    (tmp_path / "config.json").write_text(json.dumps(content))
    assert checkpoint_dtype(tmp_path) == expected


def test_checkpoint_dtype_without_config_json(tmp_path: Path):
    assert checkpoint_dtype(tmp_path) is None


def test_checkpoint_dtype_of_a_saved_bf16_model(bf16_llama: Path):
    assert checkpoint_dtype(bf16_llama) == BF16


def test_has_bf16_never_asks_cuda_for_a_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: pytest.fail("CUDA queried"))
    assert not has_bf16(torch.device("cpu"))


@pytest.mark.parametrize("capability, expected", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_has_bf16_from_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    assert has_bf16(torch.device("cuda", 0)) is expected


def test_build_config_leaves_auto_to_load(monkeypatch):
    kwargs = dict(revision=None, uds_path="/tmp/x", sharded=False, trust_remote_code=False,
                  json_output=False, log_level="INFO", device="cpu")
    assert build_config(None, dtype=None, **kwargs).dtype is None
    assert build_config(None, dtype="bfloat16", **kwargs).dtype == BF16


@pytest.fixture(scope="module")
def bf16_llama(tiny_llama: Path, tmp_path_factory) -> Path:
    import transformers

    folder = tmp_path_factory.mktemp("tiny-llama-bf16")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=BF16)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("requested, expected", [(None, F32), ("bfloat16", BF16)])
def test_load_decides_once_and_everything_sees_it(monkeypatch, bf16_llama: Path, requested, expected):
    from shard.cli import _load

    monkeypatch.setenv("ATTENTION", "sdpa")  # no compiled CPU kernel needed here
    config = build_config(str(bf16_llama), revision=None, uds_path="/tmp/x", sharded=False, dtype=requested,
                          trust_remote_code=False, json_output=False, log_level="INFO", device="cpu")
    engine = _load(config)
    assert engine.config.dtype == expected  # a bf16 checkpoint on the CPU still serves float32
    assert engine.get_info().dtype == str(expected)
    assert engine.model.info.kv_spec.dtype == expected
    assert {p.dtype for p in engine.model.parameters() if p.is_floating_point()} == {expected}


class _RecordTo(TorchFunctionMode):
    """Records (source device, source dtype, result device, result dtype) of every Tensor.to."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func is torch.Tensor.to:
            self.calls.append((args[0].device, args[0].dtype, result.device, result.dtype))
        return result


def test_weights_move_first_then_convert_on_the_device(tiny_llama: Path):
    # The meta device stands in for a GPU: only the order of the two steps is observed. A
    # conversion must never run on the CPU on its way to another device (torch would do it there).
    meta = torch.device("meta")
    weights = Weights(tiny_llama, TPGroup(), BF16, meta)  # the checkpoint is float32
    with _RecordTo() as record:
        tensor = weights.get("model.embed_tokens.weight")
    assert tensor.device == meta and tensor.dtype == BF16
    conversions = [call for call in record.calls if call[1] != call[3]]
    assert conversions and all(source == meta for source, *_ in conversions)
