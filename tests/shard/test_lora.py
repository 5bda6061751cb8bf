"""LoRA adapters (`--lora-adapters`): the engine with real PEFT adapters equals transformers +
PEFT over the same fp32 weights, in mixed batches, chunked prefill, prefix hits, speculation and
tensor parallelism; what PEFT would compute differently is refused with one line."""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from click.testing import CliRunner
from safetensors.torch import save_file

from benchmarks.lora_adapters import ALL_TARGETS, bundled_model_folder, make_adapter
from pytgi_proto import generate_pb2 as pb
from shard.batch import Batch
from shard.cli import main as shard_cli
from shard.config import build_config
from shard.cuda_graphs import plan_decode
from shard.distributed import TPGroup
from shard.engine import Engine
from shard.layers.lora import DenseRows, GroupedRows, LoraStep, PaddedRows, column_lora, row_lora
from shard.lora import LoraAdapterError, LoraModule, read_adapter
from shard.model_source import ModelSourceError, resolve_adapter
from shard.models import UnsupportedModelError, get_model
from shard.models.base import ModelContext
from tests.conftest import make_config, save_tiny
from tests.shard.helpers import (
    BlockPool, Reference, assert_greedy_equal, chat, collect, generate, generations, greedy_request,
    run_to_completion, token_ids,
)

CPU = torch.device("cpu")
BLOCK = 16
NEW = 20
QUESTIONS = ["What is deep learning?", "Write a haiku about the sea.", "Who wrote Hamlet?",
             "List three prime numbers.", "Name a color."]
PARAGRAPH = ("The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, "
             "polished the great lens, and wrote the weather in a leather book.")


def engine_with(folder: Path, adapters: dict[str, Path], block: int, tp: TPGroup = TPGroup(),
                **config_fields) -> Engine:
    config = dataclasses.replace(make_config(str(folder), block), **config_fields)
    loaded = tuple(read_adapter(name, path) for name, path in adapters.items())
    model = get_model(folder, ModelContext(tp, CPU, torch.float32, block, lora_adapters=loaded))
    engine = Engine(config, model, tp, folder)
    engine.warmup(pb.WarmupRequest(max_batch_total_tokens=8192, max_prefill_tokens=64))
    return engine


class WithAdapter:
    """A PEFT model with one adapter active (None: the base model), callable like the model."""

    def __init__(self, peft_model, name: str | None):
        self.peft_model, self.name = peft_model, name

    def __call__(self, *args, **kwargs):
        if self.name is None:
            with self.peft_model.disable_adapter():
                return self.peft_model(*args, **kwargs)
        self.peft_model.set_adapter(self.name)
        return self.peft_model(*args, **kwargs)


@dataclasses.dataclass
class Smol:
    folder: Path
    tokenizer: object
    engine: Engine
    reference: dict[str, Reference]  # adapter id ("" for none) -> transformers + PEFT greedy
    base: WithAdapter  # transformers, no adapter: the judge of whether an output is still text

    def prompt(self, question: str) -> list[int]:
        return chat(self.tokenizer, question)


@pytest.fixture(scope="module")
def smol(tmp_path_factory) -> Smol:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = bundled_model_folder()
    tmp = tmp_path_factory.mktemp("smol-lora")
    paths = {
        "a": make_adapter(folder, tmp / "a", r=8, targets=("q_proj", "v_proj", "o_proj", "down_proj"), seed=1),
        "b": make_adapter(folder, tmp / "b", r=4, targets=("k_proj", "gate_proj", "up_proj"), seed=2, alpha=8,
                          rslora=True),
    }
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(base, paths["a"], adapter_name="a").eval()
    peft_model.load_adapter(paths["b"], adapter_name="b")
    reference = {name: Reference(WithAdapter(peft_model, name or None)) for name in ("", "a", "b")}
    return Smol(folder, AutoTokenizer.from_pretrained(folder), engine_with(folder, paths, BLOCK), reference,
                WithAdapter(peft_model, None))


@pytest.fixture
def engine(smol, monkeypatch) -> Engine:
    monkeypatch.setattr(smol.engine, "config", smol.engine.config)  # restored after the test
    return smol.engine


def adapted(request: pb.Request, adapter: str) -> pb.Request:
    request.adapter_id = adapter
    return request


# ------------------------------------------------------------------------------- against PEFT


@pytest.mark.slow
def test_one_batch_mixing_two_adapters_and_none_equals_peft(smol, engine):
    rows = [(0, "a"), (1, "b"), (2, ""), (0, "b"), (1, "")]
    pool = BlockPool(BLOCK)
    prompts = [smol.prompt(QUESTIONS[q]) for q, _ in rows]
    out = generate(engine, [adapted(greedy_request(i, p, NEW, pool), a) for i, (p, (_, a)) in
                            enumerate(zip(prompts, rows))])
    for i, (prompt, (_, adapter)) in enumerate(zip(prompts, rows)):
        assert_greedy_equal(out[i], smol.reference[adapter](prompt, NEW))


@pytest.mark.slow
@pytest.mark.parametrize("question", QUESTIONS[:3])
def test_adapters_change_the_output_and_keep_it_text(smol, question):
    prompt = smol.prompt(question)
    outputs = {name: ref(prompt, NEW)[0] for name, ref in smol.reference.items()}
    assert outputs["a"] != outputs[""] and outputs["b"] != outputs[""] and outputs["a"] != outputs["b"]
    for name in ("a", "b"):
        # Still text: the base model finds it likely (mean NLL 0.3-1.6 nats/token, its own answers
        # 0.4-1.2), where adapters three times as strong give gibberish at 3-6.6.
        with torch.no_grad():
            logits = smol.base(torch.tensor([prompt + outputs[name]])).logits[0, len(prompt) - 1 : -1]
        nll = -logits.log_softmax(-1).gather(1, torch.tensor(outputs[name])[:, None]).mean().item()
        assert nll < 2.5, (nll, smol.tokenizer.decode(outputs[name]))


@pytest.mark.slow
def test_chunked_prefill_beside_adapter_decode_rows(smol, engine):
    pool = BlockPool(BLOCK)
    first, second = smol.prompt(QUESTIONS[1]), smol.prompt(QUESTIONS[3])
    requests = [adapted(greedy_request(1, first, NEW, pool, chunk_len=7), "a"),
                adapted(greedy_request(2, second, NEW, pool), "b")]
    outputs: dict[int, list[int]] = {}
    response = engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=0, requests=requests, size=2)))
    collect(response.generations, outputs)
    run_to_completion(engine, response, outputs, updates_for=lambda b: [pb.RequestUpdate(request_id=1, chunk_len=7)])
    assert_greedy_equal(outputs[1], smol.reference["a"](first, NEW))
    assert_greedy_equal(outputs[2], smol.reference["b"](second, NEW))


@pytest.mark.slow
def test_prefix_cache_hit_with_the_same_adapter(smol, engine):
    pool = BlockPool(BLOCK)
    first, second = smol.prompt(QUESTIONS[2]), smol.prompt(QUESTIONS[4])
    generate(engine, [adapted(greedy_request(1, first, 4, pool), "b")])
    # The chat template's system prompt: the second request reads the first one's full blocks.
    shared = next(i for i, (x, y) in enumerate(zip(first, second)) if x != y) // BLOCK * BLOCK
    assert shared >= BLOCK
    request = adapted(pb.Request(
        id=2, input_ids=second, cache_len=shared,
        blocks=list(range(1, 1 + shared // BLOCK)) + pool.take(len(second) - shared + NEW),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=NEW, ignore_eos_token=True)), "b")
    out = generate(engine, [request], batch_id=1)
    assert_greedy_equal(out[2], smol.reference["b"](second, NEW))


@pytest.mark.slow
def test_speculation_gives_the_same_tokens_with_adapters(smol, engine):
    grounded = smol.prompt(f"Repeat the following text exactly: {PARAGRAPH}")
    rows = [(grounded, "a"), (grounded, "b"), (smol.prompt(QUESTIONS[0]), "a"), (grounded, "")]

    def run(speculate: int) -> dict[int, list[pb.Generation]]:
        engine.config = dataclasses.replace(engine.config, speculate=speculate)
        pool = BlockPool(BLOCK)
        return generations(engine, [adapted(greedy_request(i, p, NEW, pool), a) for i, (p, a) in enumerate(rows)])

    without, with_ = run(0), run(4)
    assert {i: token_ids(g) for i, g in with_.items()} == {i: token_ids(g) for i, g in without.items()}
    # Adapter rows verified drafts: some of their steps returned several tokens.
    assert any(len(g.tokens.ids) > 1 for g in with_[0]) and any(len(g.tokens.ids) > 1 for g in with_[1])


@pytest.mark.slow
def test_info_lists_the_adapters_and_an_unknown_one_is_refused_before_any_step(smol, engine):
    assert list(engine.get_info().adapter_ids) == ["a", "b"]
    pool = BlockPool(BLOCK)
    requests = [adapted(greedy_request(1, smol.prompt(QUESTIONS[0]), 4, pool), "a"),
                adapted(greedy_request(2, smol.prompt(QUESTIONS[1]), 4, pool), "nope")]
    with pytest.raises(ValueError, match=r"^request 2: unknown adapter_id 'nope'; this shard serves a, b$"):
        engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=7, requests=requests, size=2)))
    assert 7 not in engine.batches


# --------------------------------------------------------------------- tensor parallel (tiny)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    tmp = tmp_path_factory.mktemp("tiny-lora")
    folder = save_tiny("llama", tmp / "model")
    # The tiny random model's logits are far apart (tests/conftest.py): only strong adapters move them.
    return folder, {
        "all": make_adapter(folder, tmp / "all", r=4, targets=ALL_TARGETS, seed=3, strength=1.0),
        "some": make_adapter(folder, tmp / "some", r=2, targets=("k_proj", "o_proj", "up_proj"), seed=4, alpha=4,
                             rslora=True, strength=1.0),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tp_requests() -> list[pb.Request]:
    pool = BlockPool(4)
    prompts = [[(7 * i + 3 * j) % 120 + 3 for j in range(5 + 4 * i)] for i in range(5)]
    adapters = ["all", "", "some", "all", "some"]
    requests = [adapted(greedy_request(i, p, 8, pool), a) for i, (p, a) in enumerate(zip(prompts, adapters))]
    requests[3].chunk_len = 4  # one chunked prefill in the mix
    return requests


def _tp_rank(rank: int, world: int, port: int, folder: str, adapters: dict[str, str], results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    tp = TPGroup(rank=rank, world_size=world, group=dist.group.WORLD)
    engine = engine_with(Path(folder), {k: Path(v) for k, v in adapters.items()}, 4, tp, rank=rank, world_size=world)
    results[rank] = generate(engine, _tp_requests())
    dist.destroy_process_group()


def test_tp2_equals_tp1_with_adapters(tiny):
    folder, adapters = tiny
    single = generate(engine_with(folder, adapters, 4), _tp_requests())
    base = generate(engine_with(folder, {}, 4), [adapted(r, "") for r in _tp_requests()])
    assert single[0] != base[0] and single[2] != base[2] and single[1] == base[1]  # the adapters matter
    results = mp.Manager().dict()
    mp.start_processes(_tp_rank, args=(2, _free_port(), str(folder), {k: str(v) for k, v in adapters.items()}, results),
                       nprocs=2, join=True, start_method="spawn")
    merged = {**results[0], **results[1]}
    assert merged == single


class Modules:
    """An adapter's modules by (layer, name), as LoraAdapter.module gives them."""

    def __init__(self, modules: dict[tuple[int, str], LoraModule]):
        self.modules = modules

    def module(self, layer: int, name: str) -> LoraModule | None:
        return self.modules.get((layer, name))


def random_module(gen, out_features: int, in_features: int, rank: int, scale: float) -> LoraModule:
    return LoraModule("m", torch.randn(rank, in_features, generator=gen), torch.randn(out_features, rank, generator=gen),
                      scale)


STRATEGIES = {  # LoraStep.build's thresholds that force each way of computing
    "dense": dict(dense_cells=10**6, dense_waste=10**6), "padded": dict(dense_cells=0, pad_slack=10**6),
    "grouped": dict(dense_cells=0, pad_slack=-1),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_adds_each_rows_own_adapter_and_slices_sum_to_the_whole(strategy):
    """Column-parallel parts (B's rows) and row-parallel parts (A's columns, partial deltas summed
    as the all-reduce sums them) give the unsplit projection's delta, on every strategy."""
    gen = torch.Generator().manual_seed(0)
    adapters = [Modules({(0, "q_proj"): random_module(gen, 8, 6, 2, 0.5), (0, "o_proj"): random_module(gen, 6, 8, 2, 0.5)}),
                Modules({}),  # loaded, adapts nothing here
                Modules({(0, "k_proj"): random_module(gen, 4, 6, 3, 2.0), (0, "q_proj"): random_module(gen, 8, 6, 1, 1.0)})]
    slot_of_row = [2, None, 0, 0, 2, 2, None]
    x, xo = torch.randn(7, 6, generator=gen), torch.randn(7, 8, generator=gen)
    spans = [(slot, row, 1) for row, slot in enumerate(slot_of_row) if slot is not None]
    step = LoraStep.build(spans, 7, CPU, **STRATEGIES[strategy])
    assert type(step.layout).__name__.lower().startswith(strategy) and step.slots == 3

    def delta(projection, inputs, out_features):
        out = torch.zeros(7, out_features)
        projection.add_to(out, inputs, step)
        return out

    expected = torch.zeros(7, 12)
    for row, slot in enumerate(slot_of_row):
        for name, cols in (("q_proj", slice(0, 8)), ("k_proj", slice(8, 12))):
            m = None if slot is None else adapters[slot].module(0, name)
            if m is not None:
                expected[row, cols] = m.scale * (m.b @ (m.a @ x[row]))
    whole = column_lora(adapters, 0, [("q_proj", (0, 8)), ("k_proj", (0, 4))], torch.float32, CPU)
    assert torch.allclose(delta(whole, x, 12), expected, atol=1e-5)
    halves = [column_lora(adapters, 0, [("q_proj", (4 * h, 4 * h + 4)), ("k_proj", (2 * h, 2 * h + 2))],
                          torch.float32, CPU) for h in (0, 1)]
    parts = [delta(p, x, 6) for p in halves]
    assert torch.allclose(torch.cat([parts[0][:, :4], parts[1][:, :4], parts[0][:, 4:], parts[1][:, 4:]], 1),
                          expected, atol=1e-5)
    o = adapters[0].module(0, "o_proj")
    o_expected = torch.stack([o.scale * (o.b @ (o.a @ xo[row])) if slot == 0 else torch.zeros(6)
                              for row, slot in enumerate(slot_of_row)])
    o_whole = delta(row_lora(adapters, 0, "o_proj", (0, 8), 6, torch.float32, CPU), xo, 6)
    assert torch.allclose(o_whole, o_expected, atol=1e-5)
    o_sum = sum(delta(row_lora(adapters, 0, "o_proj", (4 * h, 4 * h + 4), 6, torch.float32, CPU), xo[:, 4 * h:4 * h + 4],
                      6) for h in (0, 1))
    assert torch.allclose(o_sum, o_whole, atol=1e-5)
    assert row_lora(adapters, 0, "down_proj", (0, 8), 6, torch.float32, CPU) is None  # nobody adapts it


def test_each_step_picks_its_strategy_and_none_without_adapter_rows():
    assert LoraStep.build([], 4, CPU) is None
    single = LoraStep.build([(0, 0, 3), (0, 3, 1)], 4, CPU)
    assert single.layout == DenseRows(None)  # every row, one adapter: no mask at all
    dense = LoraStep.build([(1, 0, 2), (0, 2, 2)], 4, CPU)
    assert dense.slots == 2 and dense.layout.drop[:, :, 0].tolist() == [[True, False], [True, False], [False, True],
                                                                         [False, True]]
    masked = LoraStep.build([(0, 0, 3)], 4, CPU)  # the last row uses no adapter
    assert masked.layout.drop[:, :, 0].tolist() == [[False], [False], [False], [True]]
    # Two adapters over 3 of 4 rows: dense would do 8/3 times the work; padded, one row of padding.
    sparse = LoraStep.build([(1, 0, 2), (0, 3, 1)], 4, CPU)
    assert isinstance(sparse.layout, PaddedRows) and sparse.layout.gather.tolist() == [3, 0, 0, 1]
    assert sparse.layout.drop[:, :, 0].tolist() == [[False, True], [False, False]] and not sparse.layout.every_row
    # 32 rows over 8 adapters, 4 each: one padded batch, no padding.
    even = LoraStep.build([(i % 8, i, 1) for i in range(32)], 32, CPU)
    assert isinstance(even.layout, PaddedRows) and even.layout.per_slot == 4 and even.layout.drop is None
    assert even.layout.gather.view(8, 4)[1].tolist() == [1, 9, 17, 25] and not even.layout.every_row
    # 8 rows over 8 adapters, in slot order: no gather either.
    ordered = LoraStep.build([(i, i, 1) for i in range(8)], 8, CPU)
    assert isinstance(ordered.layout, PaddedRows) and ordered.layout.every_row
    # One adapter with 25 rows, seven with one: padding all to 25 would be 200 rows; grouped.
    uneven = LoraStep.build([(0, 0, 25)] + [(s, 24 + s, 1) for s in range(1, 8)], 32, CPU)
    assert isinstance(uneven.layout, GroupedRows) and uneven.layout.every_row
    assert uneven.layout.groups == ((0, 0, 25),) + tuple((s, 24 + s, 25 + s) for s in range(1, 8))


def test_adapter_rows_keep_their_adapter_through_filter_concat_and_never_replay_a_graph(tiny):
    ids = ("all", "some")
    pool = BlockPool(4)

    def batch(batch_id, adapter_ids):
        requests = [adapted(greedy_request(batch_id * 10 + i, [5, 6, 7], 4, pool), a) for i, a in enumerate(adapter_ids)]
        return Batch.from_pb(pb.Batch(id=batch_id, requests=requests), 128, CPU, adapter_ids=ids)

    first, second = batch(1, ["some", ""]), batch(2, ["", "all"])
    assert [r.adapter for r in first.requests] == [1, None] and first.has_adapter
    merged = Batch.concatenate([first, second], 1)
    assert [r.adapter for r in merged.requests] == [1, None, None, 0] and merged.has_adapter
    assert not merged.filter([11, 20]).has_adapter
    step = merged.prepare(4, CPU).lora  # 12 rows, 3 per request
    assert step.slots == 2 and step.layout.gather.tolist() == [9, 10, 11, 0, 1, 2]
    assert merged.filter([11, 20]).prepare(4, CPU).lora is None
    for r in merged.requests:  # every request decoding: only the adapter stops a graph replay
        r.output_ids, r.num_computed = [9], 3
    assert plan_decode(merged.filter([11, 20]), (1, 2, 4), 4, 8) is not None
    assert plan_decode(merged, (1, 2, 4), 4, 8) is None


def test_quantized_base_weights_keep_lora_in_the_activation_dtype(tiny):
    folder, adapters = tiny
    ctx = ModelContext(TPGroup(), CPU, torch.float32, 4, quantize="int8",
                       lora_adapters=tuple(read_adapter(k, v) for k, v in adapters.items()))
    qkv = get_model(folder, ctx).layers[0].self_attn.qkv_proj
    assert type(qkv.linear).__name__ == "Int8DynamicLinear"
    assert qkv.lora.a.dtype == qkv.lora.b.dtype == torch.float32


# ---------------------------------------------------------------------------------- refusals


def fake_adapter(folder: Path, tensors: dict[str, tuple[int, ...]], **config) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "none", **config}))
    save_file({name: torch.zeros(shape) for name, shape in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


Q = "base_model.model.model.layers.0.self_attn.q_proj"
GOOD = {f"{Q}.lora_A.weight": (4, 64), f"{Q}.lora_B.weight": (64, 4)}


@pytest.mark.parametrize(("config", "tensors", "message"), [
    ({"use_dora": True}, GOOD, "adapter x: DoRA (use_dora) rescales the adapted weight by a learned magnitude; "
                               "pytgi does not support it"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, GOOD,
     "adapter x targets embed_tokens; pytgi applies LoRA to q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
     "down_proj only"),
    ({"target_modules": ".*(q_proj|lm_head)"}, {**GOOD, "base_model.model.lm_head.lora_A.weight": (4, 64)},
     "adapter x: targets lm_head (base_model.model.lm_head.lora_A.weight); pytgi applies LoRA to"),
    ({"modules_to_save": ["lm_head"]}, GOOD, "adapter x: modules_to_save replaces whole modules"),
    ({"peft_type": "IA3"}, GOOD, "adapter x: peft_type 'IA3' is not supported; pytgi serves LORA adapters only"),
    ({"bias": "lora_only"}, GOOD, "adapter x: bias='lora_only' trains the base model's biases"),
    ({"fan_in_fan_out": True}, GOOD, "adapter x: fan_in_fan_out"),
    ({"layer_replication": [[0, 2]]}, GOOD, "adapter x: layer_replication changes the model's layer stack"),
    ({}, {**GOOD, f"{Q}.lora_magnitude_vector": (64,)}, "adapter x: " + Q + ".lora_magnitude_vector is a DoRA"),
    ({}, {f"{Q}.lora_A.weight": (4, 64)}, f"adapter x: {Q} has no lora_B.weight"),
    ({"rank_pattern": {"q_proj": 8}}, GOOD, f"adapter x: {Q} has lora_A (4, 64) and lora_B (64, 4), but "
                                            "adapter_config.json gives it rank 8"),
])
def test_what_peft_would_compute_differently_is_refused_in_one_line(tmp_path, config, tensors, message):
    with pytest.raises(LoraAdapterError) as excinfo:
        read_adapter("x", fake_adapter(tmp_path / "x", tensors, **config))
    assert str(excinfo.value).startswith(message) and "\n" not in str(excinfo.value)


def test_unreadable_files_are_one_line_too(tmp_path):
    folder = fake_adapter(tmp_path / "x", GOOD)
    (folder / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{trunc")
    with pytest.raises(LoraAdapterError, match=r"^adapter x: cannot read .*adapter_model\.safetensors \(") as excinfo:
        read_adapter("x", folder)
    assert "\n" not in str(excinfo.value)
    (folder / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(LoraAdapterError, match=r"^adapter x: .*adapter_config\.json is not a JSON object$"):
        read_adapter("x", folder)


def test_rank_and_alpha_patterns_and_rslora_set_each_modules_scale(tmp_path):
    k = "base_model.model.model.layers.1.self_attn.k_proj"
    tensors = {**GOOD, f"{k}.lora_A.weight": (2, 64), f"{k}.lora_B.weight": (32, 2)}
    adapter = read_adapter("x", fake_adapter(tmp_path / "x", tensors, rank_pattern={"layers.1.self_attn.k_proj": 2},
                                             alpha_pattern={"k_proj": 3}))
    assert adapter.module(0, "q_proj").scale == 8 / 4 and adapter.module(1, "k_proj").scale == 3 / 2
    rslora = read_adapter("y", fake_adapter(tmp_path / "y", GOOD, use_rslora=True))
    assert rslora.module(0, "q_proj").scale == 8 / 2


@pytest.mark.parametrize(("tensors", "message"), [
    ({f"{Q}.lora_A.weight": (4, 32), f"{Q}.lora_B.weight": (64, 4)},
     f"adapter x does not fit the base model: {Q}.lora_A.weight has shape (4, 32), expected (4, 64)"),
    ({f"{Q}.lora_A.weight": (4, 64), f"{Q}.lora_B.weight": (48, 4)},
     f"adapter x does not fit the base model: {Q}.lora_B.weight has shape (48, 4), expected (64, 4)"),
    ({Q.replace("layers.0", "layers.2") + ".lora_A.weight": (4, 64), Q.replace("layers.0", "layers.2") + ".lora_B.weight": (64, 4)},
     "adapter x does not fit the base model: base_model.model.model.layers.2.self_attn.q_proj is in layer 2, the "
     "model has 2 layers"),
])
def test_an_adapter_for_another_model_is_refused(tmp_path, tiny, tensors, message):
    ctx = ModelContext(TPGroup(), CPU, torch.float32, 4, lora_adapters=(read_adapter("x", fake_adapter(tmp_path / "x", tensors)),))
    with pytest.raises(LoraAdapterError) as excinfo:
        get_model(tiny[0], ctx)
    assert str(excinfo.value) == message


def test_the_transformers_fallback_refuses_adapters(tmp_path, tiny):
    folder = save_tiny("gpt2", tmp_path / "gpt2")
    ctx = ModelContext(TPGroup(), CPU, torch.float32, 4, lora_adapters=(read_adapter("all", tiny[1]["all"]),))
    with pytest.raises(UnsupportedModelError, match="^--lora-adapters are served by the fast-path architectures"):
        get_model(folder, ctx)


def test_adapter_sources_local_and_hub_cache_with_revision(tmp_path, tiny):
    local = tiny[1]["all"]
    assert resolve_adapter(str(local)) == local.resolve()
    with pytest.raises(ModelSourceError, match="^adapter path not found or not a folder: /nonexistent$"):
        resolve_adapter("/nonexistent")
    with pytest.raises(ModelSourceError, match=r"^adapter folder .* has no adapter_config.json"):
        resolve_adapter(str(tmp_path))
    with pytest.raises(ModelSourceError, match="a revision names a hub commit"):
        resolve_adapter(str(local), revision="v1")
    # The hub cache layout, two revisions: `@v1` reads v1's snapshot, offline.
    repo = tmp_path / "hub" / "models--org--lora"
    for ref, sha in (("main", "a" * 40), ("v1", "b" * 40)):
        shutil.copytree(local, repo / "snapshots" / sha)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(sha)
    found = resolve_adapter("org/lora", revision="v1", hub_cache_dir=tmp_path / "hub", offline=True)
    assert found == repo / "snapshots" / ("b" * 40)
    with pytest.raises(ModelSourceError, match=r"^adapter org/other is not in the Hugging Face cache .* offline mode"):
        resolve_adapter("org/other", hub_cache_dir=tmp_path / "hub", offline=True)


def test_bad_lora_adapters_option_is_one_line_exit_1(monkeypatch):
    common = dict(revision=None, uds_path="", sharded=False, dtype=None, trust_remote_code=False, json_output=False,
                  log_level="INFO", device="cpu")
    assert build_config(None, lora_adapters="a=/p,org/b@v1", **common).lora_adapters[1].revision == "v1"
    with pytest.raises(ValueError, match="LoRA adapter id 'a' is given twice"):
        build_config(None, lora_adapters="a=/p,a=/q", **common)
    monkeypatch.delenv("LORA_ADAPTERS", raising=False)
    for argv, env in ((["--lora-adapters", "x=a=b"], {}), ([], {"LORA_ADAPTERS": "tgi"})):
        result = CliRunner().invoke(shard_cli, ["serve", "--device", "cpu", *argv], env=env)
        assert result.exit_code == 1
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: Invalid LoRA adapter"), result.output
