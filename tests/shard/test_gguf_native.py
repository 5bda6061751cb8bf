"""GGUF weights served natively (`--quantize gguf`): block decoding, llama.cpp's q/k row
permutation, the kernels built from the file's own scales, the default, batch invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize
from safetensors import safe_open
from torch.nn import functional as F

from shard.config import default_cache_dir
from shard.distributed import TPGroup
from shard.gguf_weights import GgufTensors, decode_blocks, read_header, unpermute_rows
from shard.layers.quant import (
    GGUF, DenseLinear, Int4Linear, cat_weights, choose_quantize, make_linear,
)
from shard.model_source import bundled_gguf_path, gguf_origin, resolve_model
from shard.weights import Weights
from tests.conftest import make_engine
from tests.shard.helpers import BlockPool, chat, generate, greedy_request

BLOCK = 16


@pytest.fixture(scope="module")
def bundled():
    """(the GGUF file, its converted folder) of the bundled SmolLM2."""
    source = resolve_model(None, cache_dir=default_cache_dir(), offline=True)
    return bundled_gguf_path(), source.path


# ------------------------------------------------------------------------------- block decoding


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0"])
def test_decode_synthetic_blocks_matches_gguf(type_name):
    qtype = GGMLQuantizationType[type_name]
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((48, 128)) * rng.uniform(0.01, 3, (48, 1))).astype(np.float32)
    weights[0, :32] = 0.0  # an all-zero block (scale 0)
    weights[1, 32:64] = 5.0  # a constant block
    raw = quantize(weights, qtype)
    got = decode_blocks(type_name, raw)
    assert got.kind == type_name.lower() and got.shape == (48, 128)
    assert torch.equal(got.dequantize(), torch.from_numpy(dequantize(raw, qtype)))


def test_decode_bundled_tensors_matches_gguf(bundled):
    gguf_file, _ = bundled
    seen = set()
    for tensor in GGUFReader(gguf_file).tensors:
        kind = tensor.tensor_type.name
        if kind in ("Q4_1", "Q8_0") and (kind not in seen or tensor.name.startswith("blk.29.")):
            seen.add(kind)
            got = decode_blocks(kind, tensor.data).dequantize()
            assert torch.equal(got, torch.from_numpy(dequantize(tensor.data, tensor.tensor_type))), tensor.name
    assert seen == {"Q4_1", "Q8_0"}  # the bundled file's linears and its (tied) embedding


def test_header_reader_matches_gguf_reader(bundled):
    gguf_file, _ = bundled
    reader = GGUFReader(gguf_file)
    fields, infos = read_header(gguf_file)
    assert [(t.name, t.type_name, t.shape, t.offset) for t in infos] == [
        (t.name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)), int(t.data_offset))
        for t in reader.tensors]
    for key in ("general.architecture", "llama.attention.head_count", "llama.attention.head_count_kv"):
        assert fields[key] == reader.fields[key].contents()


# ----------------------------------------------------------------------------- row permutation


def test_unpermute_rows_is_transformers_inverse():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rows = np.arange(12 * 4, dtype=np.float32).reshape(12, 4)
    expected = LlamaTensorProcessor()._reverse_permute_weights(rows, 3, 3)
    assert np.array_equal(rows[unpermute_rows(12, 3).numpy()], expected)


def test_native_tensors_equal_the_dequantized_checkpoint(bundled):
    """Under HF names, with q/k rows un-permuted, the file's blocks dequantize to exactly the
    tensors transformers' GGUF loader wrote."""
    gguf_file, folder = bundled
    native = GgufTensors(gguf_file)
    with safe_open(folder / "model.safetensors", framework="pt") as dense:
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight",
                     "model.layers.7.self_attn.v_proj.weight", "model.layers.29.mlp.down_proj.weight",
                     "model.embed_tokens.weight"):
            assert torch.equal(native.get(name).dequantize(), dense.get_tensor(name)), name
    assert native.get("model.layers.0.input_layernorm.weight") is None  # F32: served from the dense copy
    assert native.get("lm_head.weight") is None  # tied: the file has no output.weight


def test_native_layer_matches_dense_layer(bundled):
    """q/k/v fused from the file's blocks, in the int4 kernel, against the fp32 dense layer:
    equal within bf16 (activations, scales and output are rounded to bf16)."""
    gguf_file, folder = bundled
    native = GgufTensors(gguf_file)
    names = [f"model.layers.3.self_attn.{p}_proj.weight" for p in "qkv"]
    layer = make_linear(cat_weights([native.get(n) for n in names]), None, GGUF)
    assert isinstance(layer, Int4Linear)
    with safe_open(folder / "model.safetensors", framework="pt") as dense:
        weight = torch.cat([dense.get_tensor(n) for n in names])
    x = torch.randn(5, weight.shape[1], generator=torch.Generator().manual_seed(0))
    expected = F.linear(x, weight)
    got = layer(x)
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()
    # The kernel's weights are the file's up to the bf16 rounding of scale and zero (2^-8 relative).
    kernel_weight = layer.dequantize()
    assert (kernel_weight - weight).abs().max() <= 2 ** -7 * weight.abs().max()
    # A permuted q would multiply the wrong rows: far off, not within rounding.
    wrong = F.linear(x, torch.cat([native.get(names[0]).rows(unpermute_rows(576, 9)).dequantize(), weight[576:]]))
    assert (wrong - expected).abs().max() > 0.1 * expected.abs().max()


def test_q4_0_and_q4_1_kernels_use_the_files_scales():
    rng = np.random.default_rng(1)
    weights = rng.standard_normal((64, 96)).astype(np.float32)
    for type_name in ("Q4_0", "Q4_1"):
        blocks = decode_blocks(type_name, quantize(weights, GGMLQuantizationType[type_name]))
        layer = Int4Linear.from_blocks(blocks, None)
        exact = blocks.dequantize()
        assert (layer.dequantize() - exact).abs().max() <= 2 ** -7 * exact.abs().max()



def test_q8_0_split_into_two_nibbles_keeps_the_files_scales():
    rng = np.random.default_rng(2)
    weights = rng.standard_normal((64, 96)).astype(np.float32)
    q8 = decode_blocks("Q8_0", quantize(weights, GGMLQuantizationType.Q8_0))
    q8.codes[0, :2] = torch.tensor([-128, 127], dtype=torch.int8)  # the extremes of int8
    layer = make_linear(q8, None, GGUF)
    assert isinstance(layer, Int4Linear) and layer.input_copies == 2 and layer.in_features == 96
    exact = q8.dequantize()
    assert (layer.dequantize() - exact).abs().max() <= 2 ** -8 * exact.abs().max()
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(0))
    expected = F.linear(x, exact)
    assert (layer(x) - expected).abs().max() <= 0.02 * expected.abs().max()
    # Each row alone equals the row in a batch (no batch-mate dependence).
    assert torch.equal(torch.cat([layer(x[i:i + 1]) for i in range(4)]), layer(x))


def test_block_quantized_slicing():
    blocks = decode_blocks("Q4_1", quantize(np.ones((4, 128), np.float32), GGMLQuantizationType.Q4_1))
    assert blocks.cols(32, 96).shape == (4, 64)
    assert torch.equal(blocks.cols(32, 96).dequantize(), blocks.dequantize()[:, 32:96])
    with pytest.raises(ValueError, match="multiples of 32"):
        blocks.cols(0, 48)
    padded = blocks.padded_rows(6)
    assert padded.shape == (6, 128) and not padded.dequantize()[4:].any()
    mixed = cat_weights([blocks, torch.zeros(2, 128)])  # a type without a kernel: served dense
    assert isinstance(mixed, torch.Tensor) and mixed.shape == (6, 128)


# ------------------------------------------------------------------------------------ default


def test_gguf_native_is_opt_in_and_checked():
    # Not the default (yet): slower than fp32 at 32 streams (README "CPU quantization").
    assert choose_quantize(None, "cpu", is_gguf=True, fast_path=True).method is None
    assert choose_quantize(None, "cpu", is_gguf=False, fast_path=True).method is None
    assert choose_quantize(GGUF, "cpu", is_gguf=True, fast_path=True).method == GGUF
    assert choose_quantize("int8", "cpu", is_gguf=True, fast_path=True).method == "int8"
    with pytest.raises(ValueError, match="not a .gguf"):
        choose_quantize(GGUF, "cpu", is_gguf=False, fast_path=True)
    with pytest.raises(ValueError, match="CPU kernels"):
        choose_quantize(GGUF, "cuda", is_gguf=True, fast_path=True)
    with pytest.raises(ValueError, match="fast path only"):
        choose_quantize(GGUF, "cpu", is_gguf=True, fast_path=False)


def test_gguf_origin(bundled, tiny_llama, tmp_path):
    gguf_file, folder = bundled
    assert gguf_origin(folder) == gguf_file
    assert gguf_origin(tiny_llama) is None
    # A marker naming a file whose key no longer matches the folder (replaced file): not native.
    stale = tmp_path / f"{gguf_file.stem}-000000000000"
    stale.mkdir()
    (stale / ".complete").write_text(f"{gguf_file}\n")
    assert gguf_origin(stale) is None


def test_gguf_mode_on_safetensors_is_refused(tiny_llama):
    weights = Weights(tiny_llama, TPGroup(), torch.float32, torch.device("cpu"))
    from shard.gguf_weights import open_for_folder

    with pytest.raises(ValueError, match="not converted from"):
        open_for_folder(weights.folder)


# ------------------------------------------------------------------------- the served model


@pytest.fixture(scope="module")
def native_engine(bundled, paged_kernel):
    """As a shard serves it: the compiled attention and fused kernels."""
    from shard.cpu_kernels import load_fused_ops

    return make_engine(bundled[1], block_size=BLOCK, num_blocks_tokens=8192, quantize=GGUF, cpu_kernel=paged_kernel,
                       fused_ops=load_fused_ops(default_cache_dir()))


@pytest.mark.slow
def test_native_model_layers(native_engine):
    model = native_engine.model
    assert isinstance(model.layers[0].self_attn.qkv_proj.linear, Int4Linear)
    assert isinstance(model.layers[0].mlp.down_proj.linear, Int4Linear)
    assert isinstance(model.lm_head.linear, Int4Linear)  # the file's Q8_0 tied table, split in two nibbles
    assert model.lm_head.linear.input_copies == 2
    assert model.embed_tokens.weight.dtype == torch.float32


@pytest.mark.slow
def test_dense_mode_of_the_same_gguf_stays_fp32(bundled):
    """`--dtype float32` (quantize None): the dequantized path, shared tied table, no kernels."""
    engine = make_engine(bundled[1], block_size=BLOCK, num_blocks_tokens=1024)
    model = engine.model
    assert isinstance(model.layers[0].self_attn.qkv_proj.linear, DenseLinear)
    assert model.lm_head.linear.weight.data_ptr() == model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
def test_native_greedy_is_batch_invariant(native_engine, bundled):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled[1])
    prompts = [chat(tokenizer, q) for q in ("What is deep learning?", "Name a color.", "Who wrote Hamlet?")]
    alone = [generate(native_engine, [greedy_request(0, p, 24, BlockPool(BLOCK))], batch_id=i)[0]
             for i, p in enumerate(prompts)]
    pool = BlockPool(BLOCK)
    together = generate(native_engine, [greedy_request(i, p, 24, pool) for i, p in enumerate(prompts)], batch_id=9)
    assert [together[i] for i in range(len(prompts))] == alone
    assert "learning" in tokenizer.decode(alone[0])


@pytest.mark.slow
def test_native_greedy_is_cache_invariant(native_engine, bundled):
    """A prompt whose first block comes from the prefix cache gets the tokens it gets without it.
    These two prompts diverged (at tokens 22 and 34) while prompt chunks ran through SDPA: its
    flash kernel sums in an order set by the query/key block sizes (README "Attention kernel")."""
    from transformers import AutoTokenizer

    from pytgi_proto import generate_pb2 as pb
    from tests.shard.helpers import collect, run_to_completion

    tokenizer = AutoTokenizer.from_pretrained(bundled[1])
    for question in ("Name a color.", "What is Python?"):
        prompt, new_tokens = chat(tokenizer, question), 48
        pool = BlockPool(BLOCK)
        alone = generate(native_engine, [greedy_request(1, prompt, new_tokens, pool)], batch_id=1)[1]
        first_block = [1]  # the request above wrote its first 16 positions there
        request = pb.Request(
            id=2, input_ids=prompt, blocks=first_block + pool.take(len(prompt) - BLOCK + new_tokens), cache_len=BLOCK,
            stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=new_tokens, ignore_eos_token=True),
        )
        response = native_engine.prefill(pb.PrefillRequest(batch=pb.Batch(id=2, requests=[request], size=1)))
        cached: dict[int, list[int]] = {}
        collect(response.generations, cached)
        run_to_completion(native_engine, response, cached)
        assert cached[2] == alone, question


_ISA_CHECK = """
import numpy as np, torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize
from shard.gguf_weights import decode_blocks
from shard.layers.quant import make_linear
print(torch.backends.cpu.get_cpu_capability())
w = np.random.default_rng(3).standard_normal((96, 128)).astype(np.float32)
x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
for kind in ("Q4_0", "Q4_1", "Q8_0"):
    blocks = decode_blocks(kind, quantize(w, GGMLQuantizationType[kind]))
    layer = make_linear(blocks, None, "gguf")
    expected = x @ blocks.dequantize().t()
    assert (layer(x) - expected).abs().max() <= 0.02 * expected.abs().max(), kind
    assert torch.equal(torch.cat([layer(x[i:i + 1]) for i in range(3)]), layer(x)), kind
"""


@pytest.mark.parametrize("isa", ["avx2", "default"])
def test_native_kernels_on_a_cpu_without_avx512(isa):
    """CI machines may be AVX2-only: torch picks its int4 kernel by the CPU's ISA at run time;
    ATEN_CPU_CAPABILITY forces the AVX2 and the scalar builds of it here."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", _ISA_CHECK], cwd=root, capture_output=True, text=True,
                            env={**os.environ, "ATEN_CPU_CAPABILITY": isa}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == isa.upper()  # the build that ran
