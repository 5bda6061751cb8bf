"""Closed-loop HTTP load generator for streaming LLM servers (this one or any OpenAI-compatible peer).

    python -m benchmarks.loadgen --url http://127.0.0.1:3000 --concurrency 8 --requests 200 --max-tokens 128

Each of `--concurrency` workers sends one streaming request at a time until `--requests` measured
requests are done (after `--warmup` unmeasured ones). Per request it records TTFT (first non-empty
content chunk / token event), inter-token latencies (gaps between content chunks), end-to-end time,
output tokens (from usage / details when sent, else the number of content chunks) and the finish
reason. Only loopback URLs are accepted. Exit status: 0, or 2 when a request failed or the
arguments were refused.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import TextIO
from urllib.parse import urlsplit

import aiohttp

from benchmarks.report import Stats, format_table

MAX_REQUESTS = 100_000
ERROR_SAMPLES = 5
BODY_EXCERPT = 300

DEFAULT_PROMPTS = (
    "What is the capital of France?", "Explain photosynthesis in simple terms.",
    "Write a haiku about the ocean.", "How does a hash table work?", "Name three primary colors.",
    "What causes the seasons on Earth?", "Give me a recipe for pancakes.", "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet.", "What is the difference between TCP and UDP?",
    "How do vaccines work?", "Translate 'good morning' into Spanish.", "What is a prime number?",
    "Describe the water cycle.", "Write a limerick about a cat.", "What is machine learning?",
    "How many planets are in the solar system?", "Explain recursion with an example.",
    "What are the benefits of exercise?", "Who painted the Mona Lisa?",
)
SHORT_PROMPTS = ("Hi", "Hello!", "2+2=?", "Say yes.", "Count to five.", "Name a color.")
LONG_CONTEXT = (
    "The history of the printing press begins in the middle of the fifteenth century, when Johannes "
    "Gutenberg, a goldsmith from Mainz, combined several existing technologies into a single system "
    "for producing books. Movable type had been used in East Asia for centuries, with ceramic and later "
    "metal characters in China and Korea, but the large number of characters in those writing systems "
    "limited its advantages over woodblock printing. Gutenberg's contribution was a hand mould that "
    "could cast uniform metal type quickly, an oil-based ink that adhered to metal, and a screw press "
    "adapted from those used to make wine and olive oil. Together these allowed a small workshop to "
    "produce hundreds of identical copies of a text in the time a scribe needed for one. The Gutenberg "
    "Bible, completed around 1455, demonstrated the quality the method could reach. Within fifty years "
    "printing shops had opened in more than two hundred European cities, and millions of volumes were "
    "in circulation. Prices fell, literacy spread beyond clergy and nobility, and scholars could compare "
    "identical editions rather than divergent manuscripts, which encouraged standardized spelling, "
    "grammar and scientific notation. Pamphlets carried the arguments of the Reformation across borders "
    "faster than authorities could suppress them, and merchants relied on printed tables, maps and "
    "almanacs. Governments began to license printers and censor books, while authors and publishers "
    "argued over who owned a text, debates that eventually produced copyright law. Over the following "
    "centuries the basic design was refined: iron frames replaced wood, steam power drove cylinders, "
    "and rotary presses fed by continuous rolls of paper made daily newspapers possible. Typesetting "
    "itself was mechanized by the Linotype machine in the 1880s, and photographic and digital methods "
    "later displaced metal type altogether. Historians still debate how much of the early modern "
    "transformation of Europe should be credited to printing, but few dispute that it changed how "
    "knowledge was stored, shared and challenged."
)
LONG_QUESTIONS = (
    "Who is credited with the printing press?", "What three technologies did Gutenberg combine?",
    "How fast did printing spread in Europe?", "How did printing affect the Reformation?",
    "What later inventions refined the press?",
)

# Input-grounded tasks: the answer copies much of the prompt (rewrite, extract, code edit), which is
# where n-gram speculation (`--speculate`) drafts tokens that the model accepts.
_CODE = ("def moving_average(values, window):\n    result = []\n    for i in range(len(values) - window + 1):\n"
         "        chunk = values[i:i + window]\n        result.append(sum(chunk) / window)\n    return result\n")
_PARAGRAPH = LONG_CONTEXT[:700]
GROUNDED_PROMPTS = (
    f"Repeat the following text exactly, word for word:\n\n{_PARAGRAPH}",
    f"Rewrite this paragraph with British spelling, changing nothing else:\n\n{_PARAGRAPH}",
    f"Add type hints to this Python function and return the whole function:\n\n```python\n{_CODE}```",
    f"Rename the variable `chunk` to `window_values` in this code and return the full code:\n\n```python\n{_CODE}```",
    f"Quote the sentences of this text that mention a century, verbatim, one per line:\n\n{LONG_CONTEXT}",
    "Turn this list into a Markdown bulleted list, keeping every item as written: apples, pears, plums, "
    "cherries, grapes, figs, dates, lemons, limes, oranges, peaches, apricots.",
)


def prompts_for(name: str) -> tuple[str, ...]:
    if name == "short":
        return SHORT_PROMPTS
    if name == "long":
        return tuple(f"{LONG_CONTEXT}\n\nQuestion: {q}" for q in LONG_QUESTIONS)
    if name == "prefill":
        # ~512 prompt tokens each (SmolLM2 tokenizer, chat template included), and each distinct
        # from its first words so no server can answer from a prompt cache: a prefill measurement.
        extra = LONG_CONTEXT[: len(LONG_CONTEXT) // 4]
        return tuple(f"Document {i}. {LONG_CONTEXT} {extra}\n\nSummarize document {i}." for i in range(64))
    if name == "grounded":
        return GROUNDED_PROMPTS
    if name == "shared-prefix":
        # The same ~1,000-token context, then a different question: what a prefix cache is for.
        context = " ".join([LONG_CONTEXT] * 2 + [LONG_CONTEXT[: len(LONG_CONTEXT) * 2 // 5]])
        return tuple(f"{context}\n\nQuestion: {q}" for q in LONG_QUESTIONS)
    return DEFAULT_PROMPTS


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(slots=True)
class RequestResult:
    ok: bool = False
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int | None = None  # from usage / details, when the server reports it
    finish_reason: str | None = None
    error: str | None = None


@dataclass(slots=True)
class Summary:
    requests: int
    ok: int
    errors: int
    wall_s: float
    output_tokens: int
    output_tok_s: float
    req_s: float
    ttft_ms: Stats
    itl_ms: Stats
    e2e_ms: Stats
    finish_reasons: dict[str, int]
    error_samples: list[str]
    prompt_tokens_mean: float | None = None
    # In completion order: [ttft_ms, e2e_ms, prompt_tokens, output_tokens] of each ok request.
    per_request: list[list] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("ttft_ms", "itl_ms", "e2e_ms"):  # NaN (no samples) becomes null: strict JSON
            out[key] = {k: None if isinstance(v, float) and math.isnan(v) else v
                        for k, v in out[key].to_dict().items()}
        return out

    def table(self) -> str:
        rows = [[name, s.count, s.mean, s.p50, s.p90, s.p99, s.max]
                for name, s in (("ttft_ms", self.ttft_ms), ("itl_ms", self.itl_ms), ("e2e_ms", self.e2e_ms))]
        latency = format_table(["metric", "n", "mean", "p50", "p90", "p99", "max"], rows)
        totals = format_table(
            ["requests", "ok", "errors", "wall_s", "out_tokens", "out_tok/s", "req/s"],
            [[self.requests, self.ok, self.errors, self.wall_s, self.output_tokens, self.output_tok_s, self.req_s]],
            digits=2,
        )
        return f"{totals}\n\n{latency}"


def build_request(args: argparse.Namespace, prompt: str, index: int = 0) -> tuple[str, dict]:
    """Request number `index` of a phase: with several `--model` names, they take turns."""
    base = args.url.rstrip("/")
    extra = json.loads(args.extra_body) if args.extra_body else {}
    models = args.model.split(",")
    if args.api == "openai":
        body = {
            "model": models[index % len(models)], "messages": [{"role": "user", "content": prompt}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": args.max_tokens,
            "temperature": args.temperature,
        }
        if args.ignore_eos:
            body["ignore_eos"] = True
        return f"{base}/v1/chat/completions", {**body, **extra}
    params = {"max_new_tokens": args.max_tokens, "details": True}
    if args.temperature > 0:
        params.update(temperature=args.temperature, do_sample=True)
    return f"{base}/generate_stream", {"inputs": prompt, "parameters": {**params, **extra}}


def handle_event(api: str, event: dict, result: RequestResult) -> bool:
    """Update `result` from one SSE payload; True when it carried a content chunk / token."""
    if "error" in event:
        raise RuntimeError(f"stream error: {json.dumps(event)[:BODY_EXCERPT]}")
    if api == "openai":
        if event.get("usage"):
            result.output_tokens = int(event["usage"].get("completion_tokens") or 0)
            result.prompt_tokens = event["usage"].get("prompt_tokens")
        content = False
        for choice in event.get("choices") or []:
            content = content or bool((choice.get("delta") or {}).get("content"))
            result.finish_reason = choice.get("finish_reason") or result.finish_reason
        return content
    if event.get("details"):
        result.output_tokens = int(event["details"].get("generated_tokens") or 0)
        result.finish_reason = event["details"].get("finish_reason")
    return event.get("token") is not None


async def one_request(session: aiohttp.ClientSession, args: argparse.Namespace, prompt: str,
                      index: int = 0) -> RequestResult:
    result, chunks, last = RequestResult(), 0, 0.0
    url, body = build_request(args, prompt, index)
    start = time.perf_counter()
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=args.timeout)) as resp:
            if resp.status != 200:
                text = await resp.text(errors="replace")
                raise RuntimeError(f"HTTP {resp.status}: {text[:BODY_EXCERPT]}")
            async for raw in resp.content:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                if not handle_event(args.api, json.loads(data), result):
                    continue
                now = time.perf_counter()
                if result.ttft is None:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last, chunks = now, chunks + 1
        result.ok = True
    except Exception as exc:  # noqa: BLE001 - every failure is one counted error
        result.error = f"{type(exc).__name__}: {exc}"[:BODY_EXCERPT] if str(exc) else type(exc).__name__
    result.e2e = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    return result


async def run_phase(args: argparse.Namespace, count: int, offset: int, deadline: float) -> list[RequestResult]:
    prompts = prompts_for(args.prompt_set)
    results: list[RequestResult] = []
    counter = iter(range(count))
    connector = aiohttp.TCPConnector(limit=0, force_close=not args.keep_alive)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def worker() -> None:
            for i in counter:
                if time.perf_counter() >= deadline:
                    return
                results.append(await one_request(session, args, prompts[(offset + i) % len(prompts)], offset + i))

        await asyncio.gather(*(worker() for _ in range(min(args.concurrency, max(count, 1)))))
    return results


def summarize(results: list[RequestResult], wall_s: float) -> Summary:
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    errors = [r.error or "" for r in results if not r.ok]
    return Summary(
        requests=len(results), ok=len(ok), errors=len(errors), wall_s=wall_s, output_tokens=tokens,
        output_tok_s=tokens / wall_s if wall_s > 0 else 0.0, req_s=len(ok) / wall_s if wall_s > 0 else 0.0,
        ttft_ms=Stats.of([r.ttft * 1e3 for r in ok if r.ttft is not None]),
        itl_ms=Stats.of([g * 1e3 for r in ok for g in r.itl]),
        e2e_ms=Stats.of([r.e2e * 1e3 for r in ok]),
        finish_reasons=dict(Counter(r.finish_reason or "none" for r in ok)),
        error_samples=errors[:ERROR_SAMPLES],
        prompt_tokens_mean=statistics.fmean(prompts) if (prompts := [r.prompt_tokens for r in ok if r.prompt_tokens]) else None,
        per_request=[[None if r.ttft is None else round(r.ttft * 1e3, 2), round(r.e2e * 1e3, 2), r.prompt_tokens,
                      r.output_tokens] for r in ok],
    )


async def run_load(args: argparse.Namespace) -> Summary:
    deadline = time.perf_counter() + args.max_duration
    if args.warmup:
        await run_phase(args, args.warmup, 0, deadline)
    start = time.perf_counter()
    results = await run_phase(args, args.requests, args.warmup, deadline)
    return summarize(results, time.perf_counter() - start)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:3000", help="server base URL (loopback only)")
    p.add_argument("--api", choices=("openai", "tgi"), default="openai",
                   help="openai: /v1/chat/completions; tgi: /generate_stream")
    p.add_argument("--model", default="tgi",
                   help="`model` field of OpenAI requests; several, comma-separated, take turns (LoRA adapters)")
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight (closed loop)")
    p.add_argument("--requests", type=int, default=100, help=f"measured requests (<= {MAX_REQUESTS})")
    p.add_argument("--warmup", type=int, default=0, help="unmeasured requests sent first")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ignore-eos", action="store_true", help='send "ignore_eos": true (openai only)')
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--prompt-set", choices=("default", "short", "long", "prefill", "shared-prefix", "grounded"),
                   default="default",
                   help="prefill: distinct ~512-token prompts; shared-prefix: one ~1k-token context, "
                        "different questions (with --concurrency 1 the per-request TTFTs in --json-out show the "
                        "cache); grounded: rewrite / extract / code-edit tasks whose answer copies the prompt")
    p.add_argument("--extra-body", default=None,
                   help="JSON object merged into the body (openai) or `parameters` (tgi)")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, s")
    p.add_argument("--max-duration", type=float, default=900.0, help="stop sending new requests after this, s")
    p.add_argument("--keep-alive", action="store_true", help="reuse connections (default: one per request)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--json-out", default=None, help="also write the JSON summary to this file")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> str | None:
    """Why the arguments are refused, or None."""
    if not is_loopback_url(args.url):
        return f"refusing {args.url!r}: only loopback hosts (127.0.0.0/8, localhost, ::1) may be loaded"
    if not 1 <= args.requests <= MAX_REQUESTS:
        return f"--requests must be in 1..{MAX_REQUESTS}"
    if args.concurrency < 1 or args.warmup < 0 or args.max_tokens < 1:
        return "--concurrency and --max-tokens must be >= 1, --warmup >= 0"
    if args.ignore_eos and args.api != "openai":
        return "--ignore-eos is only supported with --api openai"
    if args.extra_body is not None:
        try:
            if not isinstance(json.loads(args.extra_body), dict):
                return "--extra-body must be a JSON object"
        except json.JSONDecodeError as exc:
            return f"--extra-body is not valid JSON: {exc}"
    return None


async def amain(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = parse_args(argv)
    if problem := check_args(args):
        print(f"loadgen: {problem}", file=sys.stderr)
        return 2
    summary = await run_load(args)
    payload = json.dumps(summary.to_dict(), indent=2)
    print(payload if args.json else summary.table(), file=out)
    if summary.error_samples and not args.json:
        print("errors (first few):", *summary.error_samples, sep="\n  ", file=out)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            f.write(payload + "\n")
    return 2 if summary.errors else 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(amain(argv))


if __name__ == "__main__":
    sys.exit(main())
