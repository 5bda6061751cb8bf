"""Drive an Engine with protobuf requests and compare against transformers' greedy generate."""

from __future__ import annotations

import torch

from pytgi_proto import generate_pb2 as pb

TIE_GAP = 1e-3  # DESIGN.md §3: a divergence is acceptable only where the reference's top-2 gap is below this


class BlockPool:
    """Hands out distinct block ids (≥ 1) like the router's allocator would."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.next = 1

    def take(self, num_tokens: int) -> list[int]:
        count = -(-num_tokens // self.block_size)
        blocks = list(range(self.next, self.next + count))
        self.next += count
        return blocks


def chat(tokenizer, question: str) -> list[int]:
    """Token ids of one user question in the model's chat template (transformers tokenizer)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def greedy_request(
    request_id: int, prompt: list[int], max_new_tokens: int, pool: BlockPool, *, ignore_eos: bool = True, **fields
) -> pb.Request:
    return pb.Request(
        id=request_id, input_ids=prompt, blocks=pool.take(len(prompt) + max_new_tokens),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=max_new_tokens, ignore_eos_token=ignore_eos),
        **fields,
    )


def collect(generations, outputs: dict[int, list[int]]) -> None:
    for g in generations:
        outputs.setdefault(g.request_id, []).extend(g.tokens.ids)


def run_to_completion(engine, response, outputs: dict[int, list[int]], updates_for=None) -> None:
    """Decode until every request of the batch finished."""
    while response.HasField("batch"):
        updates = updates_for(response.batch) if updates_for else []
        response = engine.decode(pb.DecodeRequest(batches=[response.batch], updates=updates))
        collect(response.generations, outputs)


def generate(engine, requests: list[pb.Request], batch_id: int = 0) -> dict[int, list[int]]:
    outputs: dict[int, list[int]] = {}
    response = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=batch_id, requests=requests, size=len(requests))))
    collect(response.generations, outputs)
    run_to_completion(engine, response, outputs)
    return outputs


class Reference:
    """transformers greedy decoding with per-step top-2 gaps, cached per prompt."""

    def __init__(self, model):
        self.model = model
        self.cache: dict[tuple[int, int], tuple[list[int], list[float]]] = {}

    def __call__(self, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
        key = (hash(tuple(prompt)), max_new_tokens)
        if key not in self.cache:
            tokens, gaps = self._greedy(prompt, max_new_tokens)
            self.cache[key] = (tokens, gaps)
        return self.cache[key]

    @torch.no_grad()
    def _greedy(self, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
        # transformers' own incremental decoding (KV cache), without any EOS handling: generate()
        # would stop at EOS, and min_new_tokens would mask the EOS logit instead.
        out = self.model(torch.tensor([prompt]), use_cache=True)
        tokens, gaps = [], []
        for _ in range(max_new_tokens):
            logits = out.logits[0, -1].float()
            top2 = logits.topk(2).values
            gaps.append(float(top2[0] - top2[1]))
            tokens.append(int(logits.argmax()))
            out = self.model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
        return tokens, gaps


def assert_greedy_equal(ours: list[int], reference: tuple[list[int], list[float]]) -> None:
    tokens, gaps = reference
    assert len(ours) == len(tokens), (ours, tokens)
    for step, (a, b) in enumerate(zip(ours, tokens)):
        if a != b:
            assert gaps[step] < TIE_GAP, f"diverged at step {step} (gap {gaps[step]:.2e}): {ours} != {tokens}"
            return  # after a legitimate near-tie the continuations differ


def generations(engine, requests: list[pb.Request], batch_id: int = 0,
                updates_for=None) -> dict[int, list[pb.Generation]]:
    """Every Generation of each request, prefill to completion (with speculation one may carry
    several tokens)."""
    out: dict[int, list[pb.Generation]] = {}
    batch = pb.Batch(id=batch_id, requests=requests, size=len(requests))
    response = engine.prefill(pb.PrefillRequest(batch=batch))
    while True:
        for g in response.generations:
            out.setdefault(g.request_id, []).append(g)
        if not response.HasField("batch"):
            return out
        updates = updates_for(response.batch) if updates_for else []
        response = engine.decode(pb.DecodeRequest(batches=[response.batch], updates=updates))


def token_ids(gens: list[pb.Generation]) -> list[int]:
    return [t for g in gens for t in g.tokens.ids]
