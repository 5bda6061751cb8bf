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

Adaptive (`Drafter.record`, `draft_tokens`): a request drafts as many tokens as its last drafts
earned (AIMD-like: double after a fully accepted draft, the accepted count + 1 after a partial
one), pauses after drafts keep failing, and a step drafts only while it stays small enough to be
memory-bound, where a verified token costs little next to reading the weights once.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def draft_tokens(requests: Sequence[RequestState], block_size: int) -> None:
    """Set this step's `draft` of every request that drafts. Requests still prefilling draft
    nothing; a draft never takes a request past `max_new_tokens` nor past its KV blocks (the
    router reserves prompt + max_new_tokens up front); the step's drafts stop at `STEP_TOKENS`,
    given to the requests in batch order."""
    budget = STEP_TOKENS - sum(r.step_len for r in requests)
    for r in requests:
        if budget <= 0:
            return
        if r.drafter is None or r.is_prefilling:
            continue
        # Positions seq_len - 1 .. seq_len - 1 + k are computed: seq_len + k must fit the blocks,
        # and the output grows by at most k + 1.
        room = min(r.max_new_tokens - len(r.output_ids) - 1, len(r.blocks) * block_size - r.seq_len, budget)
        r.draft = r.drafter.propose(r.output_ids, room)
        budget -= len(r.draft)


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
        self.length = max_draft  # tokens to draft next
        self.misses = 0  # drafting steps in a row with nothing accepted
        self.pause = 0  # steps left without drafting
        self.next_pause = MIN_PAUSE
        self.proposed = 0  # totals, for the acceptance rate
        self.accepted = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def propose(self, output_ids: Sequence[int], room: int) -> list[int]:
        """Up to min(`length`, `room`) tokens to verify after the last one; [] when pausing or
        when the last token never occurred before."""
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
        for p in range(start, start + min(self.length, room)):
            # Past the end the draft continues from itself: a repeating stretch repeats again.
            draft.append(ids[p] if p < len(ids) else draft[p - len(ids)])
        return draft

    def record(self, proposed: int, accepted: int) -> None:
        """A verified draft: `accepted` of its `proposed` tokens were the model's own."""
        self.proposed += proposed
        self.accepted += accepted
        self.length = min(self.max_draft, 2 * self.length) if accepted == proposed else accepted + 1
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
