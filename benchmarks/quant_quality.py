"""Quality of `--quantize int8|int4|gguf` against fp32 on a fixed prompt set (in-process, no server).

For each prompt (the load generator's default set in the model's chat template):
* fp32 greedy continuation of `--new-tokens` tokens: the reference;
* teacher-forced on prompt + reference: how often the quantized model's argmax is the
  reference token (greedy agreement) and the mean logprob it gives the reference tokens
  minus fp32's own (the logprob gap; negative = the quantized model finds the text less likely);
* free-running greedy: sequences identical to the reference, and the mean length of the common
  prefix (one early flip changes everything after it, so this is the strictest view).

For a GGUF model the fp32 reference IS the exact dequantized file (model_source.convert_gguf), so
"gguf" measures what serving the file natively costs against its own exact weights. Two
diagnostic variants split that cost: "gguf-dense" multiplies in fp32 by exactly the weights the
int4 kernel holds (its bf16-rounded scales and zeros; fp32 activations), isolating the scale
rounding; "gguf-f32-head" keeps the Q8_0 LM head as exact fp32, and "gguf-int8-head" requantizes
it per row for fbgemm's int8 kernel (the alternative to the split-nibble int4 head).

    python -m benchmarks.quant_quality [--model-id DIR] [--methods int8 int4 gguf] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.loadgen import DEFAULT_PROMPTS
from shard.attention import SeqStep, build_metadata
from shard.config import build_config
from shard.distributed import TPGroup
from shard.kv_cache import KVCache
from shard.layers.quant import DenseLinear, Int4Linear, Int8DynamicLinear
from shard.model_source import resolve_model
from shard.models import get_model
from shard.models.base import ModelContext

BLOCK = 16
METHODS = ("int8", "int4", "gguf", "gguf-dense", "gguf-f32-head", "gguf-int8-head")


def _dense_int4(model) -> None:
    """gguf-dense: every int4 layer replaced by fp32 dense over exactly the kernel's weights."""
    for module in list(model.modules()):
        if isinstance(getattr(module, "linear", None), Int4Linear):
            module.linear = DenseLinear(module.linear.dequantize(), module.linear.bias)


def _f32_head(model) -> None:
    """gguf-f32-head: the LM head as the embedding's exact fp32 table (tied SmolLM2)."""
    model.lm_head.linear = DenseLinear(model.embed_tokens.weight, None)


def _int8_head(model) -> None:
    """gguf-int8-head: the LM head requantized per row (fbgemm W8A8) from the exact table."""
    model.lm_head.linear = Int8DynamicLinear(model.embed_tokens.weight, None)


# variant → (the --quantize it loads with, what is changed after loading)
_VARIANTS = {"gguf-dense": ("gguf", _dense_int4), "gguf-f32-head": ("gguf", _f32_head),
             "gguf-int8-head": ("gguf", _int8_head)}


@dataclass(frozen=True, slots=True)
class MethodQuality:
    method: str
    greedy_agreement: float  # teacher-forced argmax == reference token
    logprob_gap_mean: float  # mean(quantized logprob - fp32 logprob) of the reference tokens
    logprob_gap_abs_mean: float
    identical_sequences: int
    prompts: int
    common_prefix_mean: float
    load_s: float


class Runner:
    """One model with its own cache: full-sequence forwards and greedy decoding, one sequence at a time."""

    def __init__(self, folder: Path, method: str | None, max_tokens: int):
        start = time.perf_counter()
        quantize, adjust = _VARIANTS.get(method, (method, None))
        ctx = ModelContext(TPGroup(), torch.device("cpu"), torch.float32, BLOCK, quantize=quantize)
        self.model = get_model(folder, ctx)
        if adjust is not None:
            adjust(self.model)
        self.load_s = time.perf_counter() - start
        self.blocks = list(range(1, -(-max_tokens // BLOCK) + 1))
        self.cache = KVCache(self.model.info.kv_spec, len(self.blocks) + 1, torch.device("cpu"))

    def _forward(self, ids: list[int], start: int, all_logits: bool) -> torch.Tensor:
        step = SeqStep(q_len=len(ids), kv_len=start + len(ids), blocks=self.blocks)
        meta = build_metadata([step], BLOCK, torch.device("cpu"))
        positions = torch.arange(start, start + len(ids))
        index = None if all_logits else torch.tensor([len(ids) - 1])
        return self.model.forward(torch.tensor(ids), positions, self.cache, meta, index).log_softmax(-1)

    def logprobs(self, ids: list[int]) -> torch.Tensor:  # [len(ids), vocab]
        return self._forward(ids, 0, all_logits=True)

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        out = [int(self._forward(prompt, 0, all_logits=False)[-1].argmax())]
        for _ in range(new_tokens - 1):
            out.append(int(self._forward(out[-1:], len(prompt) + len(out) - 1, all_logits=False)[-1].argmax()))
        return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def measure(folder: Path, methods: list[str], new_tokens: int) -> list[MethodQuality]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
               for p in DEFAULT_PROMPTS]
    max_tokens = max(len(p) for p in prompts) + new_tokens
    reference = Runner(folder, None, max_tokens)
    continuations = [reference.greedy(p, new_tokens) for p in prompts]
    ref_logprobs = [reference.logprobs(p + c) for p, c in zip(prompts, continuations)]
    results = []
    for method in methods:
        runner = Runner(folder, method, max_tokens)
        agree, gaps, prefixes, identical = [], [], [], 0
        for prompt, cont, ref in zip(prompts, continuations, ref_logprobs):
            got = runner.logprobs(prompt + cont)
            rows = torch.arange(len(prompt) - 1, len(prompt) + len(cont) - 1)
            target = torch.tensor(cont)
            agree += (got[rows].argmax(-1) == target).tolist()
            gaps += (got[rows, target] - ref[rows, target]).tolist()
            free = runner.greedy(prompt, new_tokens)
            prefixes.append(common_prefix(free, cont))
            identical += free == cont
        results.append(MethodQuality(
            method, sum(agree) / len(agree), statistics.fmean(gaps), statistics.fmean(abs(g) for g in gaps),
            identical, len(prompts), statistics.fmean(prefixes), runner.load_s,
        ))
    return results


def render(results: list[MethodQuality], new_tokens: int) -> str:
    lines = [f"| method | greedy agreement (teacher-forced) | logprob gap mean / mean abs | identical {new_tokens}-token "
             "sequences | mean common prefix | load s |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.method} | {r.greedy_agreement:.1%} | {r.logprob_gap_mean:+.3f} / {r.logprob_gap_abs_mean:.3f} "
                     f"| {r.identical_sequences}/{r.prompts} | {r.common_prefix_mean:.1f} | {r.load_s:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-id", default=None, help="local model folder (default: the bundled SmolLM2)")
    parser.add_argument("--methods", nargs="+", default=["int8", "int4"], choices=METHODS)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # The shard's own cache settings (HF_HOME / PYTGI_CACHE), so the converted bundled model is reused.
    config = build_config(args.model_id, revision=None, uds_path="", sharded=False, dtype=None,
                          trust_remote_code=False, json_output=False, log_level="WARNING", device="cpu")
    source = resolve_model(config.model_id, cache_dir=config.cache_dir, hub_cache_dir=config.hub_cache_dir,
                           offline=config.offline, progress=print)
    results = measure(source.path, args.methods, args.new_tokens)
    print(render(results, args.new_tokens))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()
