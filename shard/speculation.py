"""N-gram speculation (`--speculate N`, TGI's flag): draft tokens from a request's own ids, verify
them in the step the engine runs anyway.

A drafting row computes `[last, d1..dk]` instead of `[last]` (k+1 query tokens at the following
positions, logits at each). The sampler chooses a token at each of those lines as it would for
the row alone, and the row keeps the model's choices up to and including the first one that
differs from the draft (`accepted_run`): k+1 tokens when every draft was right, one when none was.
Only rows whose choice reads nothing but the line's own logits draft (`can_draft`), so a choice
does not depend on the drafts before it, and the sampler's arithmetic on a line is the same
whatever else the pass holds: the output is the one decoding without speculation gives. The
logits themselves follow the step's shape in their last bits (MKL's fp32 matmul over 1 row and
over 2-5 rows differ by up to ~5e-5 on the bundled model), exactly as they follow the batch's
composition without speculation, so a greedy token can differ only where two logits nearly tie.

K/V: the step writes K/V at every draft position. Those of the accepted drafts are the K/V of the
real tokens; the others lie at or past the row's new `num_computed`, where attention never reads
(it stops at the sequence length) and the next step writes first. The router offers the prefix
cache only prompt + generated[:-1], which all lie below `num_computed`.

The drafter (`Drafter`): the most recent earlier occurrence of the request's last tokens in its own
ids (prompt + output), preferring one that matches the last 3 tokens, then 2, and the tokens that
followed it. Work and memory are bounded: only the last `INDEX_WINDOW` prompt ids are indexed, and
only the `CANDIDATES` most recent occurrences of the last token are compared. Pure functions of
the ids, so every tensor-parallel rank drafts the same.

Adaptive (`Drafter.record`, `draft_tokens`): each request keeps a running estimate of the chance
that a draft token is accepted once those before it were (`Drafter.rate`), pauses after drafts
keep failing, and verifies in a step only as many draft tokens as raise the step's expected
tokens per unit of time (`StepCost.best_draft`: k tokens earn rate + rate² + ... + rate^k). What a
step of n query tokens costs is measured on the serving hardware at warmup (`StepCost`; far from
linear on a CPU, see there). A lone stream drafts long runs where it copies and little elsewhere;
a large batch, already busy computing, only drafts that nearly always hold. A step also stops
drafting at `STEP_TOKENS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shard.batch import RequestState
    from shard.grammar import GrammarState
    from shard.sampling import SamplingParams

MAX_SPECULATE = 16  # --speculate's bound: each draft is a query token of every step it rides in


def check_speculate(speculate: int) -> None:
    """--speculate's rule, for the shard and the launcher (which checks it before any start)."""
    if not 0 <= speculate <= MAX_SPECULATE:
        raise ValueError(f"--speculate must be between 0 (off) and {MAX_SPECULATE} draft tokens per step "
                         f"(got {speculate})")

# Key lengths (the last tokens matched against earlier ones): the longest match up to MAX_KEY,
# none below MIN_KEY. Measured on the bundled SmolLM2 (fp32, one CPU thread, greedy, --speculate
# 4): repeating a paragraph, 86 % of the drafts were accepted with these keys and 69 % with TGI's
# single token (decode 2.2-3.0x vs 1.5-1.6x as fast); on open-ended answers single-token keys
# drafted ~20 tokens per 96 and got 1 accepted (0.87-0.95x), 2-token keys drafted 6-9 (0.87-1.07x,
# within the noise). A step with drafts costs ~1.6x a one-token step there (a matmul over 2-5
# rows instead of a matrix-vector product), so a wasted draft is not free on a CPU.
MAX_KEY = 3
MIN_KEY = 2
INDEX_WINDOW = 4096  # prompt ids indexed (the last ones): bounded index work and memory per request
CANDIDATES = 64  # most recent occurrences of the last token compared for a longer key, per step
# A step drafts only while its query tokens, drafts included, stay within this: a GPU decode step
# is about memory-bound that far (a verified token costs little next to reading the weights);
# beyond it, and sooner on a CPU (a 33-token step of the bundled model costs ~3.8x a one-token
# one), a large batch already keeps the hardware busy and a rejected draft costs a real token.
STEP_TOKENS = 32
# Without a measurement (CUDA, or a KV cache too small to measure in), a step of n query tokens
# costs 1 + TOKEN_COST·(n - 1) one-token steps. CPU: the bundled model's fp32 steps of 5 to 33
# tokens, ~0.07-0.15 per token. CUDA: not measured yet (no GPU here); a decode step reads the
# weights once for every row, so a token costs a small fraction of it up to dozens of rows.
TOKEN_COST = {"cpu": 0.12, "cuda": 0.02}
# Where a CPU step's cost is measured (`StepCost.measured`), by query tokens; linear between.
MEASURED_SIZES = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32)
# A request's acceptance estimate (`Drafter.rate`): its accepted draft tokens ("hits") over the
# tokens verified up to and including the first rejected one ("trials"), both fading by
# EVIDENCE_DECAY per verified draft (it follows the last ~10 drafts), plus PRIOR_HITS accepted
# tokens of optimism: a new request drafts in full once, three misses bring it to ~0.27, and a
# request that has been copying for a while keeps most of its estimate through one miss (a 0.5
# weight on the latest draft instead halved it on every miss: the grounded set ran 1.7x faster
# with speculation instead of 2.1x, benchmarks/speculation_bench.py, one run each).
PRIOR_HITS = 1.0
EVIDENCE_DECAY = 0.9
# While a low estimate holds its drafts out a request learns nothing new, so its evidence fades by
# this share per step held and the estimate drifts back toward the prior: it tries again now and
# then (with the linear CPU cost, a lone stream ~20 steps after ten misses, one in a 28-token step
# after ~350, ~0.1 % of those steps' compute), and keeps drafting if its output has turned into
# text it can copy.
RATE_RECOVERY = 0.01
MISS_LIMIT = 3  # drafting steps in a row with nothing accepted before a request pauses drafting
MIN_PAUSE, MAX_PAUSE = 8, 128  # steps without drafts after MISS_LIMIT misses; doubles while misses go on


def can_draft(params: SamplingParams, grammar: GrammarState | None, explicit_slots: bool) -> bool:
    """Whether a request's tokens can be verified several per step: its choice reads only the
    line's logits (greedy, no penalty, no watermark: `SamplingParams.is_positionwise`) and no
    grammar (whose mask follows the tokens before). Not the health probe (explicit slots)."""
    return params.is_positionwise and grammar is None and not explicit_slots


def accepted_run(draft: Sequence[int], chosen: Sequence[int]) -> list[int]:
    """The tokens a row keeps from `chosen` (the model's choice at each of its len(draft) + 1
    lines): up to and including the first that differs from the draft."""
    for i, token in enumerate(draft):
        if chosen[i] != token:
            return list(chosen[: i + 1])
    return list(chosen[: len(draft) + 1])


@dataclass(frozen=True, slots=True)
class StepCost:
    """What a step of n query tokens costs, in one-token steps: `steps[n - 1]`, n = 1..STEP_TOKENS
    (drafting never builds a larger step).

    On a CPU the engine measures it at warmup (shard/engine.py), because it is far from linear:
    MKL's fp32 matmul runs 2 or 3 rows as 2 or 3 matrix-vector products, each reading the weights
    again, and switches to a blocked kernel at 4. Measured on a 2-vCPU AMD EPYC (AVX-512), bundled
    model, one sequence: 2 tokens 1.84x, 3 tokens 2.35x, 5 tokens 1.50x, 9 tokens 1.75x, 17 tokens
    2.07x. A one-token draft there costs 0.84 of a step for at most one token: it only pays at an
    acceptance above 84 %; a four-token draft costs 0.5 and pays above ~36 %. A linear cost
    would verify one-token drafts there at an acceptance above 12 %."""

    steps: tuple[float, ...]

    @classmethod
    def linear(cls, token_cost: float) -> "StepCost":
        return cls(tuple(1.0 + token_cost * n for n in range(STEP_TOKENS)))

    @classmethod
    def measured(cls, seconds: Sequence[float], floor: "StepCost") -> "StepCost":
        """From the time of a step at each of MEASURED_SIZES (the first: one token), linear in
        between, and never below `floor` (the linear model): the measurement runs one sequence
        over a short context, while a real step of many rows also reads each row's context and
        does per-row work it does not see. It is there to catch what the linear model misses
        (the dear 2-3 token steps), not to make large steps look cheaper."""
        base, steps = seconds[0], []
        points = list(zip(MEASURED_SIZES, seconds))
        for n in range(1, STEP_TOKENS + 1):
            (n0, t0), (n1, t1) = next((a, b) for a, b in zip(points, points[1:]) if a[0] <= n <= b[0])
            steps.append(max(floor(n), (t0 + (t1 - t0) * (n - n0) / (n1 - n0)) / base))
        return cls(tuple(steps))

    def __call__(self, tokens: int) -> float:
        return self.steps[min(tokens, STEP_TOKENS) - 1]

    def best_draft(self, available: int, rate: float, step_tokens: int, step_yield: float) -> int:
        """How many of `available` draft tokens to verify in a step of `step_tokens` tokens that
        yields `step_yield` tokens without them: the count that yields the most tokens per unit
        of time, k tokens earning rate + rate² + ... + rate^k (0: drafting does not pay here)."""
        best, best_rate, earned = 0, step_yield / self(step_tokens), 0.0
        for count in range(1, available + 1):
            earned += rate**count
            tokens_per_cost = (step_yield + earned) / self(step_tokens + count)
            if tokens_per_cost > best_rate:
                best, best_rate = count, tokens_per_cost
        return best


def draft_tokens(requests: Sequence[RequestState], block_size: int, cost: StepCost) -> None:
    """Set this step's `draft` of every request that drafts. Requests still prefilling draft
    nothing; a drafting request verifies as many of its draft tokens as pay in this step
    (`StepCost.best_draft`, with the drafts before it counted in); a draft never takes a request
    past `max_new_tokens` nor past its KV blocks (the router reserves prompt + max_new_tokens up
    front); the step's drafts stop at `STEP_TOKENS`, given to the requests in batch order."""
    step_tokens = sum(r.step_len for r in requests)
    # What the step yields without drafts: about a token per decoding row.
    step_yield = float(sum(not r.is_prefilling for r in requests) or 1)
    for r in requests:
        if step_tokens >= STEP_TOKENS:
            return
        if r.drafter is None or r.is_prefilling:
            continue
        # Positions seq_len - 1 .. seq_len - 1 + k are computed: seq_len + k must fit the blocks,
        # and the output grows by at most k + 1.
        room = min(r.max_new_tokens - len(r.output_ids) - 1, len(r.blocks) * block_size - r.seq_len,
                   STEP_TOKENS - step_tokens)
        draft = r.drafter.propose(r.output_ids, room)
        keep = cost.best_draft(len(draft), r.drafter.rate, step_tokens, step_yield)
        if draft and not keep:
            r.drafter.hold()
        r.draft = draft[:keep]
        step_tokens += keep
        step_yield += sum(r.drafter.rate**i for i in range(1, keep + 1))


class Drafter:
    """One request's n-gram drafter: its ids (the prompt's last `INDEX_WINDOW`, then every output
    id), where each token occurred, and how its drafts fared."""

    def __init__(self, prompt_ids: Sequence[int], max_draft: int):
        self.ids: list[int] = list(prompt_ids[-INDEX_WINDOW:])
        self.num_output = 0  # output ids copied into `ids`
        # token -> positions p (ascending) with ids[p - 1] == token: where what followed it starts
        self.followers: dict[int, list[int]] = {}
        self.indexed = 1  # positions below this are in `followers`
        self.max_draft = max_draft
        self.misses = 0  # drafting steps in a row with nothing accepted
        self.pause = 0  # steps left without drafting
        self.next_pause = MIN_PAUSE
        self.proposed = 0  # totals, for the acceptance rate
        self.accepted = 0
        self.hits = 0.0  # the fading evidence behind `rate` (see PRIOR_HITS)
        self.trials = 0.0

    @property
    def rate(self) -> float:
        """The estimated chance that a draft token is accepted, those before it having been."""
        return (self.hits + PRIOR_HITS) / (self.trials + PRIOR_HITS)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def propose(self, output_ids: Sequence[int], room: int) -> list[int]:
        """Up to min(`max_draft`, `room`) tokens to verify after the last one (the step keeps as
        many as pay: `draft_tokens`); [] when pausing or when the last token never occurred before."""
        self._sync(output_ids)
        if room <= 0:
            return []
        if self.pause:
            self.pause -= 1
            return []
        start = self._follower()
        if start is None:
            return []
        ids, draft = self.ids, []
        for p in range(start, start + min(self.max_draft, room)):
            # Past the end the draft continues from itself: a repeating stretch repeats again.
            draft.append(ids[p] if p < len(ids) else draft[p - len(ids)])
        return draft

    def hold(self) -> None:
        """A step in which this request's estimate kept its draft out: the evidence fades a
        little (RATE_RECOVERY), since the request learns nothing while it does not draft."""
        self.hits *= 1.0 - RATE_RECOVERY
        self.trials *= 1.0 - RATE_RECOVERY

    def record(self, proposed: int, accepted: int) -> None:
        """A verified draft: `accepted` of its `proposed` tokens were the model's own."""
        self.proposed += proposed
        self.accepted += accepted
        # Each accepted token is a success; the first rejected one, if any, the one failure.
        self.hits = EVIDENCE_DECAY * self.hits + accepted
        self.trials = EVIDENCE_DECAY * self.trials + accepted + (accepted < proposed)
        if accepted:
            self.misses, self.next_pause = 0, MIN_PAUSE
            return
        self.misses += 1
        if self.misses >= MISS_LIMIT:
            self.misses, self.pause = 0, self.next_pause
            self.next_pause = min(MAX_PAUSE, 2 * self.next_pause)

    def _sync(self, output_ids: Sequence[int]) -> None:
        """Copy the new output ids and index every position that now has a predecessor."""
        if len(output_ids) > self.num_output:
            self.ids += output_ids[self.num_output:]
            self.num_output = len(output_ids)
        ids, followers = self.ids, self.followers
        for p in range(self.indexed, len(ids)):
            followers.setdefault(ids[p - 1], []).append(p)
        self.indexed = max(self.indexed, len(ids))

    def _follower(self) -> int | None:
        """Where the continuation of the most recent earlier occurrence of the last tokens starts:
        among the `CANDIDATES` latest occurrences of the last token, the latest one preceded by the
        most of the tokens before it (MAX_KEY tokens matched in all at most; None below MIN_KEY)."""
        ids = self.ids
        candidates = self.followers.get(ids[-1])
        if not candidates:
            return None
        end = len(ids) - 1  # ids[end] is the last token; candidate p has ids[p - 1] == ids[end]
        best, best_len = None, -1
        for p in reversed(candidates[-CANDIDATES:]):
            matched = 1
            while matched < MAX_KEY and p - 1 - matched >= 0 and ids[p - 1 - matched] == ids[end - matched]:
                matched += 1
            if matched > best_len:
                best, best_len = p, matched
                if matched == MAX_KEY:
                    break
        return best if best_len >= MIN_KEY else None
