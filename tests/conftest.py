"""Shared fixtures: tiny random models written to a temp dir, and an in-process engine."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

# Set before torch loads its OpenMP runtime (libgomp), which reads it once; the launchers and
# shards that tests start inherit it. By default an OpenMP thread waiting for work spins first:
# on 2 cores shared with a launcher's processes, or with another test run, the spinning thread
# takes the core that the thread it waits for needs, and steps take several times longer
# (tests/shard/test_smollm2.py next to one busy process: 289-341 s spinning, 41-89 s passive).
# The waiting policy changes no result, only how idle threads wait.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from shard.config import ShardConfig, default_cache_dir  # noqa: E402
from shard.distributed import TPGroup  # noqa: E402
from shard.engine import Engine  # noqa: E402
from shard.models import get_model  # noqa: E402
from shard.models.base import ModelContext  # noqa: E402
from pytgi_proto import generate_pb2 as pb  # noqa: E402

TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
)


def save_tiny(kind: str, folder: Path) -> Path:
    """A 2-layer random model of the given architecture, saved as safetensors."""
    import transformers

    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(**TINY, tie_word_embeddings=False, eos_token_id=127, bos_token_id=1)
        model = transformers.LlamaForCausalLM(config)
    elif kind == "qwen2":
        config = transformers.Qwen2Config(**TINY, tie_word_embeddings=True, eos_token_id=127)
        model = transformers.Qwen2ForCausalLM(config)
    elif kind == "qwen3":
        config = transformers.Qwen3Config(**TINY, head_dim=16, tie_word_embeddings=False, eos_token_id=127)
        model = transformers.Qwen3ForCausalLM(config)
    elif kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                                         eos_token_id=127, bos_token_id=127)
        model = transformers.GPT2LMHeadModel(config)
    elif kind == "gpt_neox":
        config = transformers.GPTNeoXConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            max_position_embeddings=512, eos_token_id=127)
        model = transformers.GPTNeoXForCausalLM(config)
    else:
        raise ValueError(kind)
    # Scale the random init up so logits are far from ties (default init gives near-uniform
    # distributions where float reordering could flip a greedy argmax).
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.mul_(4.0)
    model.eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("tiny-llama"))


def missing_kernel(what: str, possible_here: bool = True) -> NoReturn:
    """A compiled kernel that did not load: the test fails wherever it could have been built (a
    C++ compiler exists, the one torch's cpp_extension runs: $CXX, else c++) and under CI, whose
    set-up installs a compiler (`make test`), so the default path cannot go untested there; it is
    skipped elsewhere, or where `possible_here` is False (no such kernel for this CPU)."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if possible_here and (compiler or os.environ.get("CI")):
        where = f"with {compiler}" if compiler else "under CI, which must run the default path"
        pytest.fail(f"the {what} did not load {where} (see the warning above)")
    pytest.skip(f"no {what} here: no C++ compiler" if possible_here else f"no {what} for this CPU")


@pytest.fixture(scope="session")
def paged_kernel():
    """The compiled CPU paged-attention kernel (built once into the shared cache, as shards do)."""
    from shard.cpu_kernels import load_paged_attention

    kernel = load_paged_attention(default_cache_dir())
    if kernel is None:
        missing_kernel("CPU paged-attention kernel")
    return kernel


def make_config(model_id: str | None = None, block_size: int = 4) -> ShardConfig:
    return ShardConfig(
        model_id=model_id, revision=None, uds_path="/tmp/pytgi-test", rank=0, world_size=1,
        master_addr="localhost", master_port=29500, device=torch.device("cpu"), dtype=torch.float32,
        block_size=block_size, memory_fraction=0.05, cache_dir=Path("/tmp/pytgi-cache"), hub_cache_dir=None,
        offline=True, trust_remote_code=False, num_threads=2, json_output=False, log_level="INFO",
    )


def make_engine(folder: Path, block_size: int = 4, num_blocks_tokens: int = 4096, quantize: str | None = None,
                cpu_kernel=None, fused_ops=None) -> Engine:
    """An in-process engine; `cpu_kernel` (the `paged_kernel` fixture) selects the paged backend,
    `fused_ops` (test_fused_ops.py's fixture) the compiled per-layer kernels."""
    config = make_config(str(folder), block_size)
    ctx = ModelContext(TPGroup(), config.device, config.dtype, block_size, quantize=quantize, cpu_kernel=cpu_kernel,
                       fused_ops=fused_ops)
    model = get_model(folder, ctx)
    engine = Engine(config, model, TPGroup(), folder)
    engine.warmup(pb.WarmupRequest(max_batch_total_tokens=num_blocks_tokens, max_prefill_tokens=64))
    return engine
