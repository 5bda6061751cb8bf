"""Batched, heterogeneous next-token selection: every row of a ragged batch has its own params.

Order per row (each stage runs only when some selected row needs it):
logit_bias -> repetition penalty -> frequency/presence penalties -> watermark -> grammar mask
-> temperature -> top_k -> top_p -> typical_p -> min_p -> argmax (greedy) or sample.
Stages up to the grammar mask apply to every row; the warpers only to sampling rows.
Reported log-probs always come from the raw logits, as TGI reports them (for a constrained row
that is the model's own probability of the token the grammar let through).

On CUDA the lines are processed SAMPLER_CHUNK at a time, so the sampler's [lines, vocab] float32
temporaries are bounded whatever the batch; `warm_up` puts that bound in the warmup's peak.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import reduce
from operator import or_
from typing import TYPE_CHECKING

import torch

from pytgi_common.sampling import is_greedy as greedy_rule
from shard.watermark import Watermark

if TYPE_CHECKING:
    from shard.grammar import GrammarMask

# Per-row feature bits: the batch OR tells which stages to run at all.
_BIAS, _REP, _FREQ_PRES, _WATERMARK, _SAMPLE = 1, 2, 4, 8, 16
_TEMP, _TOP_K, _TOP_P, _TYPICAL, _MIN_P, _TOP_N = 32, 64, 128, 256, 512, 1024
_PROCESS = _BIAS | _REP | _FREQ_PRES | _WATERMARK
_WARP = _TEMP | _TOP_K | _TOP_P | _TYPICAL | _MIN_P

# Columns of the per-row parameter table (one small [B, 8] tensor: cheap to filter and cat).
_C_TEMP, _C_TOP_K, _C_TOP_P, _C_TYPICAL, _C_MIN_P, _C_REP, _C_FREQ, _C_PRES = range(8)
_N_COLS = 8

# Kirchenbauer et al. watermark: TGI's hash key; gamma and delta are the shard's (shard/watermark.py).
_WM_HASH_KEY = 15485863

_NEG_INF = float("-inf")

# CUDA: most lines one sampler pass works on. Each holds a few [vocab] float32 temporaries
# (scores, sort values and int64 indices for top-p/typical, softmax, exponential noise), about
# 40 bytes a token: 128 lines of a 152k vocabulary take ~0.8 GB, while a kernel launch per
# chunk costs nothing next to a decode step. Each row draws only from its own generator and
# every stage is row-wise, so chunking changes no token. CPU: one pass (no memory is planned
# from a measured peak there, and each extra pass costs time).
SAMPLER_CHUNK = 128
# The largest top_n_tokens the warmup's pass reports (TGI's default --max-top-n-tokens).
_WARMUP_TOP_N = 5


def chunk_lines(device: torch.device) -> int | None:
    """Lines per sampler pass on this device; None: all at once."""
    return SAMPLER_CHUNK if device.type == "cuda" else None


def warmup_rows(device: torch.device, max_batch_size: int | None) -> int:
    """Rows of the warmup's sampler pass: the most lines one pass will ever hold (a chunk, or
    the router's max batch when smaller); 0 on CPU, whose KV budget is not a measured peak."""
    chunk = chunk_lines(device)
    if chunk is None:
        return 0
    return min(max_batch_size or chunk, chunk)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    typical_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0 = off
    do_sample: bool = False
    seed: int = 0  # resolved by the engine; used only when sampling
    repetition_penalty: float = 1.0  # CTRL/HF over prompt + generated: logit<0 -> *p, else /p
    frequency_penalty: float = 0.0  # OpenAI: logit -= f * count(token in generated)
    presence_penalty: float = 0.0  # OpenAI: logit -= p * (token in generated)
    logit_bias: tuple[tuple[int, float], ...] = ()  # additive, applied first
    watermark: bool = False
    top_n_tokens: int = 0  # top alternatives to report, from the raw distribution

    @property
    def is_greedy(self) -> bool:
        # The router's rule too (pytgi_common/sampling.py): a vanishing temperature is argmax
        # whatever else is set; otherwise do_sample or any warper samples, as in TGI.
        return greedy_rule(do_sample=self.do_sample, temperature=self.temperature, top_k=self.top_k,
                           top_p=self.top_p, typical_p=self.typical_p, min_p=self.min_p)

    @property
    def is_positionwise(self) -> bool:
        """The token is chosen from its line's logits alone: greedy, and no stage that reads the
        tokens before it (the penalties count them, the watermark hashes the previous one);
        logit_bias and top_n_tokens are per line. Such a row's tokens at several positions can be
        chosen in one pass, each as a step of its own would choose it (shard/speculation.py)."""
        return self.is_greedy and not _row_flags(self) & (_REP | _FREQ_PRES | _WATERMARK)


@dataclass(frozen=True, slots=True)
class SampleOutput:
    next_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor  # [N] float32, chosen token under the raw distribution
    top_ids: torch.Tensor | None  # [N, n_max] int64, or None when no row asked
    top_logprobs: torch.Tensor | None  # [N, n_max] float32, sorted descending


def _row_flags(p: SamplingParams) -> int:
    flags = 0
    if p.logit_bias:
        flags |= _BIAS
    if p.repetition_penalty != 1.0:
        flags |= _REP
    if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
        flags |= _FREQ_PRES
    if p.watermark:
        flags |= _WATERMARK
    if p.top_n_tokens > 0:
        flags |= _TOP_N
    if p.is_greedy:
        return flags  # warpers cannot change a greedy row's argmax: never run them
    flags |= _SAMPLE
    if p.temperature != 1.0:
        flags |= _TEMP
    if p.top_k > 0:
        flags |= _TOP_K
    if p.top_p < 1.0:
        flags |= _TOP_P
    if p.typical_p < 1.0:
        flags |= _TYPICAL
    if p.min_p > 0.0:
        flags |= _MIN_P
    return flags


def _table_row(p: SamplingParams) -> list[float]:
    # Neutral values for rows that skip a stage, so a stage can run over a whole
    # sub-batch without changing the rows that did not ask for it.
    temp = 1.0 if p.is_greedy else p.temperature
    return [temp, float(p.top_k), p.top_p, p.typical_p, p.min_p,
            p.repetition_penalty, p.frequency_penalty, p.presence_penalty]


def _history(
    rows: list[int], ids: list[list[int]], batch: int, vocab: int,
    device: torch.device, dtype: torch.dtype,
) -> torch.Tensor:
    """[batch, vocab] occurrence counts (or a seen-mask for bool) of `ids[k]` in row `rows[k]`."""
    out = torch.zeros(batch, vocab, dtype=dtype, device=device)
    r = [row for row, seq in zip(rows, ids) for _ in seq]
    t = [tok for seq in ids for tok in seq]
    if r:
        r_t = torch.tensor(r, dtype=torch.long, device=device)
        t_t = torch.tensor(t, dtype=torch.long, device=device)
        ones = torch.ones(len(r), dtype=dtype, device=device)
        out.index_put_((r_t, t_t), ones, accumulate=dtype != torch.bool)
    return out


def _top_k(scores: torch.Tensor, k: torch.Tensor, k_max: int) -> torch.Tensor:
    # HF TopKLogitsWarper per row: drop scores below the k-th largest (ties kept); k=0 is off.
    k_max = min(k_max, scores.shape[-1])
    top = scores.topk(k_max, dim=-1).values
    k = k.long()
    thresh = top.gather(1, (k.clamp(1, k_max) - 1).unsqueeze(1))
    thresh = thresh.masked_fill((k == 0).unsqueeze(1), _NEG_INF)
    return scores.masked_fill(scores < thresh, _NEG_INF)


def _top_p(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    # HF TopPLogitsWarper per row: keep the smallest set whose mass reaches top_p.
    sorted_logits, sorted_idx = scores.sort(dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1.0 - top_p).unsqueeze(1)
    remove[:, -1] = False  # always keep the most likely token
    remove &= (top_p < 1.0).unsqueeze(1)  # rounding must not trim rows that turned it off
    mask = remove.scatter(1, sorted_idx, remove)
    return scores.masked_fill(mask, _NEG_INF)


def _typical(scores: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    # HF TypicalLogitsWarper per row: keep tokens whose surprisal is closest to the entropy.
    logp = scores.log_softmax(dim=-1)
    ent = -(logp * logp.exp()).nansum(-1, keepdim=True)
    shifted = (-logp - ent).abs()
    sorted_scores, sorted_idx = shifted.sort(dim=-1, descending=False)
    cum = scores.gather(-1, sorted_idx).softmax(dim=-1).cumsum(dim=-1)
    last = (cum < mass.unsqueeze(1)).sum(dim=1).clamp_(max=scores.shape[-1] - 1)
    remove = sorted_scores > sorted_scores.gather(1, last.unsqueeze(1))
    remove[:, 0] = False
    remove &= (mass < 1.0).unsqueeze(1)
    mask = remove.scatter(1, sorted_idx, remove)
    return scores.masked_fill(mask, _NEG_INF)


def _min_p(scores: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    # HF MinPLogitsWarper: the top token always survives (p_max >= min_p * p_max), so
    # HF's keep-at-least-one sort is not needed.
    probs = scores.softmax(dim=-1)
    thresh = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
    return scores.masked_fill(probs < thresh, _NEG_INF)


def _warp(scores: torch.Tensor, table: torch.Tensor, flags: int, k_max: int) -> torch.Tensor:
    """Warpers for sampling rows, in HF order; `table` holds those rows' parameters."""
    if flags & _TEMP:
        scores = scores / table[:, _C_TEMP].unsqueeze(1)
    if flags & _TOP_K:
        scores = _top_k(scores, table[:, _C_TOP_K], k_max)
    if flags & _TOP_P:
        scores = _top_p(scores, table[:, _C_TOP_P])
    if flags & _TYPICAL:
        scores = _typical(scores, table[:, _C_TYPICAL])
    if flags & _MIN_P:
        scores = _min_p(scores, table[:, _C_MIN_P])
    return scores


def _greenlist_mask(prev_tokens: list[int], vocab: int, gamma: float) -> torch.Tensor:
    # A dedicated CPU generator, reseeded per row per step, keeps the green list a pure
    # function of the previous token and leaves the rows' sampling generators untouched.
    rng = torch.Generator(device="cpu")
    mask = torch.zeros(len(prev_tokens), vocab, dtype=torch.bool)
    size = int(vocab * gamma)
    for k, prev in enumerate(prev_tokens):
        rng.manual_seed(_WM_HASH_KEY * prev)
        mask[k, torch.randperm(vocab, generator=rng)[:size]] = True
    return mask


@dataclass(slots=True, eq=False)
class Sampler:
    """Per-batch sampling state; row i is the batch's i-th request.

    Penalty history lives only in tensors, allocated when some row uses it: rows that do
    not use a penalty hold zeros there, which is why no token lists are kept.
    """

    params: tuple[SamplingParams, ...]
    generators: tuple[torch.Generator | None, ...]  # one per sampling row; None when greedy
    flags: tuple[int, ...]
    table: torch.Tensor  # [B, 8] float32 per-row parameters
    seen: torch.Tensor | None  # [B, V] bool, prompt + output tokens (repetition penalty)
    counts: torch.Tensor | None  # [B, V] float32, output-token counts (frequency/presence)
    prev: torch.Tensor | None  # [B] int64, last accepted token (watermark)
    vocab_size: int
    device: torch.device
    watermark: Watermark = Watermark()
    all_flags: int = field(init=False)
    max_top_n: int = field(init=False)

    def __post_init__(self) -> None:
        self.all_flags = reduce(or_, self.flags, 0)
        self.max_top_n = max((p.top_n_tokens for p in self.params), default=0)

    @classmethod
    def build(
        cls, params: list[SamplingParams], prompt_ids: list[list[int]],
        output_ids: list[list[int]], vocab_size: int, device: torch.device, watermark: Watermark = Watermark(),
    ) -> Sampler:
        device = torch.device(device)
        flags = tuple(_row_flags(p) for p in params)
        all_flags = reduce(or_, flags, 0)
        batch = len(params)
        generators = tuple(_generator(p, device) for p in params)
        table = torch.tensor([_table_row(p) for p in params], dtype=torch.float32,
                             device=device).reshape(batch, _N_COLS)
        seen = counts = prev = None
        if all_flags & _REP:
            rows = [i for i, f in enumerate(flags) if f & _REP]
            seqs = [prompt_ids[i] + output_ids[i] for i in rows]
            seen = _history(rows, seqs, batch, vocab_size, device, torch.bool)
        if all_flags & _FREQ_PRES:
            rows = [i for i, f in enumerate(flags) if f & _FREQ_PRES]
            seqs = [output_ids[i] for i in rows]
            counts = _history(rows, seqs, batch, vocab_size, device, torch.float32)
        if all_flags & _WATERMARK:
            last = [(o or p or [0])[-1] for p, o in zip(prompt_ids, output_ids)]
            prev = torch.tensor(last, dtype=torch.long, device=device)
        return cls(tuple(params), generators, flags, table, seen, counts, prev,
                   vocab_size, device, watermark)

    @property
    def size(self) -> int:
        return len(self.params)

    def filter(self, indices: list[int]) -> Sampler:
        """Keep these rows, in this order; generators are carried, not copied."""
        idx = torch.tensor(indices, dtype=torch.long, device=self.device)
        flags = tuple(self.flags[i] for i in indices)
        kept = reduce(or_, flags, 0)

        def pick(t: torch.Tensor | None, bit: int) -> torch.Tensor | None:
            # Drop history once no remaining row needs it.
            return t.index_select(0, idx) if t is not None and kept & bit else None

        return Sampler(
            tuple(self.params[i] for i in indices), tuple(self.generators[i] for i in indices),
            flags, self.table.index_select(0, idx), pick(self.seen, _REP),
            pick(self.counts, _FREQ_PRES), pick(self.prev, _WATERMARK),
            self.vocab_size, self.device, self.watermark,
        )

    @classmethod
    def concatenate(cls, samplers: list[Sampler]) -> Sampler:
        """Rows of each sampler, in order. A sampler without some history had no row using it,
        so zeros stand in for its rows."""
        first = samplers[0]
        dev, vocab = first.device, first.vocab_size
        all_flags = reduce(or_, (s.all_flags for s in samplers), 0)

        def cat(name: str, bit: int, shape: tuple[int, ...], dtype: torch.dtype):
            if not all_flags & bit:
                return None
            parts = [getattr(s, name) if getattr(s, name) is not None
                     else torch.zeros((s.size, *shape), dtype=dtype, device=dev)
                     for s in samplers]
            return torch.cat(parts)

        return cls(
            tuple(p for s in samplers for p in s.params),
            tuple(g for s in samplers for g in s.generators),
            tuple(f for s in samplers for f in s.flags),
            torch.cat([s.table for s in samplers]),
            cat("seen", _REP, (vocab,), torch.bool),
            cat("counts", _FREQ_PRES, (vocab,), torch.float32),
            cat("prev", _WATERMARK, (), torch.long),
            vocab, dev, first.watermark,
        )

    def __call__(self, logits: torch.Tensor, rows: list[int] | None = None,
                 mask: GrammarMask | None = None) -> SampleOutput:
        """Choose one token per line of `logits` ([N, V], line j is batch row rows[j]); `mask`
        restricts some lines to the tokens their grammar allows.

        Reads but never mutates the recorded history: call `update` with what was accepted.
        """
        return self.sample(logits, rows, mask, chunk_lines(self.device))

    def sample(self, logits: torch.Tensor, rows: list[int] | None, mask: GrammarMask | None,
               chunk: int | None) -> SampleOutput:
        """`__call__`, `chunk` lines at a time (None: all at once); the tokens do not depend on it."""
        n_top = self.max_top_n if rows is None else max((self.params[r].top_n_tokens for r in rows),
                                                          default=0)
        num_lines = logits.shape[0]
        if chunk is None or num_lines <= chunk:
            return self._sample(logits, rows, mask, n_top)
        lines = list(range(num_lines)) if rows is None else rows
        parts = [self._sample(logits[start:start + chunk], lines[start:start + chunk],
                              _mask_lines(mask, start, start + chunk), n_top)
                 for start in range(0, num_lines, chunk)]
        tops = [part.top_ids for part in parts]
        return SampleOutput(
            torch.cat([part.next_ids for part in parts]), torch.cat([part.logprobs for part in parts]),
            None if tops[0] is None else torch.cat(tops),
            None if tops[0] is None else torch.cat([part.top_logprobs for part in parts]),
        )

    def _sample(self, logits: torch.Tensor, rows: list[int] | None, mask: GrammarMask | None,
                n_top: int) -> SampleOutput:
        flags = self._flags_of(rows)
        raw = logits.float()
        lse = raw.logsumexp(dim=-1)
        if flags & (_PROCESS | _SAMPLE) or mask is not None:
            next_ids = self._choose(self._process(raw, rows, mask), rows, flags)
        else:
            next_ids = raw.argmax(dim=-1)  # fast path: all greedy, nothing to process
        logprobs = raw.gather(1, next_ids.unsqueeze(1)).squeeze(1) - lse
        top_ids = top_logprobs = None
        if n_top:  # every chunk reports the call's n, so the chunks' top tensors concatenate
            top = raw.topk(min(n_top, raw.shape[-1]), dim=-1)
            top_ids, top_logprobs = top.indices, top.values - lse.unsqueeze(1)
        return SampleOutput(next_ids, logprobs, top_ids, top_logprobs)

    def update(self, rows: list[int] | None, next_ids: torch.Tensor | list[int]) -> None:
        """Record accepted tokens for these rows (penalty history, watermark's previous token).
        A row repeats when it accepted several tokens in one step (speculation, in order); `prev`
        then takes any one of them, which is read only for a watermarked row, and those never
        draft."""
        if self.seen is None and self.counts is None and self.prev is None:
            return
        ids = torch.as_tensor(next_ids, dtype=torch.long).to(self.device).reshape(-1)
        if rows is None:
            idx = torch.arange(self.size, device=self.device)
        else:
            idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        if self.seen is not None:
            self.seen[idx, ids] = True
        if self.counts is not None:
            ones = torch.ones(ids.shape[0], dtype=torch.float32, device=self.device)
            self.counts.index_put_((idx, ids), ones, accumulate=True)
        if self.prev is not None:
            self.prev[idx] = ids

    # -- internals ---------------------------------------------------------------------

    def _flags_of(self, rows: list[int] | None) -> int:
        if rows is None:
            return self.all_flags
        return reduce(or_, (self.flags[r] for r in rows), 0)

    def _positions(self, rows: list[int] | None, bit: int) -> tuple[list[int], list[int]]:
        """(line positions, batch rows) of the selected rows that have `bit`."""
        sel = range(self.size) if rows is None else rows
        hits = [(j, r) for j, r in enumerate(sel) if self.flags[r] & bit]
        return [j for j, _ in hits], [r for _, r in hits]

    def _select(self, t: torch.Tensor, rows: list[int] | None) -> torch.Tensor:
        if rows is None:
            return t
        return t.index_select(0, torch.tensor(rows, dtype=torch.long, device=t.device))

    def _process(self, logits: torch.Tensor, rows: list[int] | None = None,
                 mask: GrammarMask | None = None) -> torch.Tensor:
        """Final scores [N, V] float32: penalties etc. on every row, the grammar mask on its
        lines, warpers on sampling rows. Greedy rows take their argmax, sampling rows sample
        from their softmax."""
        flags = self._flags_of(rows)
        scores = logits.float().clone()
        if flags & _BIAS:
            self._apply_bias(scores, rows)
        if flags & (_REP | _FREQ_PRES):
            self._apply_penalties(scores, rows, flags)
        if flags & _WATERMARK:
            pos, brows = self._positions(rows, _WATERMARK)
            prev = self.prev[brows].tolist()
            green = _greenlist_mask(prev, scores.shape[-1], self.watermark.gamma).to(scores.device)
            pos_t = torch.tensor(pos, dtype=torch.long, device=scores.device)
            scores.index_add_(0, pos_t, green.to(scores.dtype) * self.watermark.delta)
        if mask is not None:
            mask.apply_(scores)
        if flags & _WARP:
            pos, brows = self._positions(rows, _SAMPLE)
            k_max = max(self.params[r].top_k for r in brows)
            table = self.table[brows].to(scores.device)
            if len(pos) == scores.shape[0]:
                scores = _warp(scores, table, flags, k_max)
            else:
                pos_t = torch.tensor(pos, dtype=torch.long, device=scores.device)
                sub = _warp(scores.index_select(0, pos_t), table, flags, k_max)
                scores.index_copy_(0, pos_t, sub)
        return scores

    def _apply_bias(self, scores: torch.Tensor, rows: list[int] | None) -> None:
        pos, brows = self._positions(rows, _BIAS)
        trip = [(j, t, b) for j, r in zip(pos, brows) for t, b in self.params[r].logit_bias]
        dev = scores.device
        p_t = torch.tensor([j for j, _, _ in trip], dtype=torch.long, device=dev)
        t_t = torch.tensor([t for _, t, _ in trip], dtype=torch.long, device=dev)
        b_t = torch.tensor([b for _, _, b in trip], dtype=scores.dtype, device=dev)
        scores.index_put_((p_t, t_t), b_t, accumulate=True)

    def _apply_penalties(self, scores: torch.Tensor, rows: list[int] | None, flags: int) -> None:
        # History may be narrower or wider than the logits (padded vocab): penalise the overlap.
        width = min(scores.shape[-1], self.vocab_size)
        view = scores[:, :width]
        table = self._select(self.table, rows).to(scores.device)
        if flags & _REP:
            seen = self._select(self.seen, rows)[:, :width]
            pen = table[:, _C_REP].unsqueeze(1)
            view.copy_(torch.where(seen, torch.where(view < 0, view * pen, view / pen), view))
        if flags & _FREQ_PRES:
            counts = self._select(self.counts, rows)[:, :width]
            freq = table[:, _C_FREQ].unsqueeze(1)
            pres = table[:, _C_PRES].unsqueeze(1)
            view.sub_(freq * counts + pres * (counts > 0).to(counts.dtype))

    def _choose(self, scores: torch.Tensor, rows: list[int] | None, flags: int) -> torch.Tensor:
        if not flags & _SAMPLE:
            return scores.argmax(dim=-1)
        pos, brows = self._positions(rows, _SAMPLE)
        every = len(pos) == scores.shape[0]
        pos_t = None if every else torch.tensor(pos, dtype=torch.long, device=scores.device)
        sub = scores if every else scores.index_select(0, pos_t)
        probs = sub.softmax(dim=-1)
        # Exponential race (argmax p/q, q ~ Exp(1)) equals a multinomial draw; each row draws
        # only from its own generator, so its tokens ignore batch-mates and row position. The
        # draws are uniforms, made exponential by one batched -log: a per-row `exponential_`
        # takes its log element by element (5x slower on a CPU). A draw of exactly 0 (2**-24
        # per token) gives q = inf: that token cannot win.
        q = torch.empty_like(probs)
        for k, r in enumerate(brows):
            q[k].uniform_(generator=self.generators[r])
        sampled = (probs / q.log_().neg_()).argmax(dim=-1)
        if every:
            return sampled
        out = scores.argmax(dim=-1)
        out.index_copy_(0, pos_t, sampled)
        return out


def _mask_lines(mask: GrammarMask | None, start: int, stop: int) -> GrammarMask | None:
    """The part of `mask` on lines [start, stop), renumbered from 0 (None if it has none)."""
    if mask is None:
        return None
    keep = [k for k, line in enumerate(mask.lines) if start <= line < stop]
    if not keep:
        return None
    index = torch.tensor(keep, dtype=torch.long, device=mask.bits.device)
    return replace(mask, lines=[mask.lines[k] - start for k in keep], bits=mask.bits.index_select(0, index))


def warm_up(vocab_size: int, rows: int, device: torch.device, logits_dtype: torch.dtype) -> None:
    """One decode step's logits and sampler pass at `rows` lines, with every stage on, so that the
    warmup's measured peak holds what such a step holds: the lm_head's [rows, vocab] output in the
    model dtype with its float32 copy, then the float32 lines picked for sampling, the penalty
    history, and the temporaries of every stage (a greedy row among sampling rows takes the
    sub-batch path, which copies)."""
    from shard.grammar import GrammarMask

    everything = SamplingParams(
        temperature=0.7, top_k=50, top_p=0.9, typical_p=0.95, min_p=0.05, do_sample=True,
        repetition_penalty=1.1, frequency_penalty=0.1, presence_penalty=0.1,
        logit_bias=((0, 1.0),), watermark=True, top_n_tokens=_WARMUP_TOP_N,
    )
    params = [replace(everything, temperature=0.0)] + [replace(everything, seed=r) for r in range(1, rows)]
    sampler = Sampler.build(params, [[1, 2, 3]] * rows, [[4]] * rows, vocab_size, device)
    head = torch.randn(rows, vocab_size, device=device, dtype=logits_dtype)  # the lm_head's output
    logits = head.float()  # what the model returns
    del head
    lines = logits[list(range(rows))]  # Engine._step picks the sampled lines with a list: a copy
    words = (vocab_size + 31) // 32
    mask = GrammarMask(list(range(rows)), torch.full((rows, words), -1, dtype=torch.int32))
    out = sampler(lines, list(range(rows)), mask)
    sampler.update(list(range(rows)), out.next_ids)


def _generator(p: SamplingParams, device: torch.device) -> torch.Generator | None:
    if p.is_greedy:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(p.seed)
    return gen
