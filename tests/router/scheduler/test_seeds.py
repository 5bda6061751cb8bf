"""The router gives every sampled generation a seed (TGI's router does): the ranks of a sharded
model must draw the same tokens, and the seed reported in `details` must reproduce the output.
Real batcher and Infer over an in-process engine (tests/router/helpers.py)."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from router.events import TokenEvent
from shard.batch import unseeded_seed
from tests.conftest import make_engine, save_tiny
from tests.router.helpers import serving, valid_request

SAMPLED = dict(do_sample=True, temperature=1.5, top_k=50)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("tiny"))


def run(s, *phases):
    """Each phase (a function of the previous phase's results → requests) runs to the end, all
    on one batcher and event loop."""

    async def main():
        batcher = asyncio.create_task(s.batcher.run())
        results = None
        try:
            for phase in phases:
                results = await asyncio.gather(*(s.collect(v) for v in phase(results)))
            return results
        finally:
            batcher.cancel()

    return asyncio.run(main())


def ids_and_seed(events) -> tuple[list[int], int | None]:
    assert all(isinstance(e, TokenEvent) for e in events), events
    return [e.token.id for e in events], events[-1].finish.seed


def test_unseeded_sampling_reports_a_seed_that_reproduces_it(tiny, router_tokenizer):
    s = serving(make_engine(tiny, block_size=4, num_blocks_tokens=2048), router_tokenizer)
    drawn = itertools.count(1000)
    s.infer.draw_seed = lambda: next(drawn)
    prompt = [5, 9, 17, 33, 4, 8]
    firsts = []

    def first(_):
        return [valid_request(prompt, 12, **SAMPLED) for _ in range(3)]

    def again(events):
        firsts.extend(ids_and_seed(e) for e in events)
        return [valid_request(prompt, 12, seed=seed, **SAMPLED) for _, seed in firsts]

    repeated = [ids_and_seed(events) for events in run(s, first, again)]
    # One seed per generation (not per batch, not per HTTP request), the one sent to the shard.
    assert sorted(seed for _, seed in firsts) == [1000, 1001, 1002]
    assert repeated == firsts
    assert len({tuple(ids) for ids, _ in firsts}) > 1  # the seeds did differ


def test_a_client_seed_is_kept_and_greedy_reports_none(tiny, router_tokenizer):
    s = serving(make_engine(tiny, block_size=4, num_blocks_tokens=2048), router_tokenizer)
    s.infer.draw_seed = lambda: pytest.fail("a seed was drawn for a request that has one or is greedy")
    seeded, greedy = run(s, lambda _: [valid_request([3, 4, 5], 4, seed=7, **SAMPLED), valid_request([3, 4, 5], 4)])
    assert ids_and_seed(seeded)[1] == 7
    assert ids_and_seed(greedy)[1] is None


def test_best_of_copies_draw_their_own_seeds(tiny, router_tokenizer):
    s = serving(make_engine(tiny, block_size=4, num_blocks_tokens=2048), router_tokenizer)
    drawn = itertools.count(1)
    s.infer.draw_seed = lambda: next(drawn)

    async def main():
        batcher = asyncio.create_task(s.batcher.run())
        try:
            return await s.infer.generate_best_of(valid_request([5, 6, 7], 6, best_of=3, **SAMPLED))
        finally:
            batcher.cancel()

    best, others = asyncio.run(main())
    assert sorted(g.finish.seed for g in (best, *others)) == [1, 2, 3]


def test_the_shards_fallback_seed_is_shared_by_ranks_and_differs_by_request():
    # Only a client that is not our router sends sampled requests without a seed; every rank
    # then derives the same seed from the group's base and the request id.
    seeds = [unseeded_seed(12345, request_id) for request_id in range(1000)]
    assert seeds == [unseeded_seed(12345, request_id) for request_id in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= seed < 2**63 for seed in seeds)
    assert unseeded_seed(12346, 0) != seeds[0]
