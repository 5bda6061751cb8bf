"""Speculative decoding (`--speculate`, shard/speculation.py): the n-gram drafter and its adaptive
length, which rows draft and how far, a step's bookkeeping with drafts, the option, and the
engine's output token for token the same with and without speculation (a tiny random llama on
SDPA, the bundled SmolLM2 on the paged kernel, marked slow)."""

from __future__ import annotations

import dataclasses
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from click.testing import CliRunner
from transformers import AutoTokenizer

from pytgi_proto import generate_pb2 as pb
from shard import speculation
from shard.batch import Batch
from shard.config import build_config
from shard.cuda_graphs import plan_decode
from shard.distributed import TPGroup
from shard.engine import Engine
from shard.model_source import resolve_model
from shard.models import get_model
from shard.models.base import ModelContext
from shard.sampling import SamplingParams
from shard.speculation import (
    MEASURED_SIZES, TOKEN_COST, Drafter, StepCost, accepted_run, can_draft, draft_tokens,
)
from tests.conftest import default_cache_dir, make_config, make_engine
from tests.shard.helpers import BlockPool, chat, generations, greedy_request, token_ids

CPU = torch.device("cpu")
VOCAB = 32
LINEAR = StepCost.linear(TOKEN_COST["cpu"])  # a step's cost without a measurement
# A step's time at each of MEASURED_SIZES, shaped as measured on a 2-vCPU AMD EPYC (AVX-512, fp32):
# 2-3 tokens dearer than 4-5 (MKL runs them as repeated matrix-vector products).
SECONDS = [1.0, 1.84, 2.35, 1.45, 1.5, 1.55, 1.7, 1.9, 2.07, 2.3, 2.6]
BARE = StepCost.measured(SECONDS, floor=StepCost.linear(0.0))  # the table alone


# --- the drafter -----------------------------------------------------------------------------

def test_accepted_run_is_the_agreeing_prefix_and_the_next_choice():
    assert accepted_run([], [7]) == [7]
    assert accepted_run([1, 2, 3], [1, 2, 3, 4]) == [1, 2, 3, 4]
    assert accepted_run([1, 2, 3], [1, 5, 3, 4]) == [1, 5]
    assert accepted_run([1, 2, 3], [9, 2, 3, 4]) == [9]


def test_drafter_prefers_the_longest_key_then_the_most_recent(monkeypatch):
    # [1 2 3] occurred once, followed by 9 9 5 2; [2 3] most recently, followed by 7 7 8 1.
    prompt = [1, 2, 3, 9, 9, 5, 2, 3, 7, 7, 8, 1, 2, 3]
    assert Drafter(prompt, 4).propose([], 4) == [9, 9, 5, 2]
    monkeypatch.setattr(speculation, "MAX_KEY", 2)
    assert Drafter(prompt, 4).propose([], 4) == [7, 7, 8, 1]


def test_drafter_needs_a_two_token_key_and_continues_a_repeating_stretch(monkeypatch):
    assert Drafter([1, 2, 3], 4).propose([], 4) == []  # the last token never occurred before
    assert Drafter([4, 6, 5, 4], 4).propose([], 4) == []  # only the last token matches
    monkeypatch.setattr(speculation, "MIN_KEY", 1)
    assert Drafter([4, 6, 5, 4], 4).propose([], 4) == [6, 5, 4, 6]  # past the end: the draft repeats itself
    assert Drafter([4, 5, 4, 5, 4, 5], 4).propose([], 4) == [4, 5, 4, 5]


def test_drafter_indexes_the_output_as_it_grows_and_respects_the_room():
    drafter = Drafter([1, 2, 3, 4], 4)
    assert drafter.propose([], 4) == []
    assert drafter.propose([1, 2], 4) == [3, 4, 1, 2]
    assert drafter.propose([1, 2], 2) == [3, 4]
    assert drafter.propose([1, 2], 0) == []
    assert drafter.propose([1, 2, 3], 4) == [4, 1, 2, 3]


def test_prompt_index_is_bounded(monkeypatch):
    monkeypatch.setattr(speculation, "INDEX_WINDOW", 4)
    drafter = Drafter([7, 8, 1, 1, 1, 1, 7], 4)
    assert drafter.ids == [1, 1, 1, 7] and drafter.propose([8], 4) == []  # [7 8] fell out of the window


def test_acceptance_estimate_and_failing_drafts_pause():
    drafter = Drafter([1, 2, 3, 1, 2], 4)
    assert drafter.rate == 1.0  # optimistic: a new request drafts in full once
    for _ in range(speculation.MISS_LIMIT):
        assert drafter.pause == 0
        drafter.record(4, 0)
    assert drafter.rate == pytest.approx(1 / (1 + 1 + 0.9 + 0.81))  # ~0.27
    assert drafter.pause == speculation.MIN_PAUSE
    for _ in range(speculation.MIN_PAUSE):
        assert drafter.propose([], 4) == []
    assert drafter.propose([], 4) == [3, 1, 2, 3]  # whatever the estimate: the step decides
    for _ in range(speculation.MISS_LIMIT):
        drafter.record(1, 0)
    assert drafter.pause == 2 * speculation.MIN_PAUSE  # failing again: a longer pause
    drafter.record(1, 1)
    assert drafter.next_pause == speculation.MIN_PAUSE
    assert drafter.accepted == 1 and drafter.acceptance == 1 / (4 * 3 + 3 + 1)
    # A request that has been copying keeps most of its estimate through a miss.
    copying = Drafter([1, 2, 3, 1, 2], 4)
    for _ in range(10):
        copying.record(4, 4)
    copying.record(4, 0)
    assert copying.rate > 0.9
    copying.record(4, 2)  # two accepted, then one rejected
    assert copying.hits == pytest.approx(0.9 * 0.9 * sum(4 * 0.9**i for i in range(10)) + 2)


def test_which_rows_may_draft():
    greedy = SamplingParams()
    assert can_draft(greedy, None, False)
    assert can_draft(SamplingParams(logit_bias=((3, 1.0),), top_n_tokens=2), None, False)  # per-line stages
    assert not can_draft(SamplingParams(do_sample=True), None, False)
    assert not can_draft(SamplingParams(temperature=0.7), None, False)
    assert not can_draft(SamplingParams(repetition_penalty=1.2), None, False)
    assert not can_draft(SamplingParams(frequency_penalty=0.5), None, False)
    assert not can_draft(SamplingParams(presence_penalty=0.5), None, False)
    assert not can_draft(SamplingParams(watermark=True), None, False)  # its green list follows the previous token
    assert not can_draft(greedy, object(), False)  # a grammar's mask follows the tokens before
    assert not can_draft(greedy, None, True)  # the health probe


# --- a step with drafts, without a model ----------------------------------------------------

BLOCK = 4
PROMPT = [1, 2, 3, 4, 5, 6, 1, 2]


def request(request_id: int, prompt: list[int], max_new: int, blocks: list[int], **fields) -> pb.Request:
    ignore_eos = fields.pop("ignore_eos", True)
    stopping = pb.StoppingCriteriaParameters(max_new_tokens=max_new, ignore_eos_token=ignore_eos)
    return pb.Request(id=request_id, input_ids=prompt, blocks=blocks, stopping_parameters=stopping, **fields)


def step(batch: Batch, choices: list[int], eos: frozenset[int] = frozenset()):
    """One engine step with a fake model whose choice at each sampled line is `choices`."""
    draft_tokens(batch.requests, BLOCK, LINEAR)
    inputs = batch.prepare(BLOCK, CPU)
    logits = torch.zeros(len(inputs.logits_index), VOCAB)
    for line, token in zip(inputs.sample_logits, choices, strict=True):
        logits[line, token] = 30.0  # far above the rest: a sampled row chooses it too
    out = batch.sampler(logits[inputs.sample_logits], rows=inputs.sample_rows)
    return inputs, batch.advance(inputs, out, eos)


def decoding(max_new: int = 8, blocks: int = 4, speculate: int = 4, **fields) -> Batch:
    """A one-request batch after its prefill chose 3: the sequence ends 1 2 3, as its prompt began."""
    one = request(1, PROMPT, max_new, list(range(1, 1 + blocks)), **fields)
    batch = Batch.from_pb(pb.Batch(id=1, requests=[one]), VOCAB, CPU, speculate=speculate)
    step(batch, [3])
    return batch


def test_a_drafting_row_verifies_its_draft_and_keeps_the_accepted_run():
    batch = decoding(top_n_tokens=2)
    r = batch.requests[0]
    inputs, (generation,) = step(batch, [4, 5, 9, 7, 7])
    # The draft continued "1 2 3" as the prompt did: 4 5 6 1, after the last token 3, at positions 8..12.
    assert inputs.input_ids.tolist() == [3, 4, 5, 6, 1] and inputs.positions.tolist() == list(range(8, 13))
    assert inputs.meta.slot_mapping.tolist() == [12, 13, 14, 15, 16]
    assert inputs.sample_rows == [0] * 5 and inputs.sample_logits == [0, 1, 2, 3, 4]
    assert list(generation.tokens.ids) == [4, 5, 9] and not generation.HasField("finished")
    assert len(generation.tokens.logprobs) == 3 and len(generation.top_tokens) == 3
    assert [t.ids[0] for t in generation.top_tokens] == [4, 5, 9]
    assert r.output_ids == [3, 4, 5, 9] and r.num_computed == r.seq_len - 1 == 11 and r.draft == []
    assert (r.drafter.proposed, r.drafter.accepted, r.drafter.rate) == (4, 2, (2 + 1) / (3 + 1))
    assert batch.to_pb(BLOCK).current_tokens == 1


def test_a_stop_inside_the_accepted_run_cuts_it():
    batch = decoding(ignore_eos=False)
    _, (generation,) = step(batch, [4, 5, 6, 1, 2], eos=frozenset({5}))
    assert list(generation.tokens.ids) == [4, 5]
    assert generation.finished.finish_reason == pb.FINISH_REASON_EOS_TOKEN
    assert generation.finished.generated_tokens == 3
    batch = decoding()
    batch.requests[0].stop_token_ids = frozenset({6})
    _, (generation,) = step(batch, [4, 5, 6, 1, 2])
    assert list(generation.tokens.ids) == [4, 5, 6]
    assert generation.finished.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE


def test_drafts_stop_at_max_new_tokens_the_blocks_and_the_step_budget(monkeypatch):
    batch = decoding(max_new=3)
    inputs, (generation,) = step(batch, [4, 5])  # room for 3 - 1 - 1 = 1 draft
    assert inputs.input_ids.tolist() == [3, 4]
    assert list(generation.tokens.ids) == [4, 5]
    assert generation.finished.finish_reason == pb.FINISH_REASON_LENGTH
    assert generation.finished.generated_tokens == 3
    batch = decoding(blocks=3)  # 12 slots hold the 9 tokens and 3 more
    inputs, _ = step(batch, [4, 5, 6, 1])
    assert inputs.input_ids.tolist() == [3, 4, 5, 6]
    monkeypatch.setattr(speculation, "STEP_TOKENS", 3)
    batch = decoding()
    inputs, _ = step(batch, [4, 5, 6])
    assert inputs.input_ids.tolist() == [3, 4, 5]


def test_rows_that_may_not_draft_and_prefilling_rows_draft_nothing():
    sampled = pb.NextTokenChooserParameters(do_sample=True, seed=3, has_seed=True)
    batch = Batch.from_pb(pb.Batch(id=1, requests=[
        request(1, PROMPT, 8, [1, 2, 3, 4]),
        request(2, PROMPT, 8, [5, 6, 7, 8], parameters=sampled),
        request(3, PROMPT, 8, [9, 10, 11, 12], chunk_len=4),
    ]), VOCAB, CPU, speculate=4)
    assert batch.requests[1].drafter is None and batch.requests[2].drafter is not None
    step(batch, [3, 3])  # request 3 computes its first chunk
    inputs, generations = step(batch, [4, 5, 6, 1, 2, 7, 3])  # request 3 finishes its prompt: no draft yet
    assert inputs.sample_rows == [0, 0, 0, 0, 0, 1, 2]
    assert [list(g.tokens.ids) for g in generations] == [[4, 5, 6, 1, 2], [7], [3]]
    inputs, _ = step(batch, [3, 4, 9, 9, 9, 9, 9, 9])
    assert inputs.sample_rows == [0, 0, 1, 2, 2, 2, 2, 2]  # request 1's draft: [3]


def test_a_step_with_drafts_replays_no_cuda_graph():
    batch = decoding()
    assert plan_decode(batch, (1, 2, 4), BLOCK, width=8) is not None
    draft_tokens(batch.requests, BLOCK, LINEAR)
    assert batch.requests[0].draft and plan_decode(batch, (1, 2, 4), BLOCK, width=8) is None


def test_drafts_must_pay_for_their_compute_in_a_step_that_size():
    # A lone stream verifies long drafts where they hold and short ones where they are shaky (a
    # later token counts only if every one before it did); a large batch only drafts that nearly
    # always hold.
    assert LINEAR.best_draft(4, 0.9, 1, 1) == 4 and LINEAR.best_draft(4, 0.6, 1, 1) == 3
    assert LINEAR.best_draft(4, 0.3, 1, 1) == 1
    assert LINEAR.best_draft(4, 0.3, 8, 8) == 0 and LINEAR.best_draft(1, 0.7, 31, 31) == 0
    assert LINEAR.best_draft(1, 0.9, 31, 31) == 1
    assert LINEAR.best_draft(0, 1.0, 1, 1) == 0  # nothing to verify
    # The count is the one with the most tokens per unit of time, drafting nothing included.
    for cost in (LINEAR, BARE, StepCost.measured(SECONDS, floor=LINEAR)):
        for tokens in (1, 4, 16, 28):
            for rate in (0.05, 0.2, 0.5, 0.8, 0.95):
                best = cost.best_draft(4, rate, tokens, tokens)
                per_cost = [(tokens + sum(rate**i for i in range(1, d + 1))) / cost(tokens + d) for d in range(5)]
                assert per_cost[best] == max(per_cost) and all(p < per_cost[best] for p in per_cost[:best])


def test_a_measured_cost_that_is_not_linear_skips_the_dear_step_sizes():
    """MKL's fp32 matmul over 2-3 rows costs more than over 4-5 (measured on an AMD EPYC): a lone
    stream then drafts nothing or enough tokens to reach the cheaper sizes, never one or two."""
    cost = BARE
    assert cost(1) == 1.0 and cost(2) == 1.84 and cost(4) == 1.45 and cost(32) == 2.6
    assert cost(7) == pytest.approx((1.55 + 1.7) / 2) and cost(20) == pytest.approx((2.07 + 2.3) / 2)
    assert cost.best_draft(1, 0.8, 1, 1) == 0  # 1.8 tokens for 1.84 steps: no
    assert cost.best_draft(4, 0.5, 1, 1) == 3  # 1.875 tokens for 1.45 steps, not 1.5 for 1.84
    assert cost.best_draft(4, 0.2, 1, 1) == 0  # open-ended chat: 1.25 tokens for 1.45 steps
    # A one-token draft after a miss: a linear cost would verify it at 1.12 steps.
    assert LINEAR.best_draft(1, 0.5, 1, 1) == 1 and cost.best_draft(1, 0.5, 1, 1) == 0
    # The linear model stays a floor: the table (one sequence, a short context) catches the dear
    # small steps; a real batch's large step reads many contexts the measurement does not.
    floored = StepCost.measured(SECONDS, floor=LINEAR)
    assert floored(2) == 1.84 and floored(6) == LINEAR(6) and floored(32) == LINEAR(32)
    # Timer noise never makes a larger step look cheaper than a one-token one.
    assert StepCost.measured([1.0, 0.9, *[1.2] * (len(MEASURED_SIZES) - 2)], floor=StepCost.linear(0.0))(2) == 1.0


def test_the_estimate_gates_the_drafts():
    batch = decoding()
    (r,) = batch.requests
    r.drafter.hits, r.drafter.trials = 0.0, 9.0  # rate 0.1: below a one-token draft's break-even (0.12)
    draft_tokens(batch.requests, BLOCK, LINEAR)
    assert r.draft == []
    r.drafter.trials = 4.0  # 0.2
    draft_tokens(batch.requests, BLOCK, LINEAR)
    assert r.draft == [4]
    r.drafter.hits, r.drafter.trials = 8.0, 9.0  # 0.9
    draft_tokens(batch.requests, BLOCK, LINEAR)
    assert r.draft == [4, 5, 6, 1]


def test_a_request_kept_from_drafting_recovers_and_tries_again():
    """A low estimate learns nothing while it keeps the request's drafts out: its evidence fades
    (once its pause has run out) until the request drafts again."""
    batch = decoding()
    (r,) = batch.requests
    r.drafter.hits, r.drafter.trials, r.drafter.pause = 0.0, 9.0, 5  # rate 0.1, after ~10 misses
    steps = 0
    while True:
        r.draft = []
        draft_tokens(batch.requests, BLOCK, LINEAR)
        if r.draft:
            break
        steps += 1
        assert r.drafter.trials == 9.0 or r.drafter.pause == 0  # a pause counts down first
    assert 5 + 10 <= steps <= 5 + 40  # a one-token draft's break-even, 0.12: ~21 steps held
    # In a 28-token step a draft must hold ~80 % of the time: ~350 steps from there.
    r.drafter.hits, r.drafter.trials, held = 0.0, 9.0, 0
    while not LINEAR.best_draft(4, r.drafter.rate, 28, 28):
        r.drafter.hold()
        held += 1
    assert 250 <= held <= 450


# --- the option ------------------------------------------------------------------------------

def test_speculate_option_env_and_bounds():
    common = dict(revision=None, uds_path="/tmp/pytgi-test", sharded=False, dtype=None, trust_remote_code=False,
                  json_output=False, log_level="INFO", device="cpu")
    assert build_config(None, **common).speculate == 0
    assert build_config(None, speculate=4, **common).speculate == 4
    with pytest.raises(ValueError, match=r"--speculate must be between 0 \(off\) and 16 .*got 17"):
        build_config(None, speculate=17, **common)
    from shard.cli import main

    for argv, env in ((["--speculate", "17"], {}), ([], {"SPECULATE": "-1"})):
        result = CliRunner().invoke(main, ["serve", "--device", "cpu", *argv], env=env)
        assert result.exit_code == 1 and "error: --speculate must be between 0 (off) and 16" in result.output


# --- the engine: the same tokens with and without speculation -------------------------------

@dataclass
class Model:
    engine: Engine
    block: int
    grounded: list[int]  # a prompt the model continues by copying: drafts get accepted
    others: list[list[int]]
    max_new: int
    chunk: int  # prompt tokens per chunk in the chunked-prefill test


def tiny_prompts() -> tuple[list[int], list[list[int]]]:
    """(grounded, others) for the tiny llama; its grounded output has a token first produced in
    an accepted run."""
    rng = random.Random(2)
    base = [rng.randrange(2, 120) for _ in range(9)]
    return base * 3, [[rng.randrange(2, 120) for _ in range(rng.randrange(5, 30))] for _ in range(4)]


@pytest.fixture(scope="module")
def tiny(tiny_llama) -> Model:
    return Model(make_engine(tiny_llama, block_size=4), 4, *tiny_prompts(), 30, 5)


@pytest.fixture(scope="module")
def smol(paged_kernel) -> Model:
    source = resolve_model(None, cache_dir=default_cache_dir(), offline=True)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    paragraph = ("The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, "
                 "polished the great lens, and wrote the weather in a leather book.")
    grounded = chat(tokenizer, f"Repeat the following text exactly: {paragraph}")
    others = [chat(tokenizer, q) for q in ("What is deep learning?", "Name three prime numbers.",
                                           "Write a haiku about the sea.", "Who wrote Hamlet?")]
    engine = make_engine(source.path, block_size=16, num_blocks_tokens=16384, cpu_kernel=paged_kernel)
    return Model(engine, 16, grounded, others, 24, 24)


@pytest.fixture(params=["tiny", pytest.param("smol", marks=pytest.mark.slow)])
def model(request, monkeypatch) -> Model:
    model = request.getfixturevalue(request.param)
    monkeypatch.setattr(model.engine, "config", model.engine.config)  # restored after the test
    monkeypatch.setattr(model.engine, "eos_ids", model.engine.eos_ids)
    return model


Requests = Callable[[BlockPool], list[pb.Request]]


def run(model: Model, speculate: int, requests: Requests, **kwargs) -> dict[int, list[pb.Generation]]:
    model.engine.config = dataclasses.replace(model.engine.config, speculate=speculate)
    return generations(model.engine, requests(BlockPool(model.block)), **kwargs)


def both(model: Model, requests: Requests, **kwargs):
    """(without, with) speculation, every request's tokens identical in both."""
    without, with_ = run(model, 0, requests, **kwargs), run(model, 4, requests, **kwargs)
    assert {i: token_ids(g) for i, g in with_.items()} == {i: token_ids(g) for i, g in without.items()}
    assert all(len(g.tokens.ids) == 1 for gens in without.values() for g in gens)
    return without, with_


def multi_token_steps(gens: list[pb.Generation]) -> int:
    return sum(len(g.tokens.ids) > 1 for g in gens)


def test_info_reports_speculate(model):
    assert model.engine.get_info().speculate == 0
    model.engine.config = dataclasses.replace(model.engine.config, speculate=4)
    assert model.engine.get_info().speculate == 4


def test_grounded_request_accepts_drafts_with_the_same_tokens_and_logprobs(model):
    without, with_ = both(model, lambda pool: [
        greedy_request(1, model.grounded, model.max_new, pool, top_n_tokens=2)])
    plain, spec = without[1], with_[1]
    assert multi_token_steps(spec) and len(spec) < len(plain)
    assert all(len(g.top_tokens) == len(g.tokens.ids) for g in spec)
    def logprobs(gens):
        return [x for g in gens for x in g.tokens.logprobs]

    assert logprobs(spec) == pytest.approx(logprobs(plain), abs=1e-4)
    tops = [[list(t.ids) for g in gens for t in g.top_tokens] for gens in (plain, spec)]
    assert tops[1] == tops[0]
    assert [g.HasField("finished") for g in spec] == [False] * (len(spec) - 1) + [True]
    assert spec[-1].finished.finish_reason == pb.FINISH_REASON_LENGTH
    assert spec[-1].finished.generated_tokens == model.max_new


def test_a_batch_mixing_drafting_and_other_rows(model):
    def params(**fields):
        return pb.NextTokenChooserParameters(**fields)

    rows = [
        (model.grounded, None),  # drafts
        (model.others[0], params(logit_bias={model.grounded[2]: 2.0})),  # drafts: per-line bias
        (model.others[1], params(do_sample=True, temperature=0.8, top_k=20, seed=7, has_seed=True)),
        (model.grounded, params(repetition_penalty=1.3)),
        (model.others[2], params(frequency_penalty=0.4, presence_penalty=0.3)),
        (model.grounded, params(do_sample=True, seed=11, has_seed=True)),
        (model.others[3], params(watermark=True)),
    ]

    def requests(pool):
        return [greedy_request(i, prompt, model.max_new, pool, **({"parameters": p} if p else {}))
                for i, (prompt, p) in enumerate(rows)]

    _, with_ = both(model, requests)
    assert multi_token_steps(with_[0])
    for i in range(2, len(rows)):  # sampled, penalised or watermarked: one token a step
        assert not multi_token_steps(with_[i])


def test_a_prompt_prefilled_in_chunks_beside_a_drafting_row(model):
    """Request 1 decodes (and drafts) while request 2's prompt is prefilled in chunks beside it."""
    def drive(speculate: int) -> dict[int, list[pb.Generation]]:
        engine = model.engine
        engine.config = dataclasses.replace(engine.config, speculate=speculate)
        pool, out = BlockPool(model.block), {}

        def collect(response):
            for g in response.generations:
                out.setdefault(g.request_id, []).append(g)
            return response

        second = model.others[0] + model.grounded
        response = collect(engine.prefill(pb.PrefillRequest(batch=pb.Batch(
            id=1, requests=[greedy_request(1, model.grounded, model.max_new, pool)], size=1))))
        for _ in range(3):
            response = collect(engine.decode(pb.DecodeRequest(batches=[response.batch])))
        chunk = [pb.RequestUpdate(request_id=2, chunk_len=model.chunk)]
        response = collect(engine.prefill(pb.PrefillRequest(
            batch=pb.Batch(id=2, requests=[greedy_request(2, second, model.max_new, pool, chunk_len=model.chunk)],
                           size=1),
            cached_batch=response.batch)))
        while response.HasField("batch"):
            response = collect(engine.decode(pb.DecodeRequest(batches=[response.batch], updates=chunk)))
        return out

    without, with_ = drive(0), drive(4)
    assert {i: token_ids(g) for i, g in with_.items()} == {i: token_ids(g) for i, g in without.items()}
    assert multi_token_steps(with_[1]) and multi_token_steps(with_[2])


def test_a_prefix_cache_hit_on_blocks_written_while_drafting(model):
    """The router offers prompt + generated[:-1] to its prefix cache: a request reading those blocks
    (generated tokens included, written by steps that verified drafts) gets the tokens of a
    request that computed them itself."""
    first = greedy_request(1, model.grounded, model.max_new, BlockPool(model.block))
    model.engine.config = dataclasses.replace(model.engine.config, speculate=4)
    gens = generations(model.engine, [first])[1]
    assert multi_token_steps(gens)
    cached = list(first.input_ids) + token_ids(gens)[:-1]
    shared = len(cached) // model.block * model.block
    assert shared > len(first.input_ids)  # generated tokens' blocks are reused
    second = cached[:shared] + model.others[0]

    def hit(pool: BlockPool) -> list[pb.Request]:
        pool.next = 1 + len(first.blocks)  # past the first request's blocks
        blocks = list(first.blocks[: shared // model.block]) + pool.take(len(second) - shared + model.max_new)
        return [pb.Request(id=2, input_ids=second, blocks=blocks, cache_len=shared,
                           stopping_parameters=first.stopping_parameters)]

    reused = token_ids(run(model, 4, hit)[2])  # first: computing from scratch overwrites those blocks
    assert reused == token_ids(run(model, 0, lambda pool: [greedy_request(2, second, model.max_new, pool)])[2])


def test_eos_stop_tokens_and_max_new_tokens_inside_an_accepted_run(model, monkeypatch):
    free = run(model, 4, lambda pool: [greedy_request(1, model.grounded, model.max_new, pool)])[1]
    tokens = token_ids(free)
    # A token first produced inside a multi-token run, not first in it: a stop there ends the
    # request inside the run (and cuts it, unless it is the model's own token after the drafts;
    # a model that copies its own output produces no new token before that).
    candidates = []
    offset = 0
    for g in free:
        ids = list(g.tokens.ids)
        candidates += [(i == len(ids) - 1, offset + i, offset) for i in range(1, len(ids))
                       if ids[i] not in tokens[: offset + i]]
        offset += len(ids)
    assert candidates, "no token first produced inside a run"
    _, stop_at, offset = min(candidates)  # one that cuts the run, if any
    stop = tokens[stop_at]

    monkeypatch.setattr(model.engine, "eos_ids", frozenset({stop}))
    _, with_ = both(model, lambda pool: [greedy_request(1, model.grounded, model.max_new, pool, ignore_eos=False)])
    gens = with_[1]
    assert token_ids(gens) == tokens[: stop_at + 1] and len(gens[-1].tokens.ids) > 1
    assert gens[-1].finished.finish_reason == pb.FINISH_REASON_EOS_TOKEN

    def stopping(pool):
        request = greedy_request(1, model.grounded, model.max_new, pool)
        request.stopping_parameters.stop_token_ids.append(stop)
        return [request]

    _, with_ = both(model, stopping)
    assert token_ids(with_[1]) == tokens[: stop_at + 1] and len(with_[1][-1].tokens.ids) > 1
    assert with_[1][-1].finished.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE

    length = offset + 2  # two tokens into the run
    _, with_ = both(model, lambda pool: [greedy_request(1, model.grounded, length, pool)])
    gens = with_[1]
    assert token_ids(gens) == tokens[:length] and len(gens[-1].tokens.ids) == 2
    assert gens[-1].finished.finish_reason == pb.FINISH_REASON_LENGTH
    assert gens[-1].finished.generated_tokens == length


def test_seeded_sampled_requests_draft_nothing_and_sample_the_same(tiny, monkeypatch):
    """(The bundled model's sampled rows are in the mixed batch above.)"""
    model = tiny
    monkeypatch.setattr(model.engine, "config", model.engine.config)

    def requests(pool):
        return [greedy_request(i, model.grounded, model.max_new, pool, parameters=pb.NextTokenChooserParameters(
            do_sample=True, temperature=t, top_p=0.9, seed=100 + i, has_seed=True))
            for i, t in enumerate((0.5, 1.0))]

    _, with_ = both(model, requests)
    assert not any(multi_token_steps(g) for g in with_.values())


def test_warmup_measures_the_step_cost_on_a_cpu_only_when_speculating(tiny_llama, monkeypatch):
    measured = []
    real = StepCost.measured.__func__

    def spy(cls, seconds, floor):
        measured.append(list(seconds))
        return real(cls, seconds, floor)

    monkeypatch.setattr(StepCost, "measured", classmethod(spy))
    for speculate in (0, 4):
        config = dataclasses.replace(make_config(str(tiny_llama), 4), speculate=speculate)
        model = get_model(Path(tiny_llama), ModelContext(TPGroup(), config.device, config.dtype, 4))
        engine = Engine(config, model, TPGroup(), Path(tiny_llama))
        engine.warmup(pb.WarmupRequest(max_batch_total_tokens=1024, max_prefill_tokens=16))
        if not speculate:
            assert not measured and engine.step_cost == LINEAR
    # One timed forward per size, each a real duration; the engine drafts by what it measured.
    assert len(measured) == 1 and len(measured[0]) == len(MEASURED_SIZES) and all(t > 0 for t in measured[0])
    assert engine.step_cost == real(StepCost, measured[0], LINEAR)


def _tp_rank(rank: int, world: int, port: int, folder: str, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    tp = TPGroup(rank=rank, world_size=world, group=dist.group.WORLD)
    config = dataclasses.replace(make_config(folder, 4), rank=rank, world_size=world, speculate=4)
    model = get_model(Path(folder), ModelContext(tp, config.device, config.dtype, 4))
    engine = Engine(config, model, tp, Path(folder))
    engine.warmup(pb.WarmupRequest(max_batch_total_tokens=1024, max_prefill_tokens=16))
    gens = generations(engine, _tp_requests())
    results[rank] = ({i: [list(g.tokens.ids) for g in gens[i]] for i in gens}, engine.step_cost.steps)
    dist.destroy_process_group()


def _tp_requests() -> list[pb.Request]:
    grounded, others = tiny_prompts()
    pool = BlockPool(4)
    return [greedy_request(0, grounded, 30, pool), greedy_request(1, others[0] + grounded, 30, pool)]


def test_tensor_parallel_ranks_draft_alike(tiny, monkeypatch):
    """Two gloo ranks with --speculate 4: both measured the step cost at warmup and took the
    same figures, the steps' shapes agree (else their all-reduces would not), and the tokens are
    a single engine's without speculation."""
    monkeypatch.setattr(tiny.engine, "config", dataclasses.replace(tiny.engine.config, speculate=0))
    expected = {i: token_ids(g) for i, g in generations(tiny.engine, _tp_requests()).items()}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.start_processes(_tp_rank, args=(2, port, str(tiny.engine.model_path), results), nprocs=2, join=True,
                       start_method="spawn")
    costs = [results[rank][1] for rank in range(2)]
    assert costs[0] == costs[1] and len(costs[0]) == 32
    merged = {i: runs for rank in range(2) for i, runs in results[rank][0].items()}
    assert sorted(merged) == [0, 1] and all(i % 2 == rank for rank in range(2) for i in results[rank][0])
    assert {i: [t for run in runs for t in run] for i, runs in merged.items()} == expected
    assert any(len(run) > 1 for run in merged[0])
