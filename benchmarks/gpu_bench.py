"""Smoke checks of a served model, and the same model through plain transformers on the same device.

scripts/gpu-smoke.sh runs the three steps below in order; each also works on its own.

    python -m benchmarks.gpu_bench wait  --url URL --pid PID --timeout-s 300
    python -m benchmarks.gpu_bench serve --url URL --label default --out pytgi-default.json --expect-device cuda
    python -m benchmarks.gpu_bench hf    --pytgi pytgi-default.json --out hf.json --device cuda
    python -m benchmarks.gpu_bench random-llama --out DIR    # a model to serve when none is installed

`wait` polls /health until it answers 200 or the server process exits. `serve` checks a running
pytgi over HTTP (loopback only): greedy generations (kept for `hf`), greedy repeatable, a seeded
sample reproducible, N concurrent requests all answered, and decode tok/s at batch 1 and N. `hf`
loads the same model with transformers in the dtype pytgi reported (its /info), after pytgi has
stopped so the two never share the GPU, and checks every greedy token pytgi chose by teacher
forcing: HF's logit for it must be within a dtype-dependent tolerance of HF's best (exact equality
of long greedy runs is not a fair test in fp16/bf16: near-ties flip between kernels); then it
measures HF `generate` on the same prompts and prints both decode rates side by side.

Decode tok/s, both sides alike: a batch of B prompts of the same length is generated twice,
with 1 and with N new tokens (EOS ignored); decode tok/s = B × (N − 1) / (t_N − t_1), the rate
of the N − 1 decode steps with prefill and first token taken out. pytgi's batch is B concurrent
HTTP requests (/v1/completions, token-id prompts, `ignore_eos`), so its rate includes HTTP,
tokenizer and router costs; transformers' is one static batch in `model.generate`.

`random-llama` writes a small random Llama (4 layers, hidden 512, 8 heads of 64, 2 KV heads,
vocab 32,000, bf16) with a byte-level BPE tokenizer of exactly that vocabulary, offline: the smoke
script serves it where the bundled SmolLM2 cannot be installed. Its numbers check the plumbing and
the kernels at realistic head sizes, not a real model's speed.

Every check prints one line starting with PASS, FAIL or SKIP (the smoke script counts them), and
the exit status is 1 when any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.loadgen import is_loopback_url
from benchmarks.report import format_table

GREEDY_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village,",
    "The three primary colors are",
)
SEEDED_PROMPT = "Write a short poem about the sea."
# HF's logit for pytgi's greedy token may trail HF's best by this much (pytgi's own logits put it
# first). A wrong implementation trails by several logits; bf16 rounding of 30 layers, under one.
TOLERANCE = {"float32": 0.01, "float16": 0.5, "bfloat16": 1.0}
PROMPT_SEED = 1234
REQUEST_TIMEOUT_S = 120


class Checks:
    """PASS/FAIL/SKIP lines on stdout; `failed` is the exit status."""

    def __init__(self) -> None:
        self.failed = False

    def report(self, ok: bool | None, name: str, detail: str) -> None:
        word = "SKIP" if ok is None else "PASS" if ok else "FAIL"
        self.failed |= ok is False
        print(f"{word} {name}: {detail}", flush=True)


# -- what `serve` records, and `hf` reads -----------------------------------------------------

@dataclass(slots=True)
class GreedyCase:
    prompt: str
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str


@dataclass(slots=True)
class Throughput:
    batch_size: int
    prompt_len: int
    new_tokens: int
    seconds_one: float  # median wall time of the batch with 1 new token
    seconds_full: float  # median wall time of the batch with `new_tokens` new tokens
    decode_tok_s: float


@dataclass(slots=True)
class ServeRun:
    label: str
    info: dict
    greedy: list[GreedyCase] = field(default_factory=list)
    throughput: list[Throughput] = field(default_factory=list)
    bench_prompts: dict[str, list[list[int]]] = field(default_factory=dict)  # str(batch) → prompts

    @property
    def dtype(self) -> str:
        return str(self.info.get("model_dtype", "")).removeprefix("torch.")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> ServeRun:
        data = json.loads(Path(path).read_text())
        return cls(label=data["label"], info=data["info"],
                   greedy=[GreedyCase(**g) for g in data["greedy"]],
                   throughput=[Throughput(**t) for t in data["throughput"]],
                   bench_prompts=data["bench_prompts"])


def decode_tok_s(batch_size: int, new_tokens: int, seconds_one: float, seconds_full: float) -> float:
    """The rate of the N − 1 decode steps: the N-token run minus the 1-token run (prefill + first token)."""
    if new_tokens < 2 or seconds_full <= seconds_one:
        return float("nan")
    return batch_size * (new_tokens - 1) / (seconds_full - seconds_one)


def bench_prompts(batch_size: int, prompt_len: int, vocab_size: int, seed: int = PROMPT_SEED) -> list[list[int]]:
    """Random token ids (ids 0-15 left out: special tokens live there in most vocabularies)."""
    rng = random.Random(seed * 1000 + batch_size)
    return [[rng.randrange(16, vocab_size) for _ in range(prompt_len)] for _ in range(batch_size)]


def report_rate(checks: Checks, name: str, t: Throughput, where: str = "") -> None:
    """PASS with the rate; SKIP when the N-token run was not slower than the 1-token run (a noisy
    machine: the rate is meaningless, but nothing failed)."""
    timing = f"{t.batch_size} x {t.new_tokens} tokens in {t.seconds_full:.2f} s, 1 token in {t.seconds_one:.2f} s"
    where = f"{where}; " if where else ""
    if math.isfinite(t.decode_tok_s):
        checks.report(True, name, f"decode {t.decode_tok_s:,.1f} tok/s ({where}{timing})")
    else:
        checks.report(None, name, f"no decode rate: the {t.new_tokens}-token batch was not slower ({where}{timing})")


def teacher_forced_margins(logits, token_ids: Sequence[int]) -> list[float]:
    """For each position: max logit − logit of the token pytgi chose (0 where they agree).

    `logits` [len(token_ids), vocab]: the model's logits predicting each of `token_ids`.
    """
    import torch

    rows = logits.float()
    chosen = rows.gather(1, torch.tensor(list(token_ids), device=rows.device).unsqueeze(1)).squeeze(1)
    return (rows.max(dim=1).values - chosen).clamp_min(0).tolist()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# -- wait -------------------------------------------------------------------------------------

def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, exited but not yet reaped by its parent, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


async def wait_ready(url: str, pid: int | None, timeout_s: float, interval_s: float = 0.5) -> tuple[str, float]:
    """("ready" | "exited" | "timeout", seconds waited)."""
    import aiohttp

    start = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while True:
            elapsed = time.monotonic() - start
            if pid is not None and not process_alive(pid):
                return "exited", elapsed
            try:
                async with session.get(f"{url}/health", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    if resp.status == 200:
                        return "ready", elapsed
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            if elapsed >= timeout_s:
                return "timeout", elapsed
            await asyncio.sleep(interval_s)


# -- serve ------------------------------------------------------------------------------------

async def _post(session, url: str, body: dict) -> dict:
    import aiohttp

    async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as resp:
        text = await resp.text()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status} from {url}: {text[:300]}")
        return json.loads(text)


async def _generate(session, url: str, prompt: str, **parameters) -> dict:
    return await _post(session, f"{url}/generate", {"inputs": prompt, "parameters": parameters})


async def _timed_batch(session, url: str, prompts: list[list[int]], new_tokens: int) -> float:
    body = {"model": "pytgi", "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    replies = await asyncio.gather(*(_post(session, f"{url}/v1/completions", {**body, "prompt": p}) for p in prompts))
    seconds = time.perf_counter() - start
    counts = {r["usage"]["completion_tokens"] for r in replies}
    if counts != {new_tokens}:
        raise RuntimeError(f"asked for {new_tokens} tokens per request, got {sorted(counts)}")
    return seconds


async def serve_checks(args: argparse.Namespace, checks: Checks) -> ServeRun:
    """Each check reports its own line; one that raises is a FAIL and the others still run."""
    import aiohttp

    url = args.url.rstrip("/")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async with session.get(f"{url}/info") as resp:
            run = ServeRun(label=args.label, info=await resp.json())
        steps = (_check_info, _check_greedy, _check_seeded, _check_concurrent, _check_throughput)
        for step in steps:
            try:
                await step(session, url, args, run, checks)
            except (RuntimeError, KeyError, ValueError, asyncio.TimeoutError, aiohttp.ClientError) as error:
                checks.report(False, f"serve[{args.label}].{step.__name__.removeprefix('_check_')}",
                              f"{type(error).__name__}: {error}")
    return run


async def _check_info(session, url: str, args: argparse.Namespace, run: ServeRun, checks: Checks) -> None:
    info = run.info
    where = (f"{info.get('model_device_type')} {info.get('model_dtype')}, attention {info.get('attention_impl')}, "
             f"block {info.get('block_size')}, {info.get('num_shard')} shard(s)")
    checks.report(args.expect_device in (None, info.get("model_device_type")), f"serve[{args.label}].info", where)


async def _check_greedy(session, url: str, args: argparse.Namespace, run: ServeRun, checks: Checks) -> None:
    for prompt in GREEDY_PROMPTS:
        reply = await _generate(session, url, prompt, max_new_tokens=args.greedy_tokens, details=True,
                                decoder_input_details=True)
        details = reply["details"]
        run.greedy.append(GreedyCase(prompt=prompt, prompt_ids=[t["id"] for t in details["prefill"]],
                                     token_ids=[t["id"] for t in details["tokens"]],
                                     logprobs=[t["logprob"] for t in details["tokens"]],
                                     text=reply["generated_text"]))
    again = await _generate(session, url, GREEDY_PROMPTS[0], max_new_tokens=args.greedy_tokens, details=True)
    same = [t["id"] for t in again["details"]["tokens"]] == run.greedy[0].token_ids
    checks.report(same and all(g.token_ids for g in run.greedy), f"serve[{args.label}].greedy",
                  f"{len(run.greedy)} prompts x {args.greedy_tokens} tokens, repeat identical: {same}; "
                  f"{run.greedy[0].prompt!r} -> {run.greedy[0].text!r}")


async def _check_seeded(session, url: str, args: argparse.Namespace, run: ServeRun, checks: Checks) -> None:
    sampled = [await _generate(session, url, SEEDED_PROMPT, max_new_tokens=24, do_sample=True, seed=seed,
                               temperature=0.9, top_p=0.95, details=True) for seed in (7, 7, 8)]
    ids = [[t["id"] for t in s["details"]["tokens"]] for s in sampled]
    checks.report(ids[0] == ids[1] and bool(ids[0]), f"serve[{args.label}].seeded",
                  f"seed 7 twice identical: {ids[0] == ids[1]}; seed 8 differs: {ids[0] != ids[2]}")


async def _check_concurrent(session, url: str, args: argparse.Namespace, run: ServeRun, checks: Checks) -> None:
    prompts = [GREEDY_PROMPTS[i % len(GREEDY_PROMPTS)] for i in range(args.concurrency)]
    replies = await asyncio.gather(*(_generate(session, url, p, max_new_tokens=16) for p in prompts),
                                   return_exceptions=True)
    errors = [r for r in replies if isinstance(r, BaseException)]
    empty = sum(1 for r in replies if not isinstance(r, BaseException) and not r["generated_text"])
    checks.report(not errors and not empty, f"serve[{args.label}].concurrent",
                  f"{args.concurrency} requests: {len(errors)} failed, {empty} empty"
                  + (f"; first error: {errors[0]}" if errors else ""))


async def _check_throughput(session, url: str, args: argparse.Namespace, run: ServeRun, checks: Checks) -> None:
    vocab = args.vocab_size or _vocab_size(run)
    for size in args.batch_sizes:
        batch = bench_prompts(size, args.prompt_len, vocab)
        run.bench_prompts[str(size)] = batch
        try:
            await _timed_batch(session, url, batch, args.new_tokens)  # warm-up
            one = statistics.median([await _timed_batch(session, url, batch, 1) for _ in range(args.runs)])
            full = statistics.median([await _timed_batch(session, url, batch, args.new_tokens) for _ in range(args.runs)])
        except RuntimeError as error:
            checks.report(False, f"serve[{args.label}].tok_s.b{size}", str(error))
            continue
        t = Throughput(size, args.prompt_len, args.new_tokens, one, full, decode_tok_s(size, args.new_tokens, one, full))
        run.throughput.append(t)
        report_rate(checks, f"serve[{args.label}].tok_s.b{size}", t)


def _vocab_size(run: ServeRun) -> int:
    """Largest id seen + 1: a safe bound when the caller does not give --vocab-size."""
    return max((max(g.prompt_ids + g.token_ids) for g in run.greedy), default=255) + 1


# -- hf ---------------------------------------------------------------------------------------

def load_hf_model(path: Path, dtype_name: str, device: str):
    import torch
    import transformers

    dtype = getattr(torch, dtype_name or "float32")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model


def hf_greedy(model, case: GreedyCase, device: str) -> dict:
    import torch

    prompt = torch.tensor([case.prompt_ids], device=device)
    full = torch.tensor([case.prompt_ids + case.token_ids[:-1]], device=device)
    with torch.inference_mode():
        logits = model(full).logits[0, len(case.prompt_ids) - 1:]
        margins = teacher_forced_margins(logits, case.token_ids)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        hf_logprobs = logprobs.gather(1, torch.tensor(case.token_ids, device=device).unsqueeze(1)).squeeze(1).tolist()
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                   max_new_tokens=len(case.token_ids), pad_token_id=_pad_id(model))
    hf_ids = generated[0, len(case.prompt_ids):].tolist()
    return {"margins": margins, "hf_ids": hf_ids, "common_prefix": common_prefix(hf_ids, case.token_ids),
            "logprob_max_diff": max((abs(a - b) for a, b in zip(hf_logprobs, case.logprobs)), default=0.0)}


def _pad_id(model) -> int:
    config = model.generation_config
    if config.pad_token_id is not None:
        return config.pad_token_id
    eos = config.eos_token_id
    return (eos[0] if isinstance(eos, list) else eos) or 0


def hf_throughput(model, prompts: list[list[int]], new_tokens: int, runs: int, device: str) -> Throughput:
    import torch

    input_ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(input_ids)

    def timed(n: int) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                           pad_token_id=_pad_id(model))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(new_tokens)  # warm-up
    one = statistics.median(timed(1) for _ in range(runs))
    full = statistics.median(timed(new_tokens) for _ in range(runs))
    size = len(prompts)
    return Throughput(size, len(prompts[0]), new_tokens, one, full, decode_tok_s(size, new_tokens, one, full))


def greedy_verdict(label: str, dtype: str, results: list[dict], checks: Checks) -> None:
    tolerance = TOLERANCE.get(dtype, TOLERANCE["bfloat16"])
    worst = max((max(r["margins"], default=0.0) for r in results), default=0.0)
    positions = sum(len(r["margins"]) for r in results)
    over = sum(1 for r in results for m in r["margins"] if m > tolerance)
    first8 = sum(1 for r in results if r["common_prefix"] >= min(8, len(r["margins"])))
    checks.report(over == 0 and positions > 0, f"hf.greedy[{label}]",
                  f"{positions - over}/{positions} greedy tokens are HF's choice within {tolerance} logits "
                  f"(worst {worst:.3f}, {dtype}); first 8 tokens identical to HF generate in "
                  f"{first8}/{len(results)} prompts; logprob max |diff| "
                  f"{max((r['logprob_max_diff'] for r in results), default=0.0):.3f}")


def render_table(runs: Sequence[ServeRun], hf: Sequence[Throughput]) -> str:
    """decode tok/s per batch size: every pytgi run, transformers, and each run's ratio to it."""
    hf_by_size = {t.batch_size: t for t in hf}
    sizes = sorted({t.batch_size for run in runs for t in run.throughput} | set(hf_by_size))
    headers = ["batch", *(f"pytgi[{run.label}] tok/s" for run in runs), "transformers tok/s",
               *(f"{run.label} / hf" for run in runs)]
    rows = []
    for size in sizes:
        ours = [next((t.decode_tok_s for t in run.throughput if t.batch_size == size), None) for run in runs]
        base = hf_by_size[size].decode_tok_s if size in hf_by_size else None
        ratios = [f"{o / base:.2f}x" if _finite(o) and _finite(base) and base else "-" for o in ours]
        rows.append([size, *ours, base, *ratios])
    first = next((t for run in runs for t in run.throughput), None) or next(iter(hf), None)
    shape = f"prompt {first.prompt_len} tokens, {first.new_tokens} new tokens, " if first else ""
    return f"decode tok/s ({shape}B x (N - 1) / (t_N - t_1))\n" + format_table(headers, rows)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def hf_checks(args: argparse.Namespace, checks: Checks) -> dict:
    runs = [ServeRun.load(p) for p in args.pytgi]
    path = Path(args.model_path) if args.model_path else resolve_model_path(args.model_id)
    device = args.device
    out: dict = {"device": device, "model_path": str(path), "greedy": {}, "throughput": []}
    hf_runs: list[Throughput] = []
    for dtype in sorted({run.dtype for run in runs}):
        model = load_hf_model(path, dtype, device)
        for run in (r for r in runs if r.dtype == dtype):
            results = [hf_greedy(model, case, device) for case in run.greedy]
            out["greedy"][run.label] = results
            greedy_verdict(run.label, dtype, results, checks)
        if not hf_runs:  # one baseline, in the first dtype served
            reference = next(r for r in runs if r.dtype == dtype)
            for size, prompts in sorted(reference.bench_prompts.items(), key=lambda kv: int(kv[0])):
                t = hf_throughput(model, prompts, reference.throughput[0].new_tokens if reference.throughput
                                  else args.new_tokens, args.runs, device)
                hf_runs.append(t)
                report_rate(checks, f"hf.tok_s.b{size}", t, f"{dtype}, {device}")
        del model
    out["throughput"] = [asdict(t) for t in hf_runs]
    print(render_table(runs, hf_runs), flush=True)
    return out


def resolve_model_path(model_id: str | None) -> Path:
    """The folder the shard loads: the bundled GGUF's conversion, or the user's model, resolved the
    same way (shard/model_source.py), from the local cache only."""
    from shard.config import default_cache_dir
    from shard.model_source import resolve_model

    return resolve_model(model_id or None, cache_dir=default_cache_dir(), offline=True,
                         progress=lambda line: print(f"INFO {line}", flush=True)).path


# -- random-llama -----------------------------------------------------------------------------

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2, as in Llama's vocabularies


def random_tokenizer(vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` with exactly `vocab_size` ids: the 3 special tokens,
    the 256 byte symbols, then merges of byte pairs in a fixed order. Built, not trained: no corpus,
    nothing to download, the same file every time. Encodes any text; adds <s> in front."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < len(SPECIAL_TOKENS) + len(symbols):
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + len(symbols)}, got {vocab_size}")
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *symbols])}
    merges = []
    pairs = ((a, b) for a in symbols for b in symbols)  # 65,536 two-byte tokens at most
    while len(vocab) < vocab_size:
        a, b = next(pairs)
        vocab[a + b] = len(vocab)
        merges.append((a, b))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    return tokenizer


def save_random_llama(folder: Path, *, vocab_size: int = 32000, hidden_size: int = 512, intermediate_size: int = 1408,
                      num_layers: int = 4, num_heads: int = 8, num_kv_heads: int = 2, max_positions: int = 4096,
                      dtype: str = "bfloat16", seed: int = 0) -> Path:
    """A random `LlamaForCausalLM` and its tokenizer in `folder` (safetensors, config, tokenizer.json,
    tokenizer_config.json), with transformers alone and offline.

    The weights are scaled up (as tests/conftest.py's tiny models are) so that greedy choices are
    not near-ties, and EOS's output row is zeroed: its logit stays 0 while the others spread over
    several units, so greedy runs never stop early and every reply has text."""
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.mul_(4.0)
        model.lm_head.weight[config.eos_token_id].zero_()
    model.to(getattr(torch, dtype)).eval().save_pretrained(folder)
    random_tokenizer(vocab_size).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": max_positions,
        "chat_template": "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant: {% endif %}",
    }, indent=2))
    return folder


# -- CLI --------------------------------------------------------------------------------------

def _batch_sizes(text: str) -> list[int]:
    sizes = [int(part) for part in text.split(",") if part.strip()]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return sizes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    wait = sub.add_parser("wait", help="poll /health until 200, the process exits, or the timeout")
    wait.add_argument("--url", required=True)
    wait.add_argument("--pid", type=int, help="the server's process: stop waiting when it exits")
    wait.add_argument("--timeout-s", type=float, default=300.0)

    serve = sub.add_parser("serve", help="checks and decode tok/s of a running pytgi, over HTTP")
    serve.add_argument("--url", required=True)
    serve.add_argument("--label", default="default", help="names this run in the report (e.g. the attention backend)")
    serve.add_argument("--out", type=Path, required=True, help="JSON for `hf`")
    serve.add_argument("--expect-device", choices=("cuda", "cpu"), help="FAIL unless /info reports this device")
    serve.add_argument("--greedy-tokens", type=int, default=32)
    serve.add_argument("--concurrency", type=int, default=64)
    serve.add_argument("--batch-sizes", type=_batch_sizes, default=[1, 64])
    serve.add_argument("--prompt-len", type=int, default=32)
    serve.add_argument("--new-tokens", type=int, default=128)
    serve.add_argument("--runs", type=int, default=2, help="timed runs per measurement (median)")
    serve.add_argument("--vocab-size", type=int, help="prompt ids are drawn below this (default: from the greedy runs)")

    hf = sub.add_parser("hf", help="the served runs against plain transformers on this device")
    hf.add_argument("--pytgi", type=Path, nargs="+", required=True, help="`serve` JSON files")
    hf.add_argument("--out", type=Path, required=True)
    hf.add_argument("--device", default="cuda")
    hf.add_argument("--model-id", help="what the launcher served (default: the bundled model)")
    hf.add_argument("--model-path", help="the model folder itself (skips resolving --model-id)")
    hf.add_argument("--runs", type=int, default=2)
    hf.add_argument("--new-tokens", type=int, default=128, help="when the runs measured no throughput")

    tiny = sub.add_parser("random-llama", help="write a small random Llama and its tokenizer (offline)")
    tiny.add_argument("--out", type=Path, required=True, help="the model folder to write")
    tiny.add_argument("--layers", type=int, default=4)
    tiny.add_argument("--vocab-size", type=int, default=32000)
    args = parser.parse_args(argv)
    if args.command == "serve":
        if not is_loopback_url(args.url):
            parser.error(f"--url must be a loopback address, got {args.url}")
        if args.new_tokens < 2 or args.runs < 1 or args.prompt_len < 1 or args.concurrency < 1:
            parser.error("--new-tokens must be >= 2; --runs, --prompt-len and --concurrency >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "wait":
        state, seconds = asyncio.run(wait_ready(args.url.rstrip("/"), args.pid, args.timeout_s))
        print(f"{state} {seconds:.1f}", flush=True)
        return {"ready": 0, "exited": 3, "timeout": 4}[state]
    if args.command == "random-llama":
        save_random_llama(args.out, vocab_size=args.vocab_size, num_layers=args.layers)
        print(f"{args.out}", flush=True)
        return 0
    checks = Checks()
    if args.command == "serve":
        run = asyncio.run(serve_checks(args, checks))
        run.save(args.out)
    else:
        args.out.write_text(json.dumps(hf_checks(args, checks)))
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
