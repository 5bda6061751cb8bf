"""A step's host work: one host tensor for the step's token inputs, one packed copy of the
sampled values back (the CUDA path, run here on CPU tensors: the same tensor logic)."""

from __future__ import annotations

import torch

from pytgi_proto import generate_pb2 as pb
from shard.batch import Batch, host_lists, packed_host_lists
from shard.sampling import SampleOutput
from tests.shard.helpers import BlockPool, greedy_request


def test_packed_copy_equals_the_plain_lists_exactly():
    ids = torch.tensor([0, 151_935, 2**31 + 7, 42])  # up to a 152k vocabulary, and beyond int32
    logprobs = torch.tensor([-0.0, -1e-30, -3.1415927, -88.7], dtype=torch.float32)
    top_ids = torch.tensor([[5, 151_935], [1, 2], [3, 4], [9, 8]])
    top_lps = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    for out in (SampleOutput(ids, logprobs, None, None), SampleOutput(ids, logprobs, top_ids, top_lps)):
        packed, plain = packed_host_lists(out), host_lists(out)
        assert packed == plain
        assert all(type(v) is int for v in packed[0]) and (packed[2] is None or type(packed[2][0][0]) is int)


def test_prepare_builds_the_token_inputs_in_one_host_tensor():
    pool = BlockPool(4)
    requests = [greedy_request(1, [5, 6, 7], 4, pool), greedy_request(2, [8, 9], 4, pool, prefill_logprobs=True)]
    batch = Batch.from_pb(pb.Batch(id=1, requests=requests, size=2), 128, torch.device("cpu"))
    inputs = batch.prepare(4, torch.device("cpu"))
    assert inputs.input_ids.tolist() == [5, 6, 7, 8, 9]
    assert inputs.positions.tolist() == [0, 1, 2, 0, 1]
    assert inputs.logits_index.tolist() == [2, 3, 4]  # the first prompt's last token, every token of the second
    base = inputs.input_ids.untyped_storage().data_ptr()
    assert inputs.positions.untyped_storage().data_ptr() == base == inputs.logits_index.untyped_storage().data_ptr()
