"""The fused CPU kernels (shard/csrc/fused_ops.cpp) against the torch ops they replace: bit for
bit on odd sizes, one row and many, fp32 and bf16; the model with and without them; the
fallback when they cannot be built or cannot reproduce torch here; torch's other ISAs."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys

import pytest
import torch

from shard import cpu_kernels
from shard.layers.activation import gated
from shard.layers.norm import RMSNorm, rms_norm_reference
from shard.layers.rotary import apply_rotary
from shard.model_source import resolve_model
from tests.conftest import default_cache_dir, make_engine, missing_kernel
from tests.shard.helpers import BlockPool, chat, generate, greedy_request

SIZES = (1, 7, 16, 67, 576, 1000, 4097)  # below one vector, tails, SmolLM2's width, a cascade level
ROWS = (1, 5, 64)
DTYPES = (torch.float32, torch.bfloat16)


@pytest.fixture(scope="session")
def fused_ops():
    """The compiled kernels (built once into the shared cache, as shards do). On x86-64 a failed
    build or a failed self-check fails the tests that need them (tests/conftest.py)."""
    ops = cpu_kernels.load_fused_ops(default_cache_dir())
    if ops is None:
        missing_kernel("fused CPU kernels", possible_here=platform.machine() in {"x86_64", "AMD64"})
    return ops


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Stricter than torch.equal: -0.0 differs from 0.0."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[a.dtype]
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_is_bitwise_torch(fused_ops, dtype):
    generator = torch.Generator().manual_seed(1)
    for n in SIZES:
        weight = (torch.rand(n, generator=generator) + 0.5).to(dtype)
        norm = RMSNorm(weight, 1e-5)
        for rows in ROWS:
            x = (3 * torch.randn(rows, n, generator=generator)).to(dtype)
            residual = torch.randn(rows, n, generator=generator).to(dtype)
            expected, expected_residual = rms_norm_reference(x, residual, weight, 1e-5)
            normed, new_residual = norm(x, residual, fused_ops)
            assert new_residual is residual, "the residual is updated in place"
            assert _bits_equal(normed, expected) and _bits_equal(residual, expected_residual), (n, rows)
            expected, _ = rms_norm_reference(x, None, weight, 1e-6)
            normed, passed = RMSNorm(weight, 1e-6)(x, None, fused_ops)
            assert _bits_equal(normed, expected) and passed is x, (n, rows)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_is_bitwise_torch(fused_ops, dtype):
    generator = torch.Generator().manual_seed(2)
    act = gated("silu")
    for n in (1, 7, 31, 33, 64, 65, 1536, 1537):  # tails of torch's 2-vector loop
        for rows in ROWS:
            gate_up = (4 * torch.randn(rows, 2 * n, generator=generator)).to(dtype)
            assert _bits_equal(act(gate_up, fused_ops), act(gate_up)), (n, rows)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_in_place_is_bitwise_torch(fused_ops, dtype):
    generator = torch.Generator().manual_seed(3)
    for tokens, heads, kv_heads, dim in ((1, 9, 3, 64), (7, 5, 2, 6), (64, 9, 3, 64), (3, 4, 4, 128)):
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=generator).to(dtype)
        q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)  # views, as in the model
        q, k = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim)
        v_before = v.clone()
        cos, sin = (torch.randn(tokens, 1, dim // 2, generator=generator).to(dtype) for _ in range(2))
        expected_q, expected_k = apply_rotary(q, k, cos, sin)
        rotated_q, rotated_k = apply_rotary(q, k, cos, sin, fused_ops)
        assert rotated_q.data_ptr() == q.data_ptr() and rotated_k.data_ptr() == k.data_ptr()  # in place
        assert _bits_equal(rotated_q, expected_q) and _bits_equal(rotated_k, expected_k)
        assert torch.equal(v, v_before)


def test_many_rows_use_every_thread_and_stay_exact(fused_ops):
    """512 rows cross the kernels' parallel threshold (a prefill); the result must not change."""
    generator = torch.Generator().manual_seed(4)
    x, residual = (torch.randn(512, 576, generator=generator) for _ in range(2))
    weight = torch.rand(576, generator=generator) + 0.5
    expected, expected_residual = rms_norm_reference(x, residual, weight, 1e-5)
    assert _bits_equal(fused_ops.rms_norm(x, residual, weight, 1e-5), expected)
    assert _bits_equal(residual, expected_residual)
    gate_up = torch.randn(512, 3072, generator=generator)
    assert _bits_equal(fused_ops.silu_mul(gate_up), gated("silu")(gate_up))


def test_unsupported_inputs_take_the_torch_path(fused_ops):
    """Mixed dtypes, a non-contiguous last dim, another activation: torch ops, same results."""
    x = torch.randn(3, 64)
    norm = RMSNorm(torch.rand(64, dtype=torch.bfloat16), 1e-5)  # weight dtype differs from x
    assert torch.equal(norm(x, None, fused_ops)[0], norm(x)[0])
    strided = torch.randn(64, 3).t()  # [3, 64] with a last-dim stride of 3
    norm = RMSNorm(torch.rand(64), 1e-5)
    assert torch.equal(norm(strided, None, fused_ops)[0], norm(strided)[0])
    gate_up = torch.randn(2, 10)
    assert torch.equal(gated("gelu")(gate_up, fused_ops), gated("gelu")(gate_up))


def test_no_compiler_means_torch_ops_with_one_warning(tmp_path, monkeypatch, caplog):
    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension\nc++: command not found")

    monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
    with caplog.at_level(logging.WARNING, logger="shard.cpu_kernels"):
        assert cpu_kernels.load_fused_ops(tmp_path) is None
    assert "c++: command not found" in caplog.text and "using torch ops" in caplog.text


def test_a_stale_build_lock_does_not_block_a_start(fused_ops):
    """A shard killed while torch's build lock was held leaves the lock file behind; torch's
    loader then waits forever. A start with a built library must not take that lock."""
    key = cpu_kernels.build_key(cpu_kernels.FUSED_SOURCE.read_bytes(), cpu_kernels.fused_flags())
    lock = default_cache_dir() / "kernels" / f"fused_ops-{key}" / "lock"
    assert lock.parent.is_dir() and not lock.exists()
    lock.touch()
    try:
        code = ("import sys; from shard import cpu_kernels; from shard.config import default_cache_dir; "
                "sys.exit(cpu_kernels.load_fused_ops(default_cache_dir()) is None)")
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    finally:
        lock.unlink()


def test_kernels_that_do_not_reproduce_torch_are_refused(fused_ops, monkeypatch, caplog):
    """The load-time self-check: a build whose sum order differs from torch's (here: no lane count
    matches) is not used."""
    monkeypatch.setattr(cpu_kernels, "_reproduces_torch", lambda ops: False)
    with caplog.at_level(logging.WARNING, logger="shard.cpu_kernels"):
        assert cpu_kernels.load_fused_ops(default_cache_dir()) is None
    assert "bit for bit" in caplog.text


def test_unmirrored_torch_isa_is_refused(monkeypatch, caplog):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "SVE256")
    with caplog.at_level(logging.WARNING, logger="shard.cpu_kernels"):
        assert cpu_kernels.load_fused_ops(default_cache_dir()) is None
    assert "SVE256" in caplog.text


@pytest.mark.skipif(platform.machine() not in {"x86_64", "AMD64"}, reason="x86-64 ISAs")
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_torch_on_a_narrower_isa(fused_ops, capability):
    """An AVX2-only machine (or none): torch's kernels there use 8-lane vectors and another exp.
    ATEN_CPU_CAPABILITY makes torch run them here; the kernels must follow it bit for bit (the
    load-time self-check) and the library is the one this machine built."""
    code = ("import sys, torch; from shard import cpu_kernels; from shard.config import default_cache_dir; "
            "ops = cpu_kernels.load_fused_ops(default_cache_dir()); "
            "print(torch.backends.cpu.get_cpu_capability(), None if ops is None else (ops.isa, ops.lanes)); "
            "sys.exit(ops is None)")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split()[0] == capability.upper()


# --- the bundled model with and without the kernels --------------------------------------------

QUESTIONS = ["What is deep learning?", "Write a haiku about the sea.", "Who wrote Hamlet?", "Name a color."]
BLOCK = 16


@pytest.fixture(scope="module")
def smol_engines(fused_ops, paged_kernel):
    source = resolve_model(None, cache_dir=default_cache_dir(), offline=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path)
    plain = make_engine(source.path, block_size=BLOCK, num_blocks_tokens=8192, cpu_kernel=paged_kernel)
    fused = make_engine(source.path, block_size=BLOCK, num_blocks_tokens=8192, cpu_kernel=paged_kernel,
                        fused_ops=fused_ops)
    assert plain.model.shared.kernels is None and fused.model.shared.kernels is fused_ops
    return tokenizer, plain, fused


@pytest.mark.slow
def test_model_logits_are_bitwise_the_same(smol_engines):
    """One prefill and one decode forward of the fp32 model: identical logits with and without."""
    from shard.attention import SeqStep, build_metadata
    from shard.kv_cache import KVCache

    _, plain, fused = smol_engines
    cpu = torch.device("cpu")
    logits = []
    for engine in (plain, fused):
        model = engine.model
        spec = model.info.kv_spec
        cache = KVCache(spec, 8, cpu)
        prompt = torch.arange(5, 45)
        meta = build_metadata([SeqStep(40, 40, [1, 2, 3])], spec.block_size, cpu, model.backend.layout)
        first = model.forward(prompt, torch.arange(40), cache, meta, torch.tensor([39]))
        meta = build_metadata([SeqStep(1, 41, [1, 2, 3])], spec.block_size, cpu, model.backend.layout)
        second = model.forward(first.argmax(-1), torch.tensor([40]), cache, meta, None)
        logits.append((first, second))
    assert torch.equal(logits[0][0], logits[1][0]) and torch.equal(logits[0][1], logits[1][1])


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~3 min measured on 2 busy cores (beside other test runs)
def test_greedy_outputs_are_the_same_and_batch_invariant(smol_engines):
    tokenizer, plain, fused = smol_engines
    prompts = [chat(tokenizer, q) for q in QUESTIONS]
    together = {}
    for name, engine in (("plain", plain), ("fused", fused)):
        pool = BlockPool(BLOCK)
        together[name] = generate(engine, [greedy_request(i, p, 24, pool) for i, p in enumerate(prompts)])
    assert together["plain"] == together["fused"]
    for i, prompt in enumerate(prompts[:2]):  # alone, each request's tokens are the ones it got in the batch
        alone = generate(fused, [greedy_request(i, prompt, 24, BlockPool(BLOCK))], batch_id=10 + i)
        assert alone[i] == together["fused"][i]
