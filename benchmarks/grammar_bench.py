"""Structured-output micro-benchmark: grammar compile time, and the per-token cost of masking.

    python -m benchmarks.grammar_bench [--model MODEL_ID] [--steps 32] [--reps 3]

One shard engine in-process (default: the bundled SmolLM2-135M-Instruct, fp32 on CPU):
1. compile times of a few grammars on the shard (`Grammars.compile`): cold (first compile of
   that grammar) and cached (LRU hit), plus the router's compile check (`GrammarValidator`)
   cold and cached, and the one-off tokenizer-info load;
2. decode step latency at batch 1 and 32 with every row constrained by a JSON schema against
   the same batch unconstrained, on the same engine: both batches live in the engine at once and
   decode in lockstep (alternating which goes first), so each pair of steps sees the same machine
   conditions; overhead = median of the paired differences. The constrained step's grammar work
   is broken down: filling the bitmasks, applying them to the logits, advancing the matchers
   (accept + completion check).
The constrained rows generate a JSON array of at least 50 objects, so every row stays
constrained for all `--steps` steps (each request ends by length, never early).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from pytgi_proto import generate_pb2 as pb

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9]+\\.(com|org|net)$"},
    "role": {"enum": ["admin", "editor", "viewer"]}, "tags": {"type": "array", "items": {"type": "string"},
                                                               "maxItems": 4}},
    "required": ["name", "age", "email", "role", "tags"], "additionalProperties": False}
SIMPLE = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
NESTED = {"$defs": {"person": PERSON}, "type": "object", "properties": {
    "team": {"type": "string"}, "members": {"type": "array", "items": {"$ref": "#/$defs/person"}, "minItems": 1},
    "lead": {"anyOf": [{"$ref": "#/$defs/person"}, {"type": "null"}]}},
    "required": ["team", "members", "lead"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}, "limit": {"type": "integer", "minimum": 1, "maximum": 50}},
        "required": ["query"]}}},
    {"type": "function", "function": {"name": "send_email", "parameters": {"type": "object", "properties": {
        "to": {"type": "array", "items": {"type": "string"}}, "subject": {"type": "string"},
        "body": {"type": "string"}}, "required": ["to", "subject", "body"]}}},
]
STEP_SCHEMA = {"type": "array", "items": PERSON, "minItems": 50}
PROMPT = "List the people of the team as a JSON array of objects."


def _grammars() -> list[tuple[str, int, str]]:
    from router.limits import Limits
    from router.openai.requests import parse_chat_request

    def constraint(**fields):
        body = {"messages": [{"role": "user", "content": PROMPT}], **fields}
        return parse_chat_request(body, Limits(max_input_tokens=4096, max_total_tokens=8192)).constraint

    required = constraint(tools=TOOLS, tool_choice="required")
    auto = constraint(tools=TOOLS, tool_choice="auto")
    anyof = {"anyOf": [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                         "arguments": t["function"]["parameters"]},
                        "required": ["name", "arguments"], "additionalProperties": False} for t in TOOLS]}
    return [
        ("json: simple object", pb.GRAMMAR_TYPE_JSON, json.dumps(SIMPLE)),
        ("json: nested, $ref/anyOf/enum/pattern", pb.GRAMMAR_TYPE_JSON, json.dumps(NESTED)),
        ("json: 3-tool anyOf union", pb.GRAMMAR_TYPE_JSON, json.dumps(anyof)),
        ("tag: tools required (3)", required.grammar_type, required.grammar),
        ("tag: tools auto (3)", auto.grammar_type, auto.grammar),
        ("regex: email", pb.GRAMMAR_TYPE_REGEX, r"[a-z0-9.]{1,20}@[a-z0-9]{1,20}\.(com|org|net)"),
    ]


def load_engine(model_id: str | None, max_tokens: int):
    from dataclasses import replace

    from shard.config import build_config
    from shard.dtype import choose_dtype
    from shard.distributed import TPGroup
    from shard.engine import Engine
    from shard.model_source import resolve_model
    from shard.models import get_model
    from shard.models.base import ModelContext

    config = build_config(model_id, revision=None, uds_path="", sharded=False, dtype=None, trust_remote_code=False,
                          json_output=False, log_level="WARNING")
    torch.set_num_threads(config.num_threads)
    source = resolve_model(config.model_id, revision=None, cache_dir=config.cache_dir,
                           hub_cache_dir=config.hub_cache_dir, offline=True, trust_remote_code=False)
    config = replace(config, dtype=choose_dtype(config.dtype, config.device, source.path).dtype)  # as cli._load
    tp = TPGroup()
    model = get_model(source.path, ModelContext(tp, config.device, config.dtype, config.block_size, False))
    engine = Engine(config, model, tp, source.path)
    engine.warmup(pb.WarmupRequest(max_batch_total_tokens=max_tokens, max_prefill_tokens=512))
    return engine, source.path


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def bench_compile(engine, model_path) -> list[str]:
    from router.grammar.validator import GrammarValidator
    from router.tokenizer import Tokenizer
    from shard.grammar import Grammars

    grammars = Grammars(model_path, engine.info.vocab_size, engine.eos_ids)
    start = time.perf_counter()
    grammars.compiler()
    load = time.perf_counter() - start
    validator = GrammarValidator(Tokenizer.from_folder(model_path), timeout_s=60)
    start = time.perf_counter()
    asyncio.run(validator.check(pb.GRAMMAR_TYPE_REGEX, "warm"))
    router_load = time.perf_counter() - start
    rows = [f"one-off tokenizer info + compiler: shard {_ms(load)} ms, router {_ms(router_load)} ms", "",
            "| grammar | chars | shard cold ms | shard cached µs | router check cold ms | router check cached µs |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, kind, text in _grammars():
        start = time.perf_counter()
        grammars.compile(kind, text)
        cold = time.perf_counter() - start
        cached = []
        for _ in range(200):
            start = time.perf_counter()
            grammars.compile(kind, text)
            cached.append(time.perf_counter() - start)

        async def router_times():
            start = time.perf_counter()
            await validator.check(kind, text)
            first = time.perf_counter() - start
            hits = []
            for _ in range(200):
                start = time.perf_counter()
                await validator.check(kind, text)
                hits.append(time.perf_counter() - start)
            return first, statistics.median(hits)

        router_cold, router_cached = asyncio.run(router_times())
        rows.append(f"| {name} | {len(text)} | {_ms(cold)} | {statistics.median(cached) * 1e6:.1f} | "
                    f"{_ms(router_cold)} | {router_cached * 1e6:.1f} |")
    validator.close()
    return rows


class Timers:
    """Accumulated seconds of the grammar work inside decode steps."""

    def __init__(self):
        self.total = defaultdict(float)
        self.enabled = False

    @contextmanager
    def patched(self):
        import shard.batch as batch_module
        import shard.grammar as grammar_module

        originals = []

        def wrap(owner, name, label):
            original = getattr(owner, name)
            originals.append((owner, name, original))
            timers = self

            def timed(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    if timers.enabled:
                        timers.total[label] += time.perf_counter() - start

            setattr(owner, name, timed)

        wrap(batch_module.Batch, "grammar_mask", "fill bitmasks")
        wrap(grammar_module.GrammarMask, "apply_", "apply to logits")
        wrap(grammar_module.GrammarState, "accept", "advance matchers")
        wrap(grammar_module.GrammarState, "complete", "advance matchers")
        try:
            yield self
        finally:
            for owner, name, original in originals:
                setattr(owner, name, original)


def _batch(engine, prompt: list[int], batch_size: int, steps: int, grammar: str | None, first_block: int):
    blocks_per = -(-(len(prompt) + steps) // engine.block_size)
    requests = []
    for i in range(batch_size):
        params = pb.NextTokenChooserParameters()
        if grammar is not None:
            params = pb.NextTokenChooserParameters(grammar=grammar, grammar_type=pb.GRAMMAR_TYPE_JSON)
        start = first_block + i * blocks_per
        requests.append(pb.Request(
            id=i, input_ids=prompt, parameters=params, blocks=list(range(start, start + blocks_per)),
            stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=steps, ignore_eos_token=True)))
    return requests, first_block + batch_size * blocks_per


def paired_steps(engine, prompt: list[int], batch_size: int, steps: int, grammar: str, timers: Timers,
                 batch_id: int) -> tuple[list[float], list[float]]:
    """Decode an unconstrained and a constrained batch (same prompts, same sizes) in lockstep,
    alternating which goes first each step, so both see the same machine conditions. Returns the
    per-step latencies (s) of steps 2..steps of each."""
    free_requests, next_block = _batch(engine, prompt, batch_size, steps, None, 1)
    constrained_requests, _ = _batch(engine, prompt, batch_size, steps, grammar, next_block)
    ids = {"free": batch_id, "constrained": batch_id + 1}
    responses = {
        "free": engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=ids["free"], requests=free_requests,
                                                                size=batch_size))),
        "constrained": engine.prefill(pb.PrefillRequest(batch=pb.Batch(
            id=ids["constrained"], requests=constrained_requests, size=batch_size))),
    }
    times = {"free": [], "constrained": []}
    step = 0
    while any(r.HasField("batch") for r in responses.values()):
        order = ("free", "constrained") if step % 2 == 0 else ("constrained", "free")
        for kind in order:
            if not responses[kind].HasField("batch"):
                continue
            timers.enabled = kind == "constrained"
            start = time.perf_counter()
            responses[kind] = engine.decode(pb.DecodeRequest(batches=[responses[kind].batch]))
            times[kind].append(time.perf_counter() - start)
            timers.enabled = False
            assert all(not g.HasField("finished") or g.finished.finish_reason == pb.FINISH_REASON_LENGTH
                       for g in responses[kind].generations), "a row ended early: the comparison would be unfair"
        step += 1
    for batch in ids.values():
        engine.clear_cache(batch)
    return times["free"], times["constrained"]


def bench_masking(engine, model_path, batch_sizes, steps: int, reps: int) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True)
    prompt = tokenizer(text, add_special_tokens=False).input_ids
    grammar = json.dumps(STEP_SCHEMA)
    engine.grammars.compile(pb.GRAMMAR_TYPE_JSON, grammar)  # compile time is measured above
    rows = ["| batch | unconstrained step ms | constrained step ms | overhead ms (paired median) | overhead % | "
            "of which: fill bitmasks | apply to logits | advance matchers | grammar work per row µs |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    timers = Timers()
    with timers.patched():
        for batch_size in batch_sizes:
            paired_steps(engine, prompt, batch_size, 4, grammar, timers, 900)  # warm both paths
            free, constrained, deltas = [], [], []
            timers.total.clear()
            for rep in range(reps):
                f, c = paired_steps(engine, prompt, batch_size, steps, grammar, timers, 1000 + 2 * rep)
                free += f
                constrained += c
                deltas += [b - a for a, b in zip(f, c)]
            parts = {label: seconds / len(constrained) for label, seconds in timers.total.items()}
            work = sum(parts.values())
            base, delta = statistics.median(free), statistics.median(deltas)
            rows.append(
                f"| {batch_size} | {_ms(base)} | {_ms(statistics.median(constrained))} | {_ms(delta)} | "
                f"{100 * delta / base:.1f} | {_ms(parts.get('fill bitmasks', 0))} | "
                f"{_ms(parts.get('apply to logits', 0))} | {_ms(parts.get('advance matchers', 0))} | "
                f"{work / batch_size * 1e6:.0f} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model id or folder (default: the bundled SmolLM2)")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--steps", type=int, default=32, help="decode steps per measured batch")
    parser.add_argument("--reps", type=int, default=3, help="paired runs per batch size")
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    engine, model_path = load_engine(args.model, max_tokens=2 * max(batch_sizes) * (256 + args.steps) + 1024)
    print(f"model {model_path}; {engine.config.device}, {engine.config.dtype}, "
          f"{torch.get_num_threads()} threads\n")
    print("\n".join(bench_compile(engine, model_path)))
    print()
    print("\n".join(bench_masking(engine, model_path, batch_sizes, args.steps, args.reps)))


if __name__ == "__main__":
    main()
