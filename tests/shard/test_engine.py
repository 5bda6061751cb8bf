"""Engine correctness: greedy tokens equal transformers' generate (fp32) whatever the batch
composition, filtering, concatenation, chunking or prefix reuse."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from pytgi_proto import generate_pb2 as pb
from tests.conftest import make_engine, save_tiny
from tests.shard.helpers import BlockPool, Reference, assert_greedy_equal, collect, generate, greedy_request, run_to_completion

BLOCK = 4


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def model_dir(request, tmp_path_factory):
    return save_tiny(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def reference(model_dir):
    return Reference(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval())


@pytest.fixture
def engine(model_dir):
    return make_engine(model_dir, block_size=BLOCK)


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, 120) for _ in range(rng.randrange(3, 40))] for _ in range(count)]


def test_single_request(engine, reference):
    prompt = prompts(1)[0]
    out = generate(engine, [greedy_request(1, prompt, 12, BlockPool(BLOCK))])
    assert_greedy_equal(out[1], reference(prompt, 12))


def test_eight_mixed_length_requests_batched(engine, reference):
    pool = BlockPool(BLOCK)
    batch = prompts(8, seed=1)
    lengths = [5, 9, 12, 3, 16, 7, 10, 6]  # different max_new_tokens: requests finish at different steps
    out = generate(engine, [greedy_request(i, p, n, pool) for i, (p, n) in enumerate(zip(batch, lengths))])
    for i, (prompt, n) in enumerate(zip(batch, lengths)):
        assert_greedy_equal(out[i], reference(prompt, n))


def test_filter_and_concatenate(engine, reference):
    pool = BlockPool(BLOCK)
    first, second = prompts(4, seed=2), prompts(3, seed=3)
    outputs: dict[int, list[int]] = {}
    r1 = engine.prefill(pb.PrefillRequest(batch=pb.Batch(
        id=1, requests=[greedy_request(i, p, 10, pool) for i, p in enumerate(first)], size=4)))
    collect(r1.generations, outputs)
    r1 = engine.decode(pb.DecodeRequest(batches=[r1.batch]))
    collect(r1.generations, outputs)
    # The router cancels request 2 (e.g. a client disconnect): it leaves the batch.
    kept = engine.filter_batch(1, [0, 1, 3])
    assert list(kept.request_ids) == [0, 1, 3]
    # A second batch is prefilled on its own, then both decode together (concatenation).
    r2 = engine.prefill(pb.PrefillRequest(batch=pb.Batch(
        id=2, requests=[greedy_request(10 + i, p, 8, pool) for i, p in enumerate(second)], size=3)))
    collect(r2.generations, outputs)
    response = engine.decode(pb.DecodeRequest(batches=[kept, r2.batch]))
    assert response.batch.id == 1 and len(response.batch.request_ids) == 6
    collect(response.generations, outputs)
    run_to_completion(engine, response, outputs)
    for i in (0, 1, 3):
        assert_greedy_equal(outputs[i], reference(first[i], 10))
    for i, prompt in enumerate(second):
        assert_greedy_equal(outputs[10 + i], reference(prompt, 8))
    assert len(outputs[2]) == 2  # stopped when filtered


def test_mixed_prefill_and_decode_step(engine, reference):
    """Prefill with a cached batch: new prompts and running decodes in one forward."""
    pool = BlockPool(BLOCK)
    old, new = prompts(3, seed=4), prompts(2, seed=5)
    outputs: dict[int, list[int]] = {}
    r = engine.prefill(pb.PrefillRequest(batch=pb.Batch(
        id=1, requests=[greedy_request(i, p, 9, pool) for i, p in enumerate(old)], size=3)))
    collect(r.generations, outputs)
    r = engine.prefill(pb.PrefillRequest(
        batch=pb.Batch(id=2, requests=[greedy_request(20 + i, p, 9, pool) for i, p in enumerate(new)], size=2),
        cached_batch=r.batch))
    assert r.batch.id == 2
    collect(r.generations, outputs)
    run_to_completion(engine, r, outputs)
    for i, prompt in enumerate(old):
        assert_greedy_equal(outputs[i], reference(prompt, 9))
    for i, prompt in enumerate(new):
        assert_greedy_equal(outputs[20 + i], reference(prompt, 9))


def test_chunked_prefill(engine, reference):
    pool = BlockPool(BLOCK)
    prompt = prompts(1, seed=6)[0] + prompts(1, seed=7)[0]
    request = greedy_request(1, prompt, 10, pool, chunk_len=5)
    outputs: dict[int, list[int]] = {}
    response = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=0, requests=[request], size=1)))
    assert not response.generations  # the prompt is not complete yet
    assert response.batch.current_tokens == len(prompt) - 5
    chunks = 1

    def next_chunk(batch):
        nonlocal chunks
        chunks += 1
        return [pb.RequestUpdate(request_id=1, chunk_len=7)]

    run_to_completion(engine, response, outputs, updates_for=next_chunk)
    assert_greedy_equal(outputs[1], reference(prompt, 10))
    assert chunks > 2


def test_prefix_reuse_through_cache_len(engine, reference):
    """A second request sharing a prefix reads the first one's blocks instead of recomputing."""
    pool = BlockPool(BLOCK)
    shared = prompts(1, seed=8)[0][:3] * 4  # 12 tokens = 3 full blocks
    first = shared + [7, 8, 9]
    generate(engine, [greedy_request(1, first, 4, pool)])
    prefix_blocks = list(range(1, 4))  # the first request's first three blocks
    second = shared + [11, 12, 13, 14, 15]
    tail = pool.take(len(second) - len(shared) + 6)
    request = pb.Request(
        id=2, input_ids=second, blocks=prefix_blocks + tail, cache_len=len(shared),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=6, ignore_eos_token=True),
    )
    response = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=5, requests=[request], size=1)))
    outputs: dict[int, list[int]] = {}
    collect(response.generations, outputs)
    run_to_completion(engine, response, outputs)
    assert_greedy_equal(outputs[2], reference(second, 6))


def test_prefill_logprobs_match_reference(engine, reference):
    model = reference.model
    prompt = prompts(1, seed=9)[0]
    request = greedy_request(1, prompt, 2, BlockPool(BLOCK), prefill_logprobs=True, top_n_tokens=3)
    response = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=0, requests=[request], size=1)))
    generation = response.generations[0]
    with torch.no_grad():
        logprobs = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
    expected = [logprobs[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    got = list(generation.prefill_tokens.logprobs)
    assert list(generation.prefill_tokens.ids) == prompt
    assert math.isnan(got[0])
    assert got[1:] == pytest.approx(expected, abs=1e-4)
    assert generation.tokens.logprobs[0] == pytest.approx(logprobs[-1].max().item(), abs=1e-4)
    top = generation.top_tokens[0]
    assert list(top.ids) == logprobs[-1].topk(3).indices.tolist()
    assert list(top.logprobs) == pytest.approx(logprobs[-1].topk(3).values.tolist(), abs=1e-4)


def test_stopping(engine):
    pool = BlockPool(BLOCK)
    prompt = prompts(1, seed=10)[0]
    free = generate(engine, [greedy_request(1, prompt, 8, pool)])[1]
    stop_token = free[3]
    request = greedy_request(2, prompt, 8, pool)
    request.stopping_parameters.stop_token_ids.append(stop_token)
    response = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=0, requests=[request], size=1)))
    outputs: dict[int, list[int]] = {}
    last = response
    collect(response.generations, outputs)
    while last.HasField("batch"):
        last = engine.decode(pb.DecodeRequest(batches=[last.batch]))
        collect(last.generations, outputs)
    assert outputs[2] == free[: free.index(stop_token) + 1]
    assert last.generations[-1].finished.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    # EOS stops unless ignore_eos_token: make the third token the EOS id of the engine.
    engine.eos_ids = frozenset({free[2]})
    out = generate(engine, [greedy_request(3, prompt, 8, pool, ignore_eos=False)])
    assert out[3] == free[: free.index(free[2]) + 1]


def test_seeded_sampling_is_independent_of_batch_mates(engine):
    pool = BlockPool(BLOCK)
    prompt = prompts(1, seed=11)[0]

    def sampled(request_id: int, seed: int) -> pb.Request:
        request = greedy_request(request_id, prompt, 8, pool)
        request.parameters.CopyFrom(pb.NextTokenChooserParameters(
            do_sample=True, temperature=1.5, top_k=50, seed=seed, has_seed=True))
        return request

    alone = generate(engine, [sampled(1, 1234)])[1]
    mates = [greedy_request(10 + i, p, 5, pool) for i, p in enumerate(prompts(3, seed=12))]
    together = generate(engine, [mates[0], sampled(2, 1234), *mates[1:], sampled(3, 99)])
    assert together[2] == alone
    assert together[3] != alone


def test_unsampled_generation_reports_no_seed_and_sampled_reports_it(engine):
    pool = BlockPool(BLOCK)
    request = greedy_request(1, [5, 6, 7], 1, pool)
    request.parameters.CopyFrom(pb.NextTokenChooserParameters(do_sample=True, seed=42, has_seed=True))
    response = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=0, requests=[request], size=1)))
    assert response.generations[0].finished.seed == 42
    greedy = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=[greedy_request(2, [5, 6], 1, pool)], size=1)))
    assert not greedy.generations[0].finished.HasField("seed")


def test_errors_are_clear(engine):
    with pytest.raises(KeyError, match="batch 77 not found"):
        engine.decode(pb.DecodeRequest(batches=[pb.CachedBatch(id=77)]))
    request = pb.Request(id=1, input_ids=[1, 2, 3], blocks=[1],
                         stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=1))
    with pytest.raises(ValueError, match="1 blocks cannot hold 3 tokens|blocks cannot hold"):
        engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=0, requests=[pb.Request(
            id=1, input_ids=list(range(2, 12)), blocks=[1],
            stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=1))], size=1)))
    with pytest.raises(ValueError, match="cache_len"):
        request.cache_len = 3
        engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=0, requests=[request], size=1)))


def test_health_probe_with_explicit_slots(engine):
    """The router's liveness probe: block 0, slot 0, one token."""
    probe = pb.Request(id=2**64 - 1, input_ids=[5], blocks=[0], slots=[0],
                       stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=1))
    response = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=2**64 - 1, requests=[probe], size=1)))
    assert len(response.generations) == 1 and not response.HasField("batch")
