"""Model registry: `architectures[0]` → implementation, imported lazily.

The Llama-family fast path covers every architecture listed in FAST_PATH; any other causal LM
runs through transformers' own modeling code with our paged attention plugged in.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, GenerationConfig

from shard.models.base import CausalLM, ModelContext
from shard.weights import Weights

FAST_PATH = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "llama",
}


class UnsupportedModelError(ValueError):
    pass


def eos_token_ids(folder: Path, config) -> tuple[int, ...]:
    """EOS ids from config.json and generation_config.json (which may list several)."""
    ids: list[int] = []
    sources = [getattr(config, "eos_token_id", None)]
    if (folder / "generation_config.json").exists():
        sources.append(GenerationConfig.from_pretrained(folder).eos_token_id)
    for value in sources:
        for token in value if isinstance(value, list) else [value]:
            if token is not None and token not in ids:
                ids.append(int(token))
    return tuple(ids)


def get_model(folder: Path, ctx: ModelContext) -> CausalLM:
    raw = json.loads((folder / "config.json").read_text())
    architectures = raw.get("architectures") or []
    if not architectures:
        raise UnsupportedModelError(f"{folder}/config.json has no `architectures`; cannot pick an implementation")
    arch = architectures[0]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=ctx.trust_remote_code)
    eos = eos_token_ids(folder, config)
    if FAST_PATH.get(arch) == "llama":
        from shard.models.llama import LlamaModel

        weights = Weights(folder, ctx.tp, ctx.dtype, ctx.device)
        return LlamaModel(config, weights, ctx, eos).eval()
    from shard.models.transformers_fallback import TransformersModel

    return TransformersModel.load(folder, config, ctx, eos)
