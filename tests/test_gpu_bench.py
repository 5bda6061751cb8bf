"""benchmarks/gpu_bench.py on the CPU: arguments, the decode-rate rule, the greedy verdict, the
report, `serve` against a scripted server, and `hf` on a tiny model."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys

import pytest
import torch
from aiohttp import web

from benchmarks import gpu_bench as gb


def test_arguments_and_their_limits():
    args = gb.parse_args(["serve", "--url", "http://127.0.0.1:3000", "--out", "x.json"])
    assert (args.batch_sizes, args.new_tokens, args.concurrency, args.runs) == ([1, 64], 128, 64, 2)
    assert gb.parse_args(["serve", "--url", "http://localhost:1", "--out", "x", "--batch-sizes", "1,8,32"]).batch_sizes == [1, 8, 32]
    for bad in (["--url", "http://10.0.0.1:3000"], ["--new-tokens", "1"], ["--batch-sizes", "0,4"]):
        with pytest.raises(SystemExit):
            gb.parse_args(["serve", "--url", "http://127.0.0.1:3000", "--out", "x", *bad])
    hf = gb.parse_args(["hf", "--pytgi", "a.json", "b.json", "--out", "hf.json", "--device", "cpu"])
    assert [p.name for p in hf.pytgi] == ["a.json", "b.json"] and hf.device == "cpu"


def test_decode_rate_takes_prefill_out():
    assert gb.decode_tok_s(64, 128, 1.0, 3.54) == pytest.approx(64 * 127 / 2.54)
    assert math.isnan(gb.decode_tok_s(4, 8, 2.0, 1.9))  # a noisy machine: no rate, not a negative one


def test_bench_prompts_are_reproducible_and_in_range():
    prompts = gb.bench_prompts(8, 32, vocab_size=100)
    assert prompts == gb.bench_prompts(8, 32, vocab_size=100)
    assert len(prompts) == 8 and {len(p) for p in prompts} == {32}
    assert all(16 <= t < 100 for p in prompts for t in p)
    assert gb.bench_prompts(1, 32, 100)[0] != prompts[0]


def test_teacher_forced_margins():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 2.5, 0.0]])
    assert gb.teacher_forced_margins(logits, [1, 1]) == pytest.approx([0.0, 0.5])
    assert gb.common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2


def test_greedy_verdict_uses_the_dtype_tolerance(capsys):
    checks = gb.Checks()
    close = [{"margins": [0.0, 0.4], "common_prefix": 2, "logprob_max_diff": 0.01}]
    gb.greedy_verdict("paged", "bfloat16", close, checks)
    gb.greedy_verdict("paged", "float32", close, checks)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("PASS hf.greedy[paged]: 2/2 greedy tokens are HF's choice within 1.0 logits")
    assert out[1].startswith("FAIL hf.greedy[paged]: 1/2 greedy tokens are HF's choice within 0.01 logits")
    assert checks.failed


def run_with(label: str, rates: dict[int, float]) -> gb.ServeRun:
    return gb.ServeRun(label=label, info={"model_dtype": "torch.bfloat16"},
                       throughput=[gb.Throughput(b, 32, 128, 1.0, 2.0, r) for b, r in rates.items()])


def test_report_table():
    hf = [gb.Throughput(1, 32, 128, 1.0, 2.0, 50.0), gb.Throughput(64, 32, 128, 1.0, 2.0, 1000.0)]
    table = gb.render_table([run_with("paged", {1: 100.0, 64: 4000.0}), run_with("sdpa", {1: float("nan")})], hf)
    assert table.splitlines() == [
        "decode tok/s (prompt 32 tokens, 128 new tokens, B x (N - 1) / (t_N - t_1))",
        "batch | pytgi[paged] tok/s | pytgi[sdpa] tok/s | transformers tok/s | paged / hf | sdpa / hf",
        "------+--------------------+-------------------+--------------------+------------+----------",
        "    1 |              100.0 |               nan |               50.0 |      2.00x |         -",
        "   64 |            4,000.0 |                 - |            1,000.0 |      4.00x |         -",
    ]


def test_serve_run_round_trip(tmp_path):
    run = run_with("paged", {1: 10.0})
    run.greedy.append(gb.GreedyCase("p", [1, 2], [3], [-0.5], "x"))
    run.bench_prompts["1"] = [[5, 6]]
    run.save(tmp_path / "r.json")
    assert gb.ServeRun.load(tmp_path / "r.json") == run
    assert run.dtype == "bfloat16"


# -- `serve` against a scripted server ---------------------------------------------------------

def scripted_app(seeded_reproducible: bool) -> web.Application:
    """/info, /generate and /v1/completions answering like pytgi, deterministically (or not, for
    seeded sampling: the failure the check is there to catch)."""
    calls = {"sampled": 0}

    async def info(request):
        return web.json_response({"model_dtype": "torch.float32", "model_device_type": "cpu", "attention_impl": "sdpa",
                                  "block_size": 16, "num_shard": 1})

    async def generate(request):
        body = await request.json()
        params = body["parameters"]
        n = params["max_new_tokens"]
        base = len(body["inputs"])
        if params.get("do_sample"):
            calls["sampled"] += 1
            base += params["seed"] if seeded_reproducible else calls["sampled"]
        tokens = [{"id": (base + i) % 50, "text": "t", "logprob": -0.1, "special": False} for i in range(n)]
        reply = {"generated_text": "t" * n}
        if params.get("details"):
            reply["details"] = {"tokens": tokens, "prefill": [{"id": 1, "text": "", "logprob": None}]}
        return web.json_response(reply)

    async def completions(request):
        body = await request.json()
        assert body["ignore_eos"] and body["temperature"] == 0 and isinstance(body["prompt"], list)
        await asyncio.sleep(0.01 * body["max_tokens"])  # t_N well above t_1, however loaded the machine
        return web.json_response({"usage": {"completion_tokens": body["max_tokens"]}})

    app = web.Application()
    app.add_routes([web.get("/info", info), web.post("/generate", generate), web.post("/v1/completions", completions)])
    return app


async def serve_against(app: web.Application, tmp_path, capsys) -> tuple[gb.Checks, gb.ServeRun, list[str]]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        args = gb.parse_args(["serve", "--url", f"http://127.0.0.1:{port}", "--label", "fake", "--out",
                              str(tmp_path / "r.json"), "--expect-device", "cpu", "--concurrency", "5",
                              "--batch-sizes", "1,3", "--new-tokens", "10", "--runs", "1", "--vocab-size", "50"])
        checks = gb.Checks()
        run = await gb.serve_checks(args, checks)
    finally:
        await runner.cleanup()
    return checks, run, capsys.readouterr().out.splitlines()


def test_serve_checks_pass_on_a_well_behaved_server(tmp_path, capsys):
    checks, run, lines = asyncio.run(serve_against(scripted_app(seeded_reproducible=True), tmp_path, capsys))
    assert [line.split(":")[0] for line in lines] == [
        "PASS serve[fake].info", "PASS serve[fake].greedy", "PASS serve[fake].seeded", "PASS serve[fake].concurrent",
        "PASS serve[fake].tok_s.b1", "PASS serve[fake].tok_s.b3",
    ]
    assert not checks.failed
    assert len(run.greedy) == len(gb.GREEDY_PROMPTS) and run.greedy[0].prompt_ids == [1]
    assert [t.batch_size for t in run.throughput] == [1, 3] and sorted(run.bench_prompts) == ["1", "3"]


def test_serve_checks_fail_on_irreproducible_seeds(tmp_path, capsys):
    checks, _, lines = asyncio.run(serve_against(scripted_app(seeded_reproducible=False), tmp_path, capsys))
    assert "FAIL serve[fake].seeded: seed 7 twice identical: False; seed 8 differs: True" in lines
    assert checks.failed


def test_wait_reports_an_exited_server_at_once():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    state, seconds = asyncio.run(gb.wait_ready("http://127.0.0.1:9", child.pid, timeout_s=30))
    assert state == "exited" and seconds < 5
    state, _ = asyncio.run(gb.wait_ready("http://127.0.0.1:9", None, timeout_s=0.2, interval_s=0.05))
    assert state == "timeout"


# -- `hf` on a tiny model ---------------------------------------------------------------------

def test_hf_checks_on_a_tiny_model(tiny_llama, tmp_path, capsys):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prompt = [1, 5, 9, 30]
    with torch.inference_mode():
        greedy = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=6, min_new_tokens=6,
                                pad_token_id=0)[0, len(prompt):].tolist()
    wrong = list(greedy)
    wrong[2] = (wrong[2] + 1) % 128  # not HF's choice: what a broken kernel would produce
    runs = {}
    for label, tokens in (("right", greedy), ("wrong", wrong)):
        run = gb.ServeRun(label=label, info={"model_dtype": "torch.float32"},
                          greedy=[gb.GreedyCase("p", prompt, tokens, [0.0] * len(tokens), "")])
        if label == "right":
            run.throughput = [gb.Throughput(1, 4, 3, 0.01, 0.02, 200.0), gb.Throughput(2, 4, 3, 0.01, 0.02, 400.0)]
            run.bench_prompts = {"1": gb.bench_prompts(1, 4, 128), "2": gb.bench_prompts(2, 4, 128)}
        run.save(tmp_path / f"{label}.json")
        runs[label] = tmp_path / f"{label}.json"
    args = gb.parse_args(["hf", "--pytgi", str(runs["right"]), str(runs["wrong"]), "--out", str(tmp_path / "hf.json"),
                          "--device", "cpu", "--model-path", str(tiny_llama), "--runs", "1"])
    checks = gb.Checks()
    result = gb.hf_checks(args, checks)
    out = capsys.readouterr().out
    assert "PASS hf.greedy[right]: 6/6 greedy tokens are HF's choice" in out
    assert "first 8 tokens identical to HF generate in 1/1 prompts" in out
    assert "FAIL hf.greedy[wrong]: " in out and checks.failed
    assert [t["batch_size"] for t in result["throughput"]] == [1, 2]
    assert result["greedy"]["right"][0]["hf_ids"] == greedy
    assert "batch | pytgi[right] tok/s | pytgi[wrong] tok/s | transformers tok/s" in out


# -- `random-llama` ---------------------------------------------------------------------------

def test_random_tokenizer_has_the_exact_vocabulary_and_round_trips_any_text():
    tokenizer = gb.random_tokenizer(400)
    assert tokenizer.get_vocab_size() == 400
    assert [tokenizer.token_to_id(t) for t in gb.SPECIAL_TOKENS] == [0, 1, 2]
    text = "The capital of France is Paris. ∑ café\n\tdef f():"
    ids = tokenizer.encode(text).ids
    assert ids[0] == 1 and max(ids) < 400  # <s> first
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert gb.random_tokenizer(400).to_str() == tokenizer.to_str()  # built, not trained: the same every time
    with pytest.raises(ValueError, match="at least 259"):
        gb.random_tokenizer(100)


def test_random_llama_loads_in_transformers_the_router_and_the_shard(tmp_path):
    import transformers

    from router.tokenizer import Tokenizer
    from tests.conftest import make_engine

    assert gb.main(["random-llama", "--out", str(tmp_path / "m"), "--layers", "1", "--vocab-size", "300"]) == 0
    folder = gb.save_random_llama(tmp_path / "small", vocab_size=300, hidden_size=64, intermediate_size=128,
                                  num_layers=1, num_heads=4, num_kv_heads=2, max_positions=256)
    config = transformers.AutoConfig.from_pretrained(folder)
    assert (config.vocab_size, config.num_key_value_heads, config.eos_token_id) == (300, 2, 2)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    assert model.dtype == torch.bfloat16 and not model.lm_head.weight[2].any()  # EOS never wins greedy
    tokenizer = Tokenizer.from_folder(folder)
    assert tokenizer.vocab_size == 300 and tokenizer.encode("hi")[0] == 1
    engine = make_engine(folder)
    assert engine.info.impl == "llama" and engine.info.vocab_size == 300
