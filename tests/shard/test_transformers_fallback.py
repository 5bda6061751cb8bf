"""The transformers fallback (GPT-2, GPT-NeoX) through the real Engine: greedy tokens equal
transformers' `generate` for single prompts, mixed-length batches and chunked prefill."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from shard.attention import SeqStep, build_metadata
from shard.distributed import TPGroup
from shard.kv_cache import KVCache
from shard.models import get_model
from shard.models.base import ModelContext
from shard.models.transformers_fallback import ATTN_IMPLEMENTATION, TransformersModel, paged_attention
from pytgi_proto import generate_pb2 as pb
from tests.conftest import make_engine, save_tiny

BLOCK = 4  # make_engine's block size
NEAR_TIE = 1e-3


@pytest.fixture(scope="module", params=["gpt2", "gpt_neox"])
def arch(request, tmp_path_factory):
    folder = save_tiny(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return SimpleNamespace(kind=request.param, folder=folder, engine=make_engine(folder), reference=reference)


def prompt(seed: int, length: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 127, (length,), generator=generator).tolist()


def reference_greedy(model, ids: list[int], max_new: int) -> tuple[list[int], list[torch.Tensor]]:
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0,
        attention_mask=torch.ones(1, len(ids), dtype=torch.long), output_scores=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(ids):].tolist()
    assert len(tokens) == max_new
    return tokens, [s[0] for s in out.scores]


def assert_greedy_equal(ours: list[int], ids: list[int], model, max_new: int) -> None:
    """Token-for-token equality; a divergence is accepted only at a near-tie of the reference."""
    expected, scores = reference_greedy(model, ids, max_new)
    assert len(ours) == len(expected)
    for step, (got, want) in enumerate(zip(ours, expected)):
        if got != want:
            top2 = scores[step].topk(2).values
            gap = float(top2[0] - top2[1])
            assert gap < NEAR_TIE, f"step {step}: got {got}, expected {want} (reference top-2 gap {gap:.3g})"
            return  # the sequences legitimately diverge after a near-tie


class Blocks:
    """Distinct block ids (>= 1) for each request."""

    def __init__(self):
        self.next = 1

    def take(self, tokens: int) -> list[int]:
        count = -(-tokens // BLOCK)
        blocks = list(range(self.next, self.next + count))
        self.next += count
        return blocks


def request(rid: int, ids: list[int], blocks: Blocks, max_new: int, chunk_len: int | None = None):
    r = pb.Request(
        id=rid, input_ids=ids, blocks=blocks.take(len(ids) + max_new),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=max_new, ignore_eos_token=True),
    )
    if chunk_len is not None:
        r.chunk_len = chunk_len
    return r


def serve(engine, requests: list[pb.Request], chunks: dict[int, int] | None = None):
    """Prefill then decode to completion. `chunks`: request id → chunk length sent as a
    RequestUpdate while that request is still prefilling. Returns (tokens per id, steps to first token)."""
    chunks = chunks or {}
    computed = {r.id: min(len(r.input_ids), r.chunk_len) if r.HasField("chunk_len") else len(r.input_ids)
                for r in requests}
    prompt_len = {r.id: len(r.input_ids) for r in requests}
    out: dict[int, list[int]] = {r.id: [] for r in requests}
    first_step: dict[int, int] = {}
    step = 1
    resp = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=0, requests=requests, size=len(requests))))
    while True:
        for g in resp.generations:
            out[g.request_id].append(g.tokens.ids[0])
            first_step.setdefault(g.request_id, step)
        if not resp.HasField("batch"):
            return out, first_step
        updates = []
        for rid, chunk in chunks.items():
            if computed[rid] < prompt_len[rid]:
                updates.append(pb.RequestUpdate(request_id=rid, chunk_len=chunk))
                computed[rid] = min(prompt_len[rid], computed[rid] + chunk)
        resp = engine.decode(pb.DecodeRequest(batches=[resp.batch], updates=updates))
        step += 1


def test_single_prompt(arch):
    ids, max_new = prompt(1, 11), 12
    out, _ = serve(arch.engine, [request(1, ids, Blocks(), max_new)])
    assert_greedy_equal(out[1], ids, arch.reference, max_new)


def test_mixed_length_batch(arch):
    blocks, max_new = Blocks(), 9
    prompts = {10: prompt(2, 3), 11: prompt(3, 17), 12: prompt(4, 1), 13: prompt(5, 8)}
    out, _ = serve(arch.engine, [request(rid, ids, blocks, max_new) for rid, ids in prompts.items()])
    for rid, ids in prompts.items():
        assert_greedy_equal(out[rid], ids, arch.reference, max_new)


def test_chunked_prefill_next_to_decoding_request(arch):
    # Request 20 prefills in chunks of 5 while request 21 (short prompt) is already decoding:
    # later steps mix prefill chunks and decode rows in one forward.
    blocks, max_new = Blocks(), 8
    long_ids, short_ids = prompt(6, 19), prompt(7, 4)
    requests = [request(20, long_ids, blocks, max_new, chunk_len=5), request(21, short_ids, blocks, max_new)]
    out, first_step = serve(arch.engine, requests, chunks={20: 5})
    assert first_step == {21: 1, 20: 4}  # 19 prompt tokens in chunks of 5: first token after step 4
    assert_greedy_equal(out[20], long_ids, arch.reference, max_new)
    assert_greedy_equal(out[21], short_ids, arch.reference, max_new)


def test_logits_match_reference_forward(arch):
    """Logit-level check (far more sensitive than greedy tokens on a tiny model): two steps over
    three sequences with a cached prefix, prefill rows and a decode row, against the reference's
    full-sequence forward."""
    model, blocks = arch.engine.model, Blocks()
    seqs = {40: prompt(9, 12), 41: prompt(10, 5), 42: prompt(11, 2)}
    split = {40: 7, 41: 3, 42: 1}  # tokens computed in step 1; the rest in step 2
    table = {rid: blocks.take(len(ids)) for rid, ids in seqs.items()}
    cache = KVCache(model.info.kv_spec, blocks.next, torch.device("cpu"))
    with torch.no_grad():
        expected = {rid: arch.reference(torch.tensor([ids])).logits[0] for rid, ids in seqs.items()}
    for step in (1, 2):
        ids, positions, steps, rows = [], [], [], []
        for rid, full in seqs.items():
            start, stop = (0, split[rid]) if step == 1 else (split[rid], len(full))
            ids += full[start:stop]
            positions += range(start, stop)
            steps.append(SeqStep(stop - start, stop, table[rid]))
            rows.append(expected[rid][start:stop])
        meta = build_metadata(steps, BLOCK, torch.device("cpu"))
        want = torch.cat(rows)
        got = model.forward(torch.tensor(ids), torch.tensor(positions), cache, meta, None)
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        index = torch.tensor([0, len(ids) - 1])
        picked = model.forward(torch.tensor(ids), torch.tensor(positions), cache, meta, index)
        torch.testing.assert_close(picked, want[index], rtol=1e-4, atol=1e-4)


def test_registry_picks_fallback(arch):
    model = arch.engine.model
    assert isinstance(model, TransformersModel)
    assert model.info.impl == "transformers"
    assert arch.engine.get_info().model_impl == "transformers"
    assert model.model.config._attn_implementation == ATTN_IMPLEMENTATION
    spec = model.info.kv_spec
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.block_size) == (2, 4, 16, BLOCK)
    assert model.info.max_position_embeddings == 512
    assert model.info.eos_token_ids == (127,)


def test_no_dense_mask_and_layer_order(arch, monkeypatch):
    seen = []

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        seen.append((module.layer_idx, attention_mask))
        return paged_attention(module, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, ATTN_IMPLEMENTATION, spy)
    ids = prompt(8, 6)
    out, _ = serve(arch.engine, [request(30, ids, Blocks(), 1)])
    assert len(out[30]) == 1
    assert seen == [(0, None), (1, None)]


def test_tensor_parallel_refused(arch):
    config = AutoConfig.from_pretrained(arch.folder)
    ctx = ModelContext(TPGroup(rank=0, world_size=2), torch.device("cpu"), torch.float32, BLOCK)
    with pytest.raises(ValueError, match=r"transformers fallback for .* does not support --num-shard > 1"):
        TransformersModel.load(arch.folder, config, ctx, (127,))
    with pytest.raises(ValueError, match="--num-shard > 1"):
        get_model(arch.folder, ctx)


def test_model_without_attention_interface_refused(tmp_path):
    # Bloom's transformers code computes attention itself (ALiBi), never through the interface:
    # serving it without our paged cache would be silently wrong, so loading must fail.
    import transformers

    from shard.models import UnsupportedModelError

    config = transformers.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4)
    transformers.BloomForCausalLM(config).save_pretrained(tmp_path)
    ctx = ModelContext(TPGroup(), torch.device("cpu"), torch.float32, BLOCK)
    with pytest.raises(UnsupportedModelError, match="AttentionInterface"):
        get_model(tmp_path, ctx)
