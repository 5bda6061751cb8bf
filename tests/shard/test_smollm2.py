"""The bundled SmolLM2-135M-Instruct through the engine equals transformers token for token."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shard.model_source import resolve_model
from pytgi_proto import generate_pb2 as pb
from tests.conftest import default_cache_dir, make_engine
from tests.shard.helpers import (
    BlockPool, Reference, assert_greedy_equal, chat, collect, generate, greedy_request, run_to_completion,
)

pytestmark = pytest.mark.slow
BLOCK = 16
QUESTIONS = [
    "What is deep learning?", "Write a haiku about the sea.", "List three prime numbers.",
    "Who wrote Hamlet?", "Explain gravity to a child in one sentence.", "Translate 'good morning' to French.",
    "What is 12 times 7?", "Name a color.",
]


@pytest.fixture(scope="module")
def smol():
    source = resolve_model(None, cache_dir=default_cache_dir(), offline=True)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    return source.path, tokenizer, Reference(model)


@pytest.fixture(scope="module", params=["sdpa", "paged"])
def engine(smol, request):
    """Every fidelity test runs on both attention backends: torch SDPA and the compiled kernel."""
    kernel = request.getfixturevalue("paged_kernel") if request.param == "paged" else None
    engine = make_engine(smol[0], block_size=BLOCK, num_blocks_tokens=16384, cpu_kernel=kernel)
    assert engine.model.backend.layout == ("paged" if kernel else "padded")
    return engine


def test_single_chat_request(engine, smol):
    _, tokenizer, reference = smol
    prompt = chat(tokenizer, QUESTIONS[0])
    out = generate(engine, [greedy_request(1, prompt, 32, BlockPool(BLOCK))])
    assert_greedy_equal(out[1], reference(prompt, 32))
    assert "learning" in tokenizer.decode(out[1])


def test_eight_requests_batched(engine, smol):
    _, tokenizer, reference = smol
    pool = BlockPool(BLOCK)
    prompts = [chat(tokenizer, q) for q in QUESTIONS]
    out = generate(engine, [greedy_request(i, p, 6 + 2 * i, pool) for i, p in enumerate(prompts)])
    for i, prompt in enumerate(prompts):
        assert_greedy_equal(out[i], reference(prompt, 6 + 2 * i))


def test_chunked_prefill_and_prefix_reuse(engine, smol):
    _, tokenizer, reference = smol
    pool = BlockPool(BLOCK)
    first = chat(tokenizer, QUESTIONS[1])
    outputs: dict[int, list[int]] = {}
    response = engine.prefill(pb.PrefillRequest(batch=pb.Batch(
        id=0, requests=[greedy_request(1, first, 12, pool, chunk_len=10)], size=1)))
    run_to_completion(engine, response, outputs, updates_for=lambda b: [pb.RequestUpdate(request_id=1, chunk_len=10)])
    assert_greedy_equal(outputs[1], reference(first, 12))
    # Same system prompt: the second request reuses the first one's full blocks.
    second = chat(tokenizer, QUESTIONS[2])
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b) // BLOCK * BLOCK
    assert shared >= BLOCK
    request = pb.Request(
        id=2, input_ids=second, cache_len=shared,
        blocks=list(range(1, 1 + shared // BLOCK)) + pool.take(len(second) - shared + 12),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=12, ignore_eos_token=True))
    response = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=[request], size=1)))
    outputs = {}
    collect(response.generations, outputs)
    run_to_completion(engine, response, outputs)
    assert_greedy_equal(outputs[2], reference(second, 12))
