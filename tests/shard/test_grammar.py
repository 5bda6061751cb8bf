"""Grammar-constrained decoding through the engine, on the bundled SmolLM2 (real tokenizer)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from pytgi_common.grammar import GrammarError
from pytgi_proto import generate_pb2 as pb
from pytgi_proto import generate_pb2_grpc
from shard.grammar import GrammarMask, Grammars, step_mask
from shard.model_source import resolve_model
from tests.conftest import default_cache_dir, make_engine
from tests.shard.helpers import BlockPool, chat, collect, generate, greedy_request, run_to_completion

pytestmark = pytest.mark.slow
BLOCK = 16

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 130},
    "city": {"enum": ["Paris", "London", "Tokyo"]}}, "required": ["name", "age", "city"], "additionalProperties": False}
ORDER = {"type": "object", "properties": {
    "items": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3},
    "total": {"type": "number"}, "paid": {"type": "boolean"}},
    "required": ["items", "total", "paid"], "additionalProperties": False}
REFS = {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                            "required": ["x", "y"], "additionalProperties": False}},
        "type": "object", "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"], "additionalProperties": False}
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
DATE = r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"


@pytest.fixture(scope="module")
def smol():
    source = resolve_model(None, cache_dir=default_cache_dir(), offline=True)
    return source.path, AutoTokenizer.from_pretrained(source.path)


@pytest.fixture(scope="module")
def engine(smol):
    return make_engine(smol[0], block_size=BLOCK, num_blocks_tokens=16384)


def constrained(request_id, prompt, max_new, pool, grammar: str, kind: int, **params) -> pb.Request:
    return greedy_request(request_id, prompt, max_new, pool, ignore_eos=False,
                          parameters=pb.NextTokenChooserParameters(grammar=grammar, grammar_type=kind, **params))


def json_request(request_id, prompt, max_new, pool, schema, **params) -> pb.Request:
    return constrained(request_id, prompt, max_new, pool, json.dumps(schema), pb.GRAMMAR_TYPE_JSON, **params)


def finishes(engine, requests) -> tuple[dict[int, list[int]], dict[int, pb.FinishInfo]]:
    outputs, finish = {}, {}
    response = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=0, requests=requests, size=len(requests))))
    while True:
        collect(response.generations, outputs)
        finish.update({g.request_id: g.finished for g in response.generations if g.HasField("finished")})
        if not response.HasField("batch"):
            return outputs, finish
        response = engine.decode(pb.DecodeRequest(batches=[response.batch]))


def test_json_schema_output_validates(engine, smol):
    _, tokenizer = smol
    pool = BlockPool(BLOCK)
    outputs, finish = finishes(engine, [json_request(1, chat(tokenizer, "Describe a person as JSON."), 80, pool, PERSON)])
    value = json.loads(tokenizer.decode(outputs[1]))
    jsonschema.validate(value, PERSON)
    # Finished because the grammar is complete: no EOS token, well before max_new_tokens.
    assert finish[1].finish_reason == pb.FINISH_REASON_EOS_TOKEN
    assert finish[1].generated_tokens == len(outputs[1]) < 80
    assert 2 not in outputs[1]


def test_regex_output_fullmatches(engine, smol):
    _, tokenizer = smol
    pool = BlockPool(BLOCK)
    outputs, finish = finishes(engine, [constrained(1, chat(tokenizer, "What is the phone number of the shop?"), 30,
                                                    pool, PHONE, pb.GRAMMAR_TYPE_REGEX)])
    assert re.fullmatch(PHONE, tokenizer.decode(outputs[1]))
    assert finish[1].finish_reason == pb.FINISH_REASON_EOS_TOKEN


def test_sampled_output_is_constrained_too(engine, smol):
    _, tokenizer = smol
    pool = BlockPool(BLOCK)
    prompt = chat(tokenizer, "Describe an order as JSON.")
    requests = [json_request(i, prompt, 120, pool, ORDER, do_sample=True, temperature=1.3, top_p=0.95, seed=i,
                             has_seed=True) for i in range(3)]
    outputs, finish = finishes(engine, requests)
    for i in range(3):
        jsonschema.validate(json.loads(tokenizer.decode(outputs[i])), ORDER)
        assert finish[i].finish_reason == pb.FINISH_REASON_EOS_TOKEN


def test_batch_of_four_different_grammars(engine, smol):
    _, tokenizer = smol
    pool = BlockPool(BLOCK)
    requests = [
        json_request(0, chat(tokenizer, "A person, as JSON."), 80, pool, PERSON),
        json_request(1, chat(tokenizer, "An order, as JSON."), 100, pool, ORDER),
        constrained(2, chat(tokenizer, "When did the war end?"), 20, pool, DATE, pb.GRAMMAR_TYPE_REGEX),
        json_request(3, chat(tokenizer, "Two points, as JSON."), 80, pool, REFS, repetition_penalty=1.3),
    ]
    outputs, finish = finishes(engine, requests)
    jsonschema.validate(json.loads(tokenizer.decode(outputs[0])), PERSON)
    jsonschema.validate(json.loads(tokenizer.decode(outputs[1])), ORDER)
    assert re.fullmatch(DATE, tokenizer.decode(outputs[2]))
    jsonschema.validate(json.loads(tokenizer.decode(outputs[3])), REFS)
    assert all(f.finish_reason == pb.FINISH_REASON_EOS_TOKEN for f in finish.values())


def test_grammar_state_survives_filter_and_concatenate(engine, smol):
    _, tokenizer = smol
    pool = BlockPool(BLOCK)
    free = [chat(tokenizer, q) for q in ("Who wrote Hamlet?", "Name a color.", "What is 2+2?")]
    # Unconstrained references, each alone.
    alone = {i: generate(engine, [greedy_request(100 + i, p, 12, BlockPool(BLOCK))], batch_id=50 + i)[100 + i]
             for i, p in enumerate(free)}
    outputs: dict[int, list[int]] = {}
    first = [json_request(1, chat(tokenizer, "A person, as JSON."), 80, pool, PERSON),
             greedy_request(2, free[0], 12, pool), greedy_request(3, free[1], 12, pool)]
    r = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=first, size=3)))
    collect(r.generations, outputs)
    r = engine.decode(pb.DecodeRequest(batches=[r.batch]))
    collect(r.generations, outputs)
    kept = engine.filter_batch(1, [1, 3])  # request 2 leaves (e.g. cancelled)
    second = [greedy_request(4, free[2], 12, pool),
              constrained(5, chat(tokenizer, "Phone number?"), 30, pool, PHONE, pb.GRAMMAR_TYPE_REGEX)]
    # A mixed step: the new requests' prefill together with the cached batch's decode.
    r = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=2, requests=second, size=2), cached_batch=kept))
    collect(r.generations, outputs)
    run_to_completion(engine, r, outputs)
    jsonschema.validate(json.loads(tokenizer.decode(outputs[1])), PERSON)
    assert re.fullmatch(PHONE, tokenizer.decode(outputs[5]))
    # Unconstrained batch-mates are untouched by their neighbours' masks.
    assert outputs[3] == alone[1] and outputs[4] == alone[2]
    assert outputs[2] == alone[0][:2]


def test_ignore_eos_still_ends_at_grammar_end(engine, smol):
    _, tokenizer = smol
    pool = BlockPool(BLOCK)
    request = greedy_request(1, chat(tokenizer, "Phone?"), 30, pool, ignore_eos=True, parameters=pb.NextTokenChooserParameters(
        grammar=PHONE, grammar_type=pb.GRAMMAR_TYPE_REGEX))
    outputs, finish = finishes(engine, [request])
    assert re.fullmatch(PHONE, tokenizer.decode(outputs[1])) and finish[1].finish_reason == pb.FINISH_REASON_EOS_TOKEN


def test_open_ended_grammar_allows_eos_only_where_it_may_end(engine, smol):
    _, tokenizer = smol
    pool = BlockPool(BLOCK)
    pattern = r"[A-Za-z ]{3,40}\."
    outputs, finish = finishes(engine, [constrained(1, chat(tokenizer, "Say hi."), 60, pool, pattern,
                                                    pb.GRAMMAR_TYPE_REGEX)])
    text = tokenizer.decode(outputs[1], skip_special_tokens=True)
    assert re.fullmatch(pattern, text), text
    assert finish[1].finish_reason == pb.FINISH_REASON_EOS_TOKEN


def test_length_limit_inside_the_grammar(engine, smol):
    _, tokenizer = smol
    outputs, finish = finishes(engine, [json_request(1, chat(tokenizer, "A person."), 4, BlockPool(BLOCK), PERSON)])
    assert finish[1].finish_reason == pb.FINISH_REASON_LENGTH and len(outputs[1]) == 4
    assert '{"name": "'.startswith(tokenizer.decode(outputs[1]))  # a prefix of the only way to start


def test_chunked_prefill_with_grammar(engine, smol):
    """A prompt prefilled 8 tokens at a time writes what the whole prompt at once writes."""
    _, tokenizer = smol
    prompt = chat(tokenizer, "A person, described as a JSON object with a name, an age and a city.")
    pool = BlockPool(BLOCK)
    chunked = json_request(1, prompt, 80, pool, PERSON)
    chunked.chunk_len = 8
    outputs = generate(engine, [chunked])
    whole = generate(engine, [json_request(2, prompt, 80, pool, PERSON)])
    assert outputs[1] == whole[2]
    jsonschema.validate(json.loads(tokenizer.decode(outputs[1])), PERSON)


@pytest.mark.parametrize("kind, text, message", [
    (pb.GRAMMAR_TYPE_JSON, json.dumps({"type": "foo"}), "Unsupported type"),
    (pb.GRAMMAR_TYPE_JSON, "{not json", "not valid JSON"),
    (pb.GRAMMAR_TYPE_JSON, json.dumps({"$ref": "#/$defs/missing"}), "missing"),
    (pb.GRAMMAR_TYPE_REGEX, "(ab", "parenthesis"),
    (pb.GRAMMAR_TYPE_STRUCTURAL_TAG, json.dumps({"type": "structural_tag", "format": {"type": "nope"}}), ""),
    (7, "x", "unknown grammar type"),
])
def test_invalid_grammar_is_a_value_error(engine, smol, kind, text, message):
    _, tokenizer = smol
    request = constrained(1, chat(tokenizer, "hi"), 5, BlockPool(BLOCK), text, kind)
    with pytest.raises(ValueError, match="grammar is not valid") as info:
        engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=9, requests=[request], size=1)))
    assert message in str(info.value)
    assert 9 not in engine.batches


def test_compiled_grammars_are_cached(smol):
    grammars = Grammars(smol[0], 49152, [2], capacity=2)
    first = grammars.compile(pb.GRAMMAR_TYPE_REGEX, "a+")
    assert grammars.compile(pb.GRAMMAR_TYPE_REGEX, "a+") is first and grammars.hits == 1
    grammars.compile(pb.GRAMMAR_TYPE_REGEX, "b+")
    grammars.compile(pb.GRAMMAR_TYPE_REGEX, "c+")  # evicts "a+" (LRU of 2)
    assert grammars.compile(pb.GRAMMAR_TYPE_REGEX, "a+") is not first and grammars.misses == 4


def test_padded_vocab_ids_are_never_allowed(smol):
    padded = 49152 + 64  # a model whose lm_head is wider than its tokenizer
    grammars = Grammars(smol[0], padded, [2])
    state = grammars.state(pb.GRAMMAR_TYPE_JSON, json.dumps({"type": "object"}))
    mask = step_mask([(0, state)])
    scores = torch.zeros(1, padded)
    mask.apply_(scores)
    allowed = torch.isfinite(scores[0]).nonzero().flatten()
    assert len(allowed) > 0 and int(allowed.max()) < 49152
    # Logits wider than the mask: the extra columns are masked too.
    wide = torch.zeros(2, padded + 40)
    GrammarMask([1], mask.bits).apply_(wide)
    assert torch.isinf(wide[1, padded:]).all() and torch.isfinite(wide[0]).all()


def test_unconstrained_batches_skip_grammar_work(engine, smol):
    _, tokenizer = smol
    from shard.batch import Batch

    batch = Batch.from_pb(pb.Batch(id=3, requests=[greedy_request(1, chat(tokenizer, "hi"), 4, BlockPool(BLOCK))]),
                          49152, torch.device("cpu"), engine.grammars)
    assert not batch.has_grammar and batch.grammar_mask([0]) is None


# --------------------------------------------------- compiles off the engine thread, pinned


class Context:
    """The part of grpc.aio's ServicerContext the servicer uses: abort."""

    def __init__(self):
        self.code = None

    async def abort(self, code, details):
        self.code = code
        raise RuntimeError(details)


def sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


@pytest.fixture
def gated_compiles(monkeypatch):
    """Compiles of grammars in `gated.slow` block until `gated.gate` is set; every compile's
    thread name is recorded."""
    import shard.grammar as grammar_module

    real = grammar_module.compile_grammar
    gated = SimpleNamespace(slow=set(), gate=threading.Event(), entered=threading.Event(), threads=[])

    def compile_grammar(compiler, grammar_type, text):
        gated.threads.append((text, threading.current_thread().name))
        if text in gated.slow:
            gated.entered.set()
            gated.gate.wait(60)
        return real(compiler, grammar_type, text)

    monkeypatch.setattr(grammar_module, "compile_grammar", compile_grammar)
    yield gated
    gated.gate.set()


def test_pinned_grammars_are_never_evicted(smol):
    grammars = Grammars(smol[0], 49152, [2], capacity=1)
    asyncio.run(grammars.prepare(pb.GRAMMAR_TYPE_REGEX, "p+", None))
    for text in ("q+", "r+", "s+"):
        grammars.compile(pb.GRAMMAR_TYPE_REGEX, text)
    hits = grammars.hits
    grammars.compile(pb.GRAMMAR_TYPE_REGEX, "p+")
    assert grammars.hits == hits + 1  # pinned: kept past the capacity of unpinned grammars
    grammars.release(pb.GRAMMAR_TYPE_REGEX, sha256("p+"))
    grammars.compile(pb.GRAMMAR_TYPE_REGEX, "t+")  # now it is the oldest unpinned one
    misses = grammars.misses
    grammars.compile(pb.GRAMMAR_TYPE_REGEX, "p+")
    assert grammars.misses == misses + 1
    grammars.close()


def test_compile_grammar_runs_off_the_engine_thread_then_prefill_hits(engine, smol, gated_compiles):
    from shard.server import TextGenerationService

    _, tokenizer = smol
    email = r"[a-z]{1,12}@example\.com"
    gated_compiles.slow.add(email)
    executor = ThreadPoolExecutor(1, thread_name_prefix="engine")
    service, ctx = TextGenerationService(engine, [], executor), Context()
    pool = BlockPool(BLOCK)

    async def run_batch(batch_id: int, requests: list[pb.Request]) -> dict[int, list[int]]:
        outputs: dict[int, list[int]] = {}
        response = await service.Prefill(pb.PrefillRequest(batch=pb.Batch(id=batch_id, requests=requests)), ctx)
        collect(response.generations, outputs)
        while response.HasField("batch"):
            response = await service.Decode(pb.DecodeRequest(batches=[response.batch]), ctx)
            collect(response.generations, outputs)
        return outputs

    async def scenario():
        request = pb.CompileGrammarRequest(grammar_type=pb.GRAMMAR_TYPE_REGEX, grammar=email, timeout_ms=60_000)
        compiling = asyncio.ensure_future(service.CompileGrammar(request, ctx))
        await asyncio.get_running_loop().run_in_executor(None, gated_compiles.entered.wait, 60)
        # While the grammar compiles, the engine serves Health and a whole generation.
        await service.Health(pb.HealthRequest(), ctx)
        outputs = await run_batch(70, [greedy_request(1, chat(tokenizer, "Name a color."), 3, pool)])
        assert len(outputs[1]) == 3 and not compiling.done()
        gated_compiles.gate.set()
        await compiling
        assert engine.grammars.pins(pb.GRAMMAR_TYPE_REGEX, email) == 1
        inline = engine.grammars.inline_compiles
        outputs = await run_batch(71, [constrained(2, chat(tokenizer, "Your email?"), 20, pool, email,
                                                   pb.GRAMMAR_TYPE_REGEX)])
        assert re.fullmatch(email, tokenizer.decode(outputs[2]))
        # Compiled once, on the grammar thread; the Prefill found it in the cache.
        assert [name for text, name in gated_compiles.threads if text == email] == ["grammar_0"]
        assert engine.grammars.inline_compiles == inline
        await service.ReleaseGrammar(pb.ReleaseGrammarRequest(grammar_type=pb.GRAMMAR_TYPE_REGEX,
                                                              grammar_sha256=sha256(email)), ctx)
        assert engine.grammars.pins(pb.GRAMMAR_TYPE_REGEX, email) == 0

    try:
        asyncio.run(scenario())
    finally:
        executor.shutdown()


def test_a_shard_compile_past_its_deadline_is_refused_for_good(engine, gated_compiles):
    from shard.server import TextGenerationService

    late = r"late[0-9]{2}"
    gated_compiles.slow.add(late)
    service, ctx = TextGenerationService(engine, [], ThreadPoolExecutor(1)), Context()

    async def scenario():
        request = pb.CompileGrammarRequest(grammar_type=pb.GRAMMAR_TYPE_REGEX, grammar=late, timeout_ms=200)
        with pytest.raises(RuntimeError, match="took longer than 0.2 s"):
            await service.CompileGrammar(request, ctx)
        assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT  # refused, like a grammar that does not compile

    asyncio.run(scenario())
    assert engine.grammars.pins(pb.GRAMMAR_TYPE_REGEX, late) == 0
    # A Prefill with it fails at once (no compile on the engine thread), even once the overrun ends.
    with pytest.raises(GrammarError, match="took longer than 0.2 s"):
        engine.grammars.compile(pb.GRAMMAR_TYPE_REGEX, late)

    async def busy():  # the overrun still holds the grammar thread: another grammar cannot start
        request = pb.CompileGrammarRequest(grammar_type=pb.GRAMMAR_TYPE_REGEX, grammar="after", timeout_ms=200)
        with pytest.raises(RuntimeError, match="busy with an earlier compile"):
            await service.CompileGrammar(request, ctx)
        assert ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED  # not the grammar's fault: not remembered

    asyncio.run(busy())
    gated_compiles.gate.set()
    asyncio.run(engine.grammars.prepare(pb.GRAMMAR_TYPE_REGEX, "after", None))  # the thread is free again
    engine.grammars.release(pb.GRAMMAR_TYPE_REGEX, sha256("after"))
    with pytest.raises(GrammarError, match="took longer than 0.2 s"):
        engine.grammars.compile(pb.GRAMMAR_TYPE_REGEX, late)
    assert [text for text, _ in gated_compiles.threads].count(late) == 1
    service.executor.shutdown()


def test_router_prepares_grammars_on_the_shards_over_grpc(engine, smol, gated_compiles, tmp_path):
    from router.scheduler.client import ShardClient, ShardedClient
    from router.grammar.validator import GrammarValidator
    from router.tokenizer import Tokenizer
    from shard.server import TextGenerationService

    phone, late = r"\+33 [0-9]{9}", r"\+44 [0-9]{10}"
    gated_compiles.slow.add(late)
    tokenizer = Tokenizer.from_folder(smol[0])
    executor = ThreadPoolExecutor(1, thread_name_prefix="engine")
    socket = tmp_path / "shard.sock"

    async def scenario():
        server = grpc.aio.server()
        generate_pb2_grpc.add_TextGenerationServiceServicer_to_server(
            TextGenerationService(engine, [], executor), server)
        server.add_insecure_port(f"unix://{socket}")
        await server.start()
        client = ShardedClient([ShardClient(str(socket))])
        validator = GrammarValidator(tokenizer, shards=client, timeout_s=2.0)
        try:
            async def request(grammar: str) -> int:  # a request handler: check, then run
                await validator.check(pb.GRAMMAR_TYPE_REGEX, grammar, "grammar")
                return engine.grammars.pins(pb.GRAMMAR_TYPE_REGEX, grammar)

            assert await asyncio.create_task(request(phone)) == 1  # pinned while the request runs
            for _ in range(500):  # released once its handler ended
                if engine.grammars.pins(pb.GRAMMAR_TYPE_REGEX, phone) == 0:
                    break
                await asyncio.sleep(0.01)
            assert engine.grammars.pins(pb.GRAMMAR_TYPE_REGEX, phone) == 0
            # A grammar the router compiles in time but the shard does not: rejected, for good.
            for _ in range(2):
                with pytest.raises(GrammarError, match="took longer than 2 s"):
                    await asyncio.create_task(request(late))
        finally:
            validator.close()
            await client.close()
            await server.stop(None)

    try:
        asyncio.run(scenario())
    finally:
        gated_compiles.gate.set()
        executor.shutdown()
    assert [text for text, _ in gated_compiles.threads].count(late) == 1
    tokenizer.close()
