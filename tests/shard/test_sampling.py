"""Unit tests for shard.sampling on small hand-made logits."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from shard.sampling import Sampler, SampleOutput, SamplingParams

CPU = torch.device("cpu")
NEG_INF = float("-inf")


def build(params, prompts=None, outputs=None, vocab=16) -> Sampler:
    n = len(params)
    prompts = prompts if prompts is not None else [[0]] * n
    outputs = outputs if outputs is not None else [[] for _ in range(n)]
    return Sampler.build(list(params), prompts, outputs, vocab, CPU)


def rand_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen) * 2.0


def sample_once_per_seed(params: SamplingParams, logits_row: torch.Tensor, seeds: int) -> torch.Tensor:
    """One draw from each of `seeds` independent rows (seed i in row i) over the same logits."""
    rows = [SamplingParams(**{**_as_dict(params), "seed": i}) for i in range(seeds)]
    sampler = build(rows, vocab=logits_row.shape[-1])
    return sampler(logits_row.expand(seeds, -1).clone()).next_ids


def _as_dict(p: SamplingParams) -> dict:
    return {name: getattr(p, name) for name in SamplingParams.__slots__}


# -- params -----------------------------------------------------------------------------


def test_is_greedy_table():
    assert SamplingParams().is_greedy
    assert not SamplingParams(do_sample=True).is_greedy
    assert not SamplingParams(top_k=5).is_greedy  # any warper forces sampling
    assert not SamplingParams(temperature=0.7).is_greedy
    assert not SamplingParams(top_p=0.9).is_greedy
    assert not SamplingParams(typical_p=0.9).is_greedy
    assert not SamplingParams(min_p=0.1).is_greedy
    assert SamplingParams(temperature=0.0, do_sample=True, top_k=3).is_greedy
    assert SamplingParams(repetition_penalty=1.3, logit_bias=((1, 2.0),)).is_greedy


# -- greedy -----------------------------------------------------------------------------


def test_greedy_argmax_and_raw_logprob():
    logits = rand_logits(3, 12, seed=0)
    out = build([SamplingParams()] * 3, vocab=12)(logits)
    assert isinstance(out, SampleOutput)
    assert torch.equal(out.next_ids, logits.argmax(-1))
    assert out.next_ids.dtype == torch.int64 and out.logprobs.dtype == torch.float32
    expected = torch.log_softmax(logits, -1).gather(1, out.next_ids[:, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs, expected)
    assert out.top_ids is None and out.top_logprobs is None


def test_temperature_zero_is_greedy_even_with_do_sample():
    logits = torch.tensor([[0.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    for seed in range(20):
        p = SamplingParams(temperature=0.0, do_sample=True, top_k=4, seed=seed)
        sampler = build([p], vocab=8)
        assert sampler.generators == (None,)
        assert sampler(logits).next_ids.item() == 1


def test_bf16_logits_are_accepted():
    logits = rand_logits(2, 8, seed=1).to(torch.bfloat16)
    out = build([SamplingParams(), SamplingParams(do_sample=True)], vocab=8)(logits)
    assert out.logprobs.dtype == torch.float32
    assert out.next_ids[0].item() == logits[0].float().argmax().item()


# -- warpers ----------------------------------------------------------------------------


def test_temperature_changes_sampled_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 4000
    for temp in (0.5, 2.0):
        ids = sample_once_per_seed(SamplingParams(temperature=temp), logits, n)
        freq = torch.bincount(ids, minlength=4).float() / n
        expected = torch.softmax(logits / temp, -1)
        assert (freq - expected).abs().max() < 0.03, (temp, freq, expected)
    # and the two temperatures give clearly different distributions
    cold = torch.bincount(sample_once_per_seed(SamplingParams(temperature=0.5), logits, n), minlength=4)
    hot = torch.bincount(sample_once_per_seed(SamplingParams(temperature=2.0), logits, n), minlength=4)
    assert cold[0] > hot[0] + 800


def test_top_k_only_top_ids_appear():
    logits = torch.tensor([0.1, 2.0, -1.0, 1.5, 0.3, 1.9, -0.5, 0.0, 0.2, 0.4])
    ids = sample_once_per_seed(SamplingParams(top_k=3), logits, 600)
    assert set(ids.tolist()) == {1, 3, 5}


def test_top_p_keeps_minimal_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()
    # 0.5 + 0.3 = 0.8 >= 0.75 and 0.5 alone is not enough: nucleus is {1, 3}
    sampler = build([SamplingParams(top_p=0.75, do_sample=True)], vocab=4)
    scores = sampler._process(logits[None])
    assert torch.isinf(scores[0, [0, 2]]).all()
    assert torch.isfinite(scores[0, [1, 3]]).all()
    ids = sample_once_per_seed(SamplingParams(top_p=0.75), logits, 400)
    assert set(ids.tolist()) == {1, 3}
    # a tiny top_p still keeps the most likely token
    one = build([SamplingParams(top_p=0.01)], vocab=4)._process(logits[None])
    assert torch.isfinite(one[0]).tolist() == [False, True, False, False]


def hf_rows(warper_for_row, logits: torch.Tensor) -> torch.Tensor:
    ids = torch.zeros(1, 1, dtype=torch.long)
    return torch.cat([warper_for_row(i)(ids, logits[i : i + 1].clone()) for i in range(logits.shape[0])])


def test_typical_p_matches_hf():
    logits = rand_logits(4, 16, seed=2)
    masses = [0.2, 0.5, 0.9, 0.99]
    sampler = build([SamplingParams(typical_p=m) for m in masses])
    expected = hf_rows(lambda i: TypicalLogitsWarper(masses[i]), logits)
    torch.testing.assert_close(sampler._process(logits), expected)


def test_min_p_matches_hf():
    logits = rand_logits(4, 16, seed=3)
    values = [0.01, 0.1, 0.3, 0.9]
    sampler = build([SamplingParams(min_p=v) for v in values])
    expected = hf_rows(lambda i: MinPLogitsWarper(values[i]), logits)
    torch.testing.assert_close(sampler._process(logits), expected)


def test_warper_chain_matches_hf_in_order():
    logits = rand_logits(3, 16, seed=4)
    rows = [
        SamplingParams(temperature=0.7, top_k=6, top_p=0.9, typical_p=0.95, min_p=0.05),
        SamplingParams(temperature=1.3, top_k=10, top_p=0.8),
        SamplingParams(),  # greedy mate: untouched
    ]

    def chain(p: SamplingParams):
        warpers = [TemperatureLogitsWarper(p.temperature)]
        if p.top_k:
            warpers.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1:
            warpers.append(TopPLogitsWarper(p.top_p))
        if p.typical_p < 1:
            warpers.append(TypicalLogitsWarper(p.typical_p))
        if p.min_p > 0:
            warpers.append(MinPLogitsWarper(p.min_p))

        def apply(ids, scores):
            for w in warpers:
                scores = w(ids, scores)
            return scores

        return apply

    expected = hf_rows(lambda i: chain(rows[i]), logits)
    torch.testing.assert_close(build(rows)._process(logits), expected)


# -- penalties, bias, watermark ---------------------------------------------------------


def test_repetition_penalty_matches_hf():
    logits = rand_logits(2, 16, seed=5)
    prompts, outputs = [[1, 2, 3], [4, 5]], [[3, 7], [9]]
    sampler = build([SamplingParams(repetition_penalty=1.5), SamplingParams(repetition_penalty=0.8)],
                    prompts, outputs)
    history = [prompts[i] + outputs[i] for i in range(2)]
    pens = [1.5, 0.8]
    expected = torch.cat([
        RepetitionPenaltyLogitsProcessor(pens[i])(torch.tensor([history[i]]), logits[i : i + 1].clone())
        for i in range(2)
    ])
    torch.testing.assert_close(sampler._process(logits), expected)


def test_repetition_penalty_tracks_updates_and_call_does_not_mutate():
    logits = torch.tensor([[2.0, -1.0, 1.5, 0.5]])
    sampler = build([SamplingParams(repetition_penalty=2.0)], [[3]], [[]], vocab=4)
    before = sampler.seen.clone()
    sampler(logits)
    sampler(logits)
    assert torch.equal(sampler.seen, before)
    sampler.update(None, torch.tensor([0]))
    torch.testing.assert_close(sampler._process(logits), torch.tensor([[1.0, -1.0, 1.5, 0.25]]))
    # the greedy choice flips from token 0 to token 2
    assert sampler(logits).next_ids.item() == 2


def test_frequency_and_presence_penalties_exact():
    logits = torch.zeros(2, 6)
    # prompt tokens never count for the OpenAI penalties
    sampler = build(
        [SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), SamplingParams()],
        [[5, 5], [1]], [[1, 1, 2], [1, 1]], vocab=6,
    )
    scores = sampler._process(logits)
    torch.testing.assert_close(scores[0], torch.tensor([0.0, -1.25, -0.75, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(scores[1], torch.zeros(6))  # mate without penalties untouched
    sampler.update([0], torch.tensor([3]))
    scores = sampler._process(logits, rows=[0])
    torch.testing.assert_close(scores[0], torch.tensor([0.0, -1.25, -0.75, -0.75, 0.0, 0.0]))
    # a greedy row's argmax moves off penalised tokens
    flip = torch.tensor([[0.0, 1.0, 0.9, 0.0, 0.0, 0.0]])
    assert sampler(flip, rows=[0]).next_ids.item() == 2  # 1 - 1.25 < 0.9 - 0.75


def test_negative_presence_penalty_encourages():
    sampler = build([SamplingParams(presence_penalty=-1.0)], [[0]], [[3]], vocab=4)
    assert sampler(torch.tensor([[0.5, 0.0, 0.0, 0.0]])).next_ids.item() == 3


def test_logit_bias_flips_argmax_and_keeps_raw_logprob():
    logits = torch.tensor([[3.0, 1.0, 0.0, 0.0]])
    sampler = build([SamplingParams(logit_bias=((2, 5.0), (0, -1.0))), SamplingParams()], vocab=4)
    out = sampler(logits.expand(2, -1).clone())
    assert out.next_ids.tolist() == [2, 0]
    torch.testing.assert_close(out.logprobs[0], torch.log_softmax(logits[0], -1)[2])


def test_no_penalty_tensors_unless_used():
    sampler = build([SamplingParams(), SamplingParams(do_sample=True, logit_bias=((1, 1.0),))])
    assert sampler.seen is None and sampler.counts is None and sampler.prev is None
    sampler.update(None, torch.tensor([1, 2]))  # a no-op, must not fail


def greenlist(prev: int, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(15485863 * prev)
    return torch.randperm(vocab, generator=gen)[: vocab // 2]


def test_watermark_biases_green_list_deterministically():
    vocab = 16
    logits = torch.zeros(1, vocab)
    sampler = build([SamplingParams(watermark=True)], [[3, 7]], [[]], vocab=vocab)
    scores = sampler._process(logits)
    green = torch.zeros(vocab, dtype=torch.bool)
    green[greenlist(7, vocab)] = True
    torch.testing.assert_close(scores[0], green.float() * 2.0)
    assert green[sampler(logits).next_ids.item()]
    torch.testing.assert_close(sampler._process(logits), scores)  # same previous token, same list
    # the previous token follows update()
    sampler.update(None, torch.tensor([11]))
    green11 = torch.zeros(vocab, dtype=torch.bool)
    green11[greenlist(11, vocab)] = True
    torch.testing.assert_close(sampler._process(logits)[0], green11.float() * 2.0)


def test_watermark_does_not_disturb_sampling_generator():
    logits = rand_logits(8, 16, seed=6)
    plain = build([SamplingParams(do_sample=True, seed=9)])
    marked = build([SamplingParams(do_sample=True, seed=9, watermark=True)])
    for step in range(8):
        plain(logits[step : step + 1])
        marked(logits[step : step + 1])
    assert torch.equal(plain.generators[0].get_state(), marked.generators[0].get_state())


# -- seeds, filter, concatenate ---------------------------------------------------------


def step_logits(key: int, step: int, vocab: int = 16) -> torch.Tensor:
    """Logits that depend only on (request key, step): fed identically whatever the batch."""
    return rand_logits(1, vocab, seed=1000 * key + step)[0] * 0.5


def run(sampler: Sampler, keys: list[int], steps: range) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {k: [] for k in keys}
    for step in steps:
        logits = torch.stack([step_logits(k, step) for k in keys])
        out = sampler(logits)
        sampler.update(None, out.next_ids)
        for k, t in zip(keys, out.next_ids.tolist()):
            tokens[k].append(t)
    return tokens


SEEDED = SamplingParams(do_sample=True, seed=1234, temperature=1.5, top_k=12)


def test_same_seed_same_tokens_regardless_of_batch():
    alone = run(build([SEEDED]), [0], range(10))[0]
    mates = [
        SamplingParams(),
        SamplingParams(do_sample=True, seed=7, top_p=0.5),
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, watermark=True),
        SamplingParams(do_sample=True, seed=1234, typical_p=0.7, min_p=0.1, top_n_tokens=3),
    ]
    crowded = run(build(mates[:2] + [SEEDED] + mates[2:]), [1, 2, 0, 3, 4], range(10))[0]
    first = run(build([SEEDED] + mates[::-1]), [0, 4, 3, 2, 1], range(10))[0]
    assert alone == crowded == first


def test_different_seeds_differ():
    a = run(build([SamplingParams(do_sample=True, seed=1)]), [0], range(10))[0]
    b = run(build([SamplingParams(do_sample=True, seed=2)]), [0], range(10))[0]
    assert a != b


def test_filter_and_concatenate_preserve_generator_state():
    params = [SEEDED, SamplingParams(), SamplingParams(do_sample=True, seed=99, repetition_penalty=1.2)]
    reference = run(build(params, [[0]] * 3), [0, 1, 2], range(6))

    sampler = build(params, [[0]] * 3)
    early = run(sampler, [0, 1, 2], range(3))
    kept = sampler.filter([2, 0])  # drop the greedy row, reorder
    other = build([SamplingParams(do_sample=True, seed=5, frequency_penalty=0.3)], [[0]], vocab=16)
    joined = Sampler.concatenate([other, kept])
    assert joined.size == 3 and joined.generators[1] is sampler.generators[2]
    # history survives too: the penalised row's seen-mask covers its earlier tokens, and
    # zeros stand in for the counts that `kept` never allocated
    assert joined.seen[1, early[2]].all() and not joined.seen[0].any()
    assert joined.counts is not None and joined.counts[1:].sum() == 0
    late = run(joined, [7, 2, 0], range(3, 6))
    for key in (0, 2):
        assert early[key] + late[key] == reference[key]


def test_filter_drops_unused_history():
    sampler = build([SamplingParams(repetition_penalty=1.2), SamplingParams()], [[1], [2]])
    assert sampler.seen is not None
    assert sampler.filter([1]).seen is None
    assert sampler.filter([]).size == 0


# -- outputs ----------------------------------------------------------------------------


def test_top_n_tokens_sorted_raw_logprobs():
    logits = rand_logits(3, 10, seed=7)
    sampler = build(
        [SamplingParams(top_n_tokens=2), SamplingParams(), SamplingParams(top_n_tokens=4, temperature=0.5)],
        vocab=10,
    )
    out = sampler(logits)
    assert out.top_ids.shape == (3, 4) and out.top_logprobs.shape == (3, 4)
    raw = torch.log_softmax(logits, -1)
    ref = raw.topk(4, dim=-1)
    assert torch.equal(out.top_ids, ref.indices)
    torch.testing.assert_close(out.top_logprobs, ref.values)
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()
    assert out.top_ids.dtype == torch.int64 and out.top_logprobs.dtype == torch.float32


def test_rows_subset():
    params = [SamplingParams(top_n_tokens=3), SamplingParams(logit_bias=((0, 100.0),)), SEEDED]
    sampler = build(params)
    logits = rand_logits(2, 16, seed=8)
    out = sampler(logits, rows=[2, 0])  # row 1 is mid-prefill: no logits
    assert out.next_ids.shape == (2,)
    assert out.next_ids[1].item() == logits[1].argmax().item()
    assert out.top_ids.shape == (2, 3)
    # the sampled row equals the same request sampled alone
    alone = build([SEEDED])(logits[0:1])
    assert out.next_ids[0].item() == alone.next_ids.item()
    # rows without top_n in a subset: none asked
    assert build(params)(logits[0:1], rows=[1]).top_ids is None
    assert build(params)(logits[0:1], rows=[1]).next_ids.item() == 0


def test_rows_subset_update():
    sampler = build([SamplingParams(frequency_penalty=1.0)] * 3, vocab=4)
    sampler.update([2, 0], torch.tensor([1, 3]))
    assert sampler.counts.tolist() == [[0, 0, 0, 1], [0, 0, 0, 0], [0, 1, 0, 0]]


def test_all_greedy_fast_path_large(monkeypatch):
    def no_loop(*_args, **_kwargs):
        raise AssertionError("per-row work in the all-greedy path")

    monkeypatch.setattr(Sampler, "_positions", no_loop)
    monkeypatch.setattr(Sampler, "_process", no_loop)
    logits = rand_logits(32, 49152, seed=9)
    sampler = Sampler.build([SamplingParams()] * 32, [[1]] * 32, [[]] * 32, 49152, CPU)
    out = sampler(logits)
    assert out.top_ids is None and out.top_logprobs is None
    assert torch.equal(out.next_ids, logits.argmax(-1))
    torch.testing.assert_close(
        out.logprobs, torch.log_softmax(logits, -1).gather(1, out.next_ids[:, None]).squeeze(1)
    )
    sampler.update(None, out.next_ids)


@pytest.mark.parametrize("vocab_logits", [12, 20])
def test_penalties_with_padded_or_narrow_logits(vocab_logits):
    sampler = build([SamplingParams(repetition_penalty=2.0)], [[3]], [[]], vocab=16)
    logits = torch.ones(1, vocab_logits)
    scores = sampler._process(logits)
    assert scores[0, 3].item() == 0.5
    assert (scores[0, :3] == 1).all() and (scores[0, 4:] == 1).all()


# -- chunking (CUDA bounds the sampler's memory by processing SAMPLER_CHUNK lines at a time) --


def _allow(vocab: int, allowed_per_line: list[list[int]]):
    """A GrammarMask bits tensor: bit t%32 of word t//32 set where token t is allowed."""
    words = []
    for allowed in allowed_per_line:
        row = [0] * ((vocab + 31) // 32)
        for t in allowed:
            row[t // 32] |= 1 << (t % 32)
        words.append([w - 2**32 if w >= 2**31 else w for w in row])  # int32 two's complement
    return torch.tensor(words, dtype=torch.int32)


MIXED = [
    SamplingParams(),
    SamplingParams(do_sample=True, seed=11, temperature=0.7, top_k=9, top_p=0.8, typical_p=0.9, min_p=0.02,
                   repetition_penalty=1.3, frequency_penalty=0.2, presence_penalty=0.3, top_n_tokens=2),
    SamplingParams(logit_bias=((3, 5.0), (7, -2.0)), repetition_penalty=1.2, top_n_tokens=4),
    SamplingParams(do_sample=True, seed=12, watermark=True),
    SamplingParams(do_sample=True, seed=13, top_p=0.6, logit_bias=((1, 1.5),)),
    SamplingParams(temperature=0.0, do_sample=True, frequency_penalty=0.5),
    SamplingParams(do_sample=True, seed=14, top_k=3, top_n_tokens=1),
]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
@pytest.mark.parametrize("rows", [None, [6, 0, 3, 2, 5]])
def test_chunked_sampling_equals_one_pass(chunk, rows):
    vocab = 40
    prompts = [[i, i + 1, 2] for i in range(len(MIXED))]
    outputs = [[5, 5, i] for i in range(len(MIXED))]
    lines = len(MIXED) if rows is None else len(rows)
    mask_lines = [1, 2, 4] if lines > 4 else [1]
    bits = _allow(vocab, [[0, 3, 7, 33, 39], [3, 5], [1, 2, 3, 4, 38]][:len(mask_lines)])
    from shard.grammar import GrammarMask

    one, chunked = (Sampler.build(MIXED, prompts, outputs, vocab, CPU) for _ in range(2))
    for step in range(4):  # generators and history advance alike over several steps
        logits = rand_logits(lines, vocab, seed=20 + step)
        mask = GrammarMask(mask_lines, bits)
        expected = one.sample(logits, rows, mask, None)
        got = chunked.sample(logits, rows, mask, chunk)
        assert torch.equal(got.next_ids, expected.next_ids)
        assert torch.equal(got.logprobs, expected.logprobs)
        assert torch.equal(got.top_ids, expected.top_ids)
        assert torch.equal(got.top_logprobs, expected.top_logprobs)
        for line in mask_lines:  # the constraint followed its line into its chunk
            allowed = bits[mask_lines.index(line)]
            token = int(got.next_ids[line])
            assert (int(allowed[token // 32]) >> (token % 32)) & 1
        one.update(rows, expected.next_ids)
        chunked.update(rows, got.next_ids)


def test_chunks_without_top_n_rows_still_concatenate():
    params = [SamplingParams(top_n_tokens=3)] + [SamplingParams()] * 4
    sampler = build(params, vocab=16)
    logits = rand_logits(5, 16, seed=30)
    out = sampler.sample(logits, None, None, 2)  # the 2nd and 3rd chunks have no top_n row
    assert out.top_ids.shape == (5, 3)
    assert torch.equal(out.top_ids, logits.topk(3, dim=-1).indices)


def test_cpu_samples_in_one_pass(monkeypatch):
    calls = []
    original = Sampler._sample

    def counting(self, *args):
        calls.append(args[0].shape[0])
        return original(self, *args)

    monkeypatch.setattr(Sampler, "_sample", counting)
    build([SamplingParams(do_sample=True, seed=1)] * 300, vocab=8)(rand_logits(300, 8, seed=31))
    assert calls == [300]


def test_chunk_and_warmup_rows_by_device():
    from shard.sampling import SAMPLER_CHUNK, chunk_lines, warmup_rows

    cuda = torch.device("cuda", 0)
    assert chunk_lines(CPU) is None and chunk_lines(cuda) == SAMPLER_CHUNK
    assert warmup_rows(CPU, None) == 0 and warmup_rows(CPU, 8) == 0  # no measured peak on CPU
    assert warmup_rows(cuda, None) == SAMPLER_CHUNK
    assert warmup_rows(cuda, 8) == 8
    assert warmup_rows(cuda, 10 * SAMPLER_CHUNK) == SAMPLER_CHUNK


@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16])
def test_warm_up_runs_every_stage(monkeypatch, logits_dtype):
    import shard.grammar
    import shard.sampling as sampling

    ran = set()

    def spy(name, owner, attr):
        original = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            ran.add(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, attr, wrapper)

    for name in ("_top_k", "_top_p", "_typical", "_min_p", "_greenlist_mask"):
        spy(name, sampling, name)
    for name in ("_apply_bias", "_apply_penalties", "_choose", "update"):
        spy(name, Sampler, name)
    spy("grammar", shard.grammar.GrammarMask, "apply_")
    sampling.warm_up(1000, 4, CPU, logits_dtype)
    assert ran == {"_top_k", "_top_p", "_typical", "_min_p", "_greenlist_mask", "_apply_bias",
                   "_apply_penalties", "_choose", "update", "grammar"}
