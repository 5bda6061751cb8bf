"""When a request is greedy: the one rule, applied by the router's validation (which reports a seed
only for sampled requests) and by the shards' sampler (which runs no warper on a greedy row).

TGI's rule: a request samples when `do_sample` is set or any warper is active (temperature ≠ 1,
top_k > 0, top_p < 1, typical_p < 1; min_p > 0 is ours). Ours on top: a temperature below
MIN_TEMPERATURE (0 included, OpenAI's convention for greedy; TGI rejects 0) means argmax whatever
else is set: below it the scaled logits overflow a float and the softmax is NaN, and the limit of
ever smaller temperatures is argmax (vLLM does the same).
"""

from __future__ import annotations

MIN_TEMPERATURE = 1e-5


def argmax_temperature(temperature: float) -> bool:
    return 0.0 <= temperature < MIN_TEMPERATURE


def is_greedy(*, do_sample: bool, temperature: float, top_k: int, top_p: float, typical_p: float,
              min_p: float) -> bool:
    """Resolved values: top_k 0, top_p / typical_p 1.0 and min_p 0.0 mean off."""
    if argmax_temperature(temperature):
        return True
    warper = temperature != 1.0 or top_k > 0 or top_p < 1.0 or typical_p < 1.0 or min_p > 0.0
    return not (do_sample or warper)
