"""Batch: per-request state of a cached batch, from_pb / filter / concatenate / to_pb, and the
tensors of one step.

A request's sequence is prompt_ids + output_ids. `num_computed` tokens of it have K/V in the
cache; a step computes the next `step_len` tokens (a prompt chunk, or the one token sampled last
step) and samples a new token only if that reaches the end of the known sequence. Prefill,
chunked prefill, prefix hits (`cache_len`) and decode are therefore one code path. With
speculation a decode row also computes this step's `draft` after its last token and samples at
each of those positions too (shard/speculation.py); `advance` keeps the accepted run.

A request may name a LoRA adapter (`RequestState.adapter`, its slot in the model's adapters);
`prepare` groups every token row the step computes for it (prompt chunks, decode tokens, drafts)
into the step's `LoraStep`, None when no row uses one.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from shard.attention import AttentionMetadata, SeqStep, build_metadata
from shard.grammar import GrammarMask, Grammars, GrammarState, step_mask
from shard.layers.lora import LoraStep
from pytgi_proto import generate_pb2 as pb
from shard.sampling import Sampler, SampleOutput, SamplingParams
from shard.speculation import Drafter, accepted_run, can_draft
from shard.watermark import Watermark

log = logging.getLogger(__name__)


def unseeded_seed(seed_base: int, request_id: int) -> int:
    """The seed of a sampled request that came without one (the router assigns seeds, so only
    other clients get here): a pure function of the request id and a base that every rank of the
    group shares (Engine draws it on rank 0 at start-up), so that all ranks sample the same
    tokens. splitmix64's finalizer spreads consecutive ids over the whole range."""
    z = (seed_base + (request_id + 1) * 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) >> 1  # 63 bits: a valid torch seed, a valid TGI u64


@dataclass(slots=True)
class RequestState:
    id: int
    prompt_ids: list[int]
    output_ids: list[int]
    blocks: list[int]
    slots: list[int] | None  # explicit slots (health probe); None: derived from blocks
    num_computed: int  # tokens of prompt + output whose K/V are in the cache
    chunk_len: int | None  # prompt tokens to compute next step; None: all remaining
    max_new_tokens: int
    stop_token_ids: frozenset[int]
    ignore_eos: bool
    prefill_logprobs: bool
    top_n_tokens: int
    seed: int | None  # reported back for sampling requests
    prompt_logprobs: list[float]  # filled while prefilling when prefill_logprobs is set
    grammar: GrammarState | None = None  # constrained decoding: the request's matcher
    drafter: Drafter | None = None  # speculation: None when the request never drafts
    draft: list[int] = field(default_factory=list)  # tokens this step verifies; empty between steps
    adapter: int | None = None  # LoRA: the slot of the request's adapter in ModelInfo.adapter_ids; None: the base model

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    @property
    def step_len(self) -> int:
        remaining = self.seq_len - self.num_computed
        if self.is_prefilling and self.chunk_len:
            return min(self.chunk_len, remaining)
        return remaining + len(self.draft)

    @property
    def samples(self) -> bool:
        """The step reaches the end of the known sequence (and its draft): it chooses tokens."""
        return self.num_computed + self.step_len == self.seq_len + len(self.draft)

    def step_tokens(self) -> list[int]:
        start, prompt_len = self.num_computed, len(self.prompt_ids)
        if start < prompt_len:
            return self.prompt_ids[start : start + self.step_len]
        return self.output_ids[start - prompt_len :] + self.draft


def _params_from_pb(p: pb.NextTokenChooserParameters, top_n: int, seed: int) -> SamplingParams:
    return SamplingParams(
        temperature=p.temperature if p.temperature else 1.0,
        top_k=p.top_k,
        top_p=p.top_p if p.top_p else 1.0,
        typical_p=p.typical_p if p.typical_p else 1.0,
        min_p=p.min_p,
        do_sample=p.do_sample,
        seed=seed,
        repetition_penalty=p.repetition_penalty if p.repetition_penalty else 1.0,
        frequency_penalty=p.frequency_penalty,
        presence_penalty=p.presence_penalty,
        logit_bias=tuple(sorted(p.logit_bias.items())),
        watermark=p.watermark,
        top_n_tokens=top_n,
    )


@dataclass(frozen=True, slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_index: torch.Tensor  # [N] flattened-token indices whose logits are computed
    # Batch rows that sample this step, one entry per sampled line: a drafting row has 1 + len(draft)
    # consecutive ones (its last token's position, then each draft's).
    sample_rows: list[int]
    sample_logits: list[int]  # their line in the logits
    # (row, first logits line, number of lines) of requests collecting prompt logprobs
    prompt_logit_spans: list[tuple[int, int, int]]
    lora: LoraStep | None = None  # the rows that use an adapter; None: none does


class StepRows(Protocol):
    """What a step's bookkeeping reads of its inputs: `StepInputs`, or the `DecodePlan` of a
    replayed CUDA graph (shard/cuda_graphs.py)."""

    sample_rows: list[int]
    sample_logits: list[int]
    prompt_logit_spans: Sequence[tuple[int, int, int]]


class Batch:
    def __init__(self, batch_id: int, requests: list[RequestState], sampler: Sampler):
        self.id = batch_id
        self.requests = requests
        self.sampler = sampler
        # Decided once per batch composition: batches without a grammar skip all grammar work.
        self.has_grammar = any(r.grammar is not None for r in requests)
        self.has_adapter = any(r.adapter is not None for r in requests)

    def __len__(self) -> int:
        return len(self.requests)

    @classmethod
    def from_pb(cls, batch: pb.Batch, vocab_size: int, device: torch.device,
                grammars: Grammars | None = None, seed_base: int | None = None,
                watermark: Watermark = Watermark(), speculate: int = 0,
                adapter_ids: Sequence[str] = ()) -> "Batch":
        """`adapter_ids`: the LoRA adapters the model serves (ModelInfo.adapter_ids)."""
        if seed_base is None:
            seed_base = secrets.randbits(64)  # one rank (tests): nothing to agree with
        requests, params = [], []
        for r in batch.requests:
            grammar = _grammar_state(r, grammars)
            if not r.input_ids:
                raise ValueError(f"request {r.id}: empty input_ids")
            if r.cache_len >= len(r.input_ids):
                raise ValueError(f"request {r.id}: cache_len {r.cache_len} must be < prompt length {len(r.input_ids)}")
            adapter = _adapter_slot(r, adapter_ids)
            seed = r.parameters.seed if r.parameters.has_seed else unseeded_seed(seed_base, r.id)
            p = _params_from_pb(r.parameters, r.top_n_tokens, seed)
            drafts = speculate and can_draft(p, grammar, explicit_slots=bool(r.slots))
            requests.append(RequestState(
                id=r.id, prompt_ids=list(r.input_ids), output_ids=[], blocks=list(r.blocks),
                slots=list(r.slots) or None, num_computed=r.cache_len,
                chunk_len=r.chunk_len if r.HasField("chunk_len") else None,
                max_new_tokens=r.stopping_parameters.max_new_tokens,
                stop_token_ids=frozenset(r.stopping_parameters.stop_token_ids),
                ignore_eos=r.stopping_parameters.ignore_eos_token, prefill_logprobs=r.prefill_logprobs,
                top_n_tokens=r.top_n_tokens, seed=None if p.is_greedy else seed,
                prompt_logprobs=[math.nan] * (r.cache_len + 1) if r.prefill_logprobs else [],
                grammar=grammar,
                drafter=Drafter(r.input_ids, speculate) if drafts else None,
                adapter=adapter,
            ))
            params.append(p)
        sampler = Sampler.build(params, [s.prompt_ids for s in requests], [[] for _ in requests], vocab_size, device,
                                watermark)
        return cls(batch.id, requests, sampler)

    def filter(self, request_ids: list[int]) -> "Batch":
        index = {r.id: i for i, r in enumerate(self.requests)}
        missing = [i for i in request_ids if i not in index]
        if missing:
            raise ValueError(f"batch {self.id} has no requests {missing}")
        keep = [index[i] for i in request_ids]
        return Batch(self.id, [self.requests[i] for i in keep], self.sampler.filter(keep))

    @classmethod
    def concatenate(cls, batches: list["Batch"], batch_id: int) -> "Batch":
        requests = [r for b in batches for r in b.requests]
        return cls(batch_id, requests, Sampler.concatenate([b.sampler for b in batches]))

    def grammar_mask(self, sample_rows: list[int]) -> GrammarMask | None:
        """Allowed tokens of the constrained rows that sample this step (None: no constraint)."""
        if not self.has_grammar:
            return None
        constrained = [(line, self.requests[row].grammar) for line, row in enumerate(sample_rows)
                       if self.requests[row].grammar is not None]
        return step_mask(constrained)

    def apply_updates(self, updates) -> None:
        by_id = {r.id: r for r in self.requests}
        for update in updates:
            request = by_id.get(update.request_id)
            if request is None:
                continue  # the update is for another batch of the same step
            request.blocks.extend(update.new_blocks)
            if update.HasField("chunk_len"):
                request.chunk_len = update.chunk_len

    def to_pb(self, block_size: int) -> pb.CachedBatch:
        return pb.CachedBatch(
            id=self.id,
            request_ids=[r.id for r in self.requests],
            size=len(self.requests),
            max_tokens=sum(len(r.blocks) for r in self.requests) * block_size,
            current_tokens=sum(r.step_len for r in self.requests),
        )

    def prepare(self, block_size: int, device: torch.device, layout: str = "padded") -> StepInputs:
        tokens: list[int] = []
        positions: list[int] = []
        seqs: list[SeqStep] = []
        logits_index: list[int] = []
        sample_rows, sample_logits, spans = [], [], []
        adapter_spans: list[tuple[int, int, int]] = []  # (slot, first token, count)
        for row, r in enumerate(self.requests):
            start, n = r.num_computed, r.step_len
            if n <= 0:
                raise ValueError(f"request {r.id} has nothing to compute")
            needed = -(-(start + n) // block_size)
            if r.slots is None and len(r.blocks) < needed:
                raise ValueError(f"request {r.id}: {len(r.blocks)} blocks cannot hold {start + n} tokens")
            first = len(tokens)
            if r.adapter is not None:
                adapter_spans.append((r.adapter, first, n))
            tokens += r.step_tokens()
            positions += range(start, start + n)
            seqs.append(SeqStep(n, start + n, r.blocks, r.slots))
            lines = 1 + len(r.draft) if r.samples else 0  # the last known token's position, then the draft's
            if r.prefill_logprobs and r.is_prefilling:
                spans.append((row, len(logits_index), n))
                logits_index += range(first, first + n)
            else:
                logits_index += range(first + n - lines, first + n)
            sample_rows += [row] * lines
            sample_logits += range(len(logits_index) - lines, len(logits_index))
        # One host tensor, one copy: on CUDA from page-locked memory, so the copy is asynchronous.
        num_tokens, on_cuda = len(tokens), device.type == "cuda"
        host = torch.tensor(tokens + positions + logits_index, dtype=torch.long, pin_memory=on_cuda)
        flat = host.to(device, non_blocking=True) if on_cuda else host
        return StepInputs(
            input_ids=flat[:num_tokens],
            positions=flat[num_tokens : 2 * num_tokens],
            meta=build_metadata(seqs, block_size, device, layout),
            logits_index=flat[2 * num_tokens :],
            sample_rows=sample_rows,
            sample_logits=sample_logits,
            prompt_logit_spans=spans,
            lora=LoraStep.build(adapter_spans, num_tokens, device) if self.has_adapter else None,
        )

    def record_prompt_logprobs(self, inputs: StepRows, logits: torch.Tensor) -> None:
        """Logprob of each prompt token computed this step, from the previous position's logits."""
        for row, first, count in inputs.prompt_logit_spans:
            r = self.requests[row]
            start = r.num_computed
            targets = r.prompt_ids[start + 1 : start + count + 1]  # the last line predicts a new token
            lines = logits[first : first + len(targets)].log_softmax(-1)
            picked = lines.gather(1, torch.tensor(targets, device=logits.device)[:, None]).squeeze(1)
            r.prompt_logprobs += picked.tolist()

    def advance(self, inputs: StepRows, out: SampleOutput | None, eos_ids: frozenset[int]) -> list[pb.Generation]:
        """Account the computed tokens, append the chosen ones (a drafting row: its accepted run) to
        the requests and the sampler's history, stop finished requests."""
        for r in self.requests:
            r.num_computed += r.step_len - len(r.draft)  # accepted drafts are counted as appended
            r.chunk_len = None  # a further chunk size arrives as a RequestUpdate, if at all
        if out is None:
            return []
        lists = host_lists(out)
        generations, rows, appended = [], [], []
        line = 0
        while line < len(inputs.sample_rows):
            row = inputs.sample_rows[line]
            r = self.requests[row]
            draft, r.draft = r.draft, []
            run = accepted_run(draft, lists[0][line : line + 1 + len(draft)])
            if draft:
                r.drafter.record(len(draft), len(run) - 1)
            generation = _append(r, run, line, lists, eos_ids)
            generations.append(generation)
            rows += [row] * len(generation.tokens.ids)
            appended += generation.tokens.ids
            line += 1 + len(draft)
        self.sampler.update(rows, appended)
        return generations


# (ids, logprobs, top ids, top logprobs) of a step's sampled lines, on the host.
HostLists = tuple[list[int], list[float], list[list[int]] | None, list[list[float]] | None]


def host_lists(out: SampleOutput) -> HostLists:
    """The sampled ids, their logprobs and the top tokens as Python lists. On CUDA through one
    packed copy (`packed_host_lists`): each copy to the host waits for the device, so one wait a
    step instead of up to four. On a CPU nothing waits, and packing would only add work."""
    if out.next_ids.is_cuda:
        return packed_host_lists(out)
    return (out.next_ids.tolist(), out.logprobs.tolist(),
            None if out.top_ids is None else out.top_ids.tolist(),
            None if out.top_logprobs is None else out.top_logprobs.tolist())


def packed_host_lists(out: SampleOutput) -> HostLists:
    """`host_lists` from a single device→host copy of every value as float64, which holds the
    int64 ids (< 2**53) and the float32 logprobs exactly."""
    columns = [out.next_ids.unsqueeze(1), out.logprobs.unsqueeze(1)]
    if out.top_ids is not None:
        columns += [out.top_ids, out.top_logprobs]
    lines = torch.cat([c.to(torch.float64) for c in columns], dim=1).tolist()
    ids, logprobs = [int(line[0]) for line in lines], [line[1] for line in lines]
    if out.top_ids is None:
        return ids, logprobs, None, None
    n = out.top_ids.shape[1]
    return ids, logprobs, [[int(t) for t in line[2 : 2 + n]] for line in lines], [line[2 + n :] for line in lines]


def _append(r: RequestState, run: list[int], first_line: int, lists: HostLists,
            eos_ids: frozenset[int]) -> pb.Generation:
    """Append `run` (chosen at lines first_line, first_line + 1, ...) to the request up to the
    token that finishes it, and the generation that reports them."""
    _, logprobs, top_ids, top_lps = lists
    generation = pb.Generation(request_id=r.id)
    if r.prefill_logprobs and not r.output_ids:
        generation.prefill_tokens.CopyFrom(pb.Tokens(ids=r.prompt_ids, logprobs=r.prompt_logprobs))
    for line, token in enumerate(run, first_line):
        r.output_ids.append(token)
        generation.tokens.ids.append(token)
        generation.tokens.logprobs.append(logprobs[line])
        if r.top_n_tokens and top_ids is not None:
            n = r.top_n_tokens
            generation.top_tokens.append(pb.Tokens(ids=top_ids[line][:n], logprobs=top_lps[line][:n]))
        reason = _finish_reason(r, token, eos_ids)
        if reason is not None:
            generation.finished.CopyFrom(pb.FinishInfo(
                generated_tokens=len(r.output_ids), finish_reason=reason, seed=r.seed))
            if r.seed is None:
                generation.finished.ClearField("seed")
            break
    # Every appended token but the last was a draft this step computed: its K/V are in the cache.
    r.num_computed += len(generation.tokens.ids) - 1
    return generation


def _finish_reason(r: RequestState, token: int, eos_ids: frozenset[int]) -> int | None:
    # The model's own stop wins over the length limit when both happen on the same token; so
    # does a completed grammar (the output is whole).
    grammar_done = False
    if r.grammar is not None:
        if not r.grammar.accept(token):
            # Cannot happen while the mask is applied; end the request rather than let it
            # continue outside its grammar.
            log.error("request %d: token %d violates its grammar; finishing it", r.id, token)
            return pb.FINISH_REASON_EOS_TOKEN
        grammar_done = r.grammar.complete()
    if token in eos_ids and not r.ignore_eos:
        return pb.FINISH_REASON_EOS_TOKEN
    if token in r.stop_token_ids:
        return pb.FINISH_REASON_STOP_SEQUENCE
    if grammar_done:
        return pb.FINISH_REASON_EOS_TOKEN
    if len(r.output_ids) >= r.max_new_tokens:
        return pb.FINISH_REASON_LENGTH
    return None


def _adapter_slot(r: pb.Request, adapter_ids: Sequence[str]) -> int | None:
    if not r.adapter_id:
        return None
    try:
        return adapter_ids.index(r.adapter_id)
    except ValueError:
        served = ", ".join(adapter_ids) if adapter_ids else "none (no --lora-adapters)"
        raise ValueError(f"request {r.id}: unknown adapter_id {r.adapter_id!r}; this shard serves {served}") from None


def _grammar_state(r: pb.Request, grammars: Grammars | None) -> GrammarState | None:
    p = r.parameters
    if p.grammar_type == pb.GRAMMAR_TYPE_NONE:
        if p.grammar:
            raise ValueError(f"request {r.id}: `grammar` is set but `grammar_type` is NONE")
        return None
    if grammars is None or not grammars.available:
        raise ValueError(f"request {r.id}: grammar-constrained decoding is not supported by this shard")
    try:
        return grammars.state(p.grammar_type, p.grammar)
    except ValueError as error:
        raise ValueError(f"request {r.id}: grammar is not valid: {error}") from error
