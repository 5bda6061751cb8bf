"""CPU weight quantization (shard/layers/quant.py): the quantizers' error bounds, the kernels
against a dequantized reference, batch invariance, and a quantized model served end to end."""

from __future__ import annotations

import random

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoModelForCausalLM

from pytgi_proto import generate_pb2 as pb
from shard.config import build_config
from shard.distributed import TPGroup
from shard.layers.quant import Int4Linear, Int8DynamicLinear, make_linear, quantize_int4, quantize_int8
from shard.models import UnsupportedModelError, get_model
from shard.models.base import ModelContext
from tests.conftest import make_engine, save_tiny
from tests.shard.helpers import BlockPool, generate, greedy_request


@pytest.fixture
def weight():
    torch.manual_seed(0)
    return torch.randn(96, 128) * 0.05


def test_int8_quantizer_error_is_at_most_half_a_step(weight):
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    error = (weight - q.float() * scale[:, None]).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()


def test_int4_quantizer_error_is_at_most_half_a_step(weight):
    q, scale, low = quantize_int4(weight, 32)
    assert q.min() >= 0 and q.max() <= 15
    dequant = (q.view(96, 4, 32).float() * scale[..., None] + low[..., None]).view(96, 128)
    step = scale.repeat_interleave(32, dim=1)
    assert ((weight - dequant).abs() <= step / 2 + 1e-7).all()


def test_int8_linear_is_close_to_fp32_and_keeps_shape_and_bias(weight):
    bias = torch.randn(96)
    layer = Int8DynamicLinear(weight, bias)
    x = torch.randn(2, 5, 128)
    x[0, 1] *= 100  # one loud token must not cost the others their precision (per-token scales)
    out, ref = layer(x), F.linear(x, weight, bias)
    assert out.shape == (2, 5, 96) and out.dtype == torch.float32
    rel = (out - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert rel.max() < 0.03, rel


def test_int4_linear_matches_its_dequantized_weights(weight):
    layer = Int4Linear(weight, None)
    assert layer.group_size == 32
    q, scale, low = quantize_int4(weight, 32)
    dequant = (q.view(96, 4, 32).float() * scale[..., None] + low[..., None]).view(96, 128)
    x = torch.randn(7, 128)
    expected = F.linear(x.bfloat16().float(), dequant)
    assert torch.allclose(layer(x), expected, rtol=2e-2, atol=2e-2)
    rel = (layer(x) - F.linear(x, weight)).norm(dim=-1) / F.linear(x, weight).norm(dim=-1)
    assert rel.max() < 0.15


@pytest.mark.parametrize("cls", [Int8DynamicLinear, Int4Linear])
def test_a_row_gets_the_same_bits_whatever_its_batch_mates(cls, weight):
    layer = cls(weight, torch.randn(96))
    x = torch.randn(9, 128)
    x[4] *= 1000
    batched = layer(x)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(9)])
    assert torch.equal(batched, alone)


def test_make_linear_errors():
    with pytest.raises(ValueError, match="unsupported quantization 'fp8'"):
        make_linear(torch.zeros(4, 32), None, "fp8")
    with pytest.raises(ValueError, match="int4 needs input features divisible by 32 \\(got 40\\)"):
        make_linear(torch.zeros(4, 40), None, "int4")
    assert type(make_linear(torch.zeros(4, 32), None, None)).__name__ == "DenseLinear"


def test_quantize_is_cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the device check passes first
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="--quantize int8 is implemented for CPU only"):
        build_config(None, revision=None, uds_path="/tmp/x", sharded=False, dtype=None, trust_remote_code=False,
                     json_output=False, log_level="INFO", device="cuda:0", quantize="int8")


def test_transformers_fallback_refuses_quantize(tmp_path):
    folder = save_tiny("gpt2", tmp_path / "gpt2")
    with pytest.raises(UnsupportedModelError, match="--quantize int4 is implemented for the fast-path"):
        get_model(folder, ModelContext(TPGroup(), torch.device("cpu"), torch.float32, 4, quantize="int4"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("llama-q"))


# Worst logprob gaps seen on this tiny model: int8 0.06 nats, int4 0.48.
@pytest.mark.parametrize("method, max_gap", [("int8", 0.15), ("int4", 0.75)])
def test_quantized_model_serves_batches_and_stays_close_to_fp32(tiny, method, max_gap):
    engine = make_engine(tiny, quantize=method)
    rng = random.Random(3)
    prompts = [[rng.randrange(2, 120) for _ in range(rng.randrange(4, 30))] for _ in range(6)]
    pool = BlockPool(4)
    batched = generate(engine, [greedy_request(i, p, 12, pool) for i, p in enumerate(prompts)])
    for i, prompt in enumerate(prompts):  # batch-invariant kernels: alone == batched, token for token
        alone = generate(make_engine(tiny, quantize=method), [greedy_request(0, prompt, 12, BlockPool(4))])
        assert alone[0] == batched[i]
    # Teacher-forced on fp32's own continuation: the quantized model's logprob of each fp32 token.
    reference = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    fp32 = generate(make_engine(tiny), [greedy_request(i, p, 12, BlockPool(4)) for i, p in enumerate(prompts)])
    gaps = []
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            sequence = prompt + fp32[i]
            request = greedy_request(0, sequence, 1, BlockPool(4), prefill_logprobs=True)
            got = make_engine(tiny, quantize=method).prefill(pb.PrefillRequest(batch=pb.Batch(id=0, requests=[request], size=1)))
            quant_logprobs = list(got.generations[0].prefill_tokens.logprobs)[len(prompt):]
            ref = reference(torch.tensor([sequence])).logits[0].log_softmax(-1)
            ref_logprobs = [ref[p - 1, sequence[p]].item() for p in range(len(prompt), len(sequence))]
            gaps += [abs(a - b) for a, b in zip(quant_logprobs, ref_logprobs)]
    assert len(gaps) == 6 * 12 and max(gaps) < max_gap, max(gaps)
