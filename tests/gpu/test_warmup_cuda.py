"""On a CUDA GPU: dtype auto, the KV budget as TGI's share of total memory, and a warmup whose
measured peak includes a decode step's logits and sampler at the warmed batch (skipped without
CUDA; scripts/gpu-smoke.sh runs it)."""

from __future__ import annotations

import gc
import importlib.util
from pathlib import Path

import pytest
import torch

from shard.config import build_config
from shard.sampling import warmup_rows
from pytgi_proto import generate_pb2 as pb
from tests.shard.helpers import BlockPool

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Llama 3's vocabulary on a 2-layer model: a decode step's logits and sampler temporaries at the
# warmed batch (~1 GB at 128 rows) dwarf everything else the step allocates.
WIDE_VOCAB = 128256


@pytest.fixture(scope="module")
def bf16_wide_llama(tmp_path_factory) -> Path:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=WIDE_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
        eos_token_id=2, bos_token_id=1)
    folder = tmp_path_factory.mktemp("wide-llama-bf16")
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval().save_pretrained(folder)
    return folder


@pytest.fixture
def load_cuda(monkeypatch):
    """`shard.cli._load` on cuda:0 as the shard runs it; the process memory cap is lifted after."""
    from shard.cli import _load

    engines = []

    def load(folder: Path, **env):
        # flash-attn when it imports (the production path), else the SDPA opt-in.
        monkeypatch.setenv("ATTENTION", "paged" if importlib.util.find_spec("flash_attn") else "sdpa")
        for name in ("CUDA_MEMORY_FRACTION", "TGI_WIGGLE_ROOM", "MAX_BATCH_SIZE"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        config = build_config(str(folder), revision=None, uds_path="/tmp/pytgi-gpu-test", sharded=False,
                              dtype=None, trust_remote_code=False, json_output=False, log_level="INFO",
                              device="cuda")
        engines.append(_load(config))
        return engines[-1]

    yield load
    device = engines[0].config.device if engines else torch.device("cuda", 0)
    engines.clear()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0, device)


def test_auto_dtype_keeps_a_bf16_checkpoint_in_bf16(load_cuda, bf16_wide_llama: Path):
    engine = load_cuda(bf16_wide_llama)
    assert engine.config.dtype == torch.bfloat16
    params = list(engine.model.parameters())
    assert {p.dtype for p in params if p.is_floating_point()} == {torch.bfloat16}
    assert {p.device.type for p in params} == {"cuda"}


def test_auto_dtype_serves_a_float32_checkpoint_in_bf16(load_cuda, tiny_llama: Path):
    assert load_cuda(tiny_llama).config.dtype == torch.bfloat16  # every GPU this runs on is Ampere+


def _every_stage(request_id: int) -> pb.NextTokenChooserParameters:
    return pb.NextTokenChooserParameters(
        temperature=0.7, top_k=50, top_p=0.9, typical_p=0.95, min_p=0.05, do_sample=True, seed=request_id,
        has_seed=True, repetition_penalty=1.1, frequency_penalty=0.1, presence_penalty=0.1, watermark=True,
        logit_bias={5: 1.0})


def test_kv_budget_within_the_fraction_and_a_decode_at_the_warmed_batch_fits(load_cuda, bf16_wide_llama):
    # A hard cap of 30% of the GPU (TGI's torch.cuda.set_per_process_memory_fraction) and a
    # margin of 0.1% of it: the decode below fits only if the warmup counted its logits and
    # sampler (~1 GB) in the peak it held back from the KV cache.
    engine = load_cuda(bf16_wide_llama, CUDA_MEMORY_FRACTION="0.3", TGI_WIGGLE_ROOM="0.999")
    device = engine.config.device
    total = torch.cuda.get_device_properties(device).total_memory
    prompt = list(range(3, 1003))
    warm = pb.WarmupRequest(max_prefill_tokens=len(prompt), batch=pb.Batch(id=0, size=1, requests=[pb.Request(
        id=0, input_ids=prompt, stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=2))]))
    response = engine.warmup(warm)

    kv_bytes = engine.kv_cache.nbytes
    assert torch.cuda.memory_allocated(device) <= 0.3 * 0.999 * total  # weights + KV cache
    assert kv_bytes >= 0.2 * total  # and the KV cache took most of the share (the weights are tiny)
    assert response.num_blocks == engine.kv_cache.num_blocks

    rows = warmup_rows(device, engine.config.max_batch_size)
    pool = BlockPool(engine.block_size)
    batch = pb.Batch(id=1, size=rows, requests=[pb.Request(
        id=i, input_ids=[1, 7 + i, 9, 11, 13, 15, 17, 19], parameters=_every_stage(i), top_n_tokens=5,
        blocks=pool.take(8 + 4), stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=4,
                                                                                   ignore_eos_token=True))
        for i in range(rows)])
    step = engine.prefill(pb.PrefillRequest(batch=batch))
    assert len(step.generations) == rows
    for _ in range(3):
        step = engine.decode(pb.DecodeRequest(batches=[step.batch]))
        assert len(step.generations) == rows
    assert all(len(g.top_tokens[0].ids) == 5 for g in step.generations)
