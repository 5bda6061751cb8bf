"""Batch bookkeeping without a model: from_pb, step inputs, filter, concatenate, to_pb."""

from __future__ import annotations

import pytest
import torch

from shard.batch import Batch
from pytgi_proto import generate_pb2 as pb

CPU = torch.device("cpu")


def request(request_id: int, prompt: list[int], blocks: list[int], **fields) -> pb.Request:
    return pb.Request(id=request_id, input_ids=prompt, blocks=blocks,
                      stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=4), **fields)


def make_batch() -> Batch:
    return Batch.from_pb(pb.Batch(id=7, requests=[
        request(1, [5, 6, 7, 8, 9], [1, 2]),
        request(2, [3, 4], [3]),
        request(3, list(range(10, 20)), [4, 5, 6], cache_len=4, chunk_len=3),
    ], size=3), vocab_size=32, device=CPU)


def test_from_pb_and_step_inputs():
    batch = make_batch()
    inputs = batch.prepare(block_size=4, device=CPU)
    # request 3 skips its 4 cached tokens and computes a 3-token chunk
    assert inputs.input_ids.tolist() == [5, 6, 7, 8, 9, 3, 4, 14, 15, 16]
    assert inputs.positions.tolist() == [0, 1, 2, 3, 4, 0, 1, 4, 5, 6]
    assert inputs.meta.slot_mapping.tolist() == [4, 5, 6, 7, 8, 12, 13, 20, 21, 22]
    assert inputs.sample_rows == [0, 1]  # request 3 is still prefilling: no token this step
    assert inputs.logits_index.tolist() == [4, 6]
    cached = batch.to_pb(block_size=4)
    assert list(cached.request_ids) == [1, 2, 3] and cached.max_tokens == 6 * 4


def test_advance_then_decode_inputs():
    batch = make_batch()
    inputs = batch.prepare(4, CPU)
    logits = torch.zeros(2, 32)
    logits[0, 11] = logits[1, 12] = 5.0
    out = batch.sampler(logits, rows=inputs.sample_rows)
    generations = batch.advance(inputs, out, eos_ids=frozenset())
    assert [(g.request_id, list(g.tokens.ids)) for g in generations] == [(1, [11]), (2, [12])]
    following = batch.prepare(4, CPU)
    # decode rows feed their sampled token; request 3 computes the rest of its prompt
    assert following.input_ids.tolist() == [11, 12, 17, 18, 19]
    assert following.positions.tolist() == [5, 2, 7, 8, 9]
    assert following.sample_rows == [0, 1, 2]
    assert batch.to_pb(4).current_tokens == 5


def test_filter_and_concatenate_keep_order_and_state():
    batch = make_batch()
    kept = batch.filter([3, 1])
    assert [r.id for r in kept.requests] == [3, 1]
    assert kept.sampler.size == 2
    other = Batch.from_pb(pb.Batch(id=9, requests=[request(4, [1, 2], [7])], size=1), 32, CPU)
    merged = Batch.concatenate([kept, other], batch_id=9)
    assert merged.id == 9 and [r.id for r in merged.requests] == [3, 1, 4]
    assert merged.sampler.size == 3
    with pytest.raises(ValueError, match="has no requests"):
        batch.filter([42])


def test_updates_append_blocks_and_set_chunks():
    batch = make_batch()
    batch.apply_updates([pb.RequestUpdate(request_id=3, new_blocks=[8], chunk_len=2),
                         pb.RequestUpdate(request_id=99, new_blocks=[9])])  # another batch's request
    third = batch.requests[2]
    assert third.blocks == [4, 5, 6, 8] and third.step_len == 2


def test_grammar_without_grammar_support_is_rejected_not_ignored():
    with pytest.raises(ValueError, match="grammar"):
        Batch.from_pb(pb.Batch(id=1, requests=[request(
            1, [1, 2], [1], parameters=pb.NextTokenChooserParameters(grammar="[a-z]+", grammar_type=2))]), 32, CPU)
    with pytest.raises(ValueError, match="grammar_type"):  # text without a type is not "no grammar"
        Batch.from_pb(pb.Batch(id=1, requests=[request(
            1, [1, 2], [1], parameters=pb.NextTokenChooserParameters(grammar="[a-z]+"))]), 32, CPU)
