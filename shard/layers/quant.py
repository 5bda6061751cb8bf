"""Linear kernels: dense, or quantized for CPU serving (`--quantize int8|int4|gguf`).

int8 (W8A8): symmetric per-output-channel int8 weights; activations quantized per token at each
call, integer GEMM (fbgemm's dynamic linear). The fastest at every batch size.
int4 (W4A16): asymmetric int4 weights in groups of 32 input features (the GGUF Q4 block size),
bf16 activations, torch's packed int4 CPU kernel. Half of int8's bytes: the best at batch 1.
The kernel's fp32-activation path is not vectorized (25x slower for the LM head), its bf16 one is.

Speed and quality on the bundled SmolLM2 (README "Performance"; `python -m benchmarks.quant_quality`):
int8 3x fp32's decode and prefill throughput, ~91 % teacher-forced greedy agreement with fp32;
int4 4x fp32 at batch 1, ~89 %.

gguf: the weights a GGUF file ships, loaded as they are (`BlockQuantized`, read by
shard/gguf_weights.py) into the int4 kernel with the file's own per-32 scales: Q4_0 / Q4_1
directly, Q8_0 split into two nibbles (`Int4Linear.from_blocks`). No requantization; the only
rounding is the kernel's: bf16 activations, bf16 scales. Opt-in (`choose_quantize` says why).
On the bundled Q4_1 SmolLM2, 98.3 % teacher-forced greedy agreement with
its exact (dequantized fp32) weights; ~2.2x fp32's batch-1 decode step, ~0.9x at batch 32
(the int4 kernel's cost grows with the batch).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

GGUF = "gguf"  # serve the GGUF file's own quantized tensors
QUANTIZE_METHODS = ("int8", "int4", GGUF)
INT4_GROUP_SIZES = (32, 64, 128)  # the first that divides the input features is used
GGUF_BLOCK = 32  # Q4_0, Q4_1, Q8_0: one fp16 scale (and Q4_1 a minimum) per 32 input features


@dataclass(frozen=True, slots=True)
class BlockQuantized:
    """A weight [N, K] as a GGUF file stores it: integer codes, and per block of 32 input
    features a scale and an offset; w = code * scale + offset (exact in float32: the file's
    scales are fp16). Q4_1: codes 0..15, offset = the block minimum. Q4_0: codes 0..15,
    offset = -8 * scale. Q8_0: codes -127..127, offset 0. Rows are output features, so slicing
    or permuting rows moves whole blocks; columns may only be cut at block boundaries."""

    kind: str  # "q4_0" | "q4_1" | "q8_0"
    codes: torch.Tensor  # [N, K] uint8 (q4) or int8 (q8)
    scale: torch.Tensor  # [N, K / 32] float32
    offset: torch.Tensor  # [N, K / 32] float32

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        blocks = self.codes.float().view(n, k // GGUF_BLOCK, GGUF_BLOCK)
        return (blocks * self.scale[..., None] + self.offset[..., None]).view(n, k)

    def rows(self, index: torch.Tensor | slice) -> "BlockQuantized":
        return BlockQuantized(self.kind, self.codes[index], self.scale[index], self.offset[index])

    def cols(self, start: int, stop: int) -> "BlockQuantized":
        if start % GGUF_BLOCK or stop % GGUF_BLOCK:
            raise ValueError(f"a {self.kind} weight can only be split at multiples of {GGUF_BLOCK} input "
                             f"features (got {start}:{stop}); serve it with --dtype float32")
        blocks = slice(start // GGUF_BLOCK, stop // GGUF_BLOCK)
        return BlockQuantized(self.kind, self.codes[:, start:stop], self.scale[:, blocks], self.offset[:, blocks])

    def padded_rows(self, rows: int) -> "BlockQuantized":
        """Zero rows appended up to `rows` (w = 0: code, scale and offset 0)."""
        extra = rows - self.codes.shape[0]
        zeros = [t.new_zeros(extra, t.shape[1]) for t in (self.codes, self.scale, self.offset)]
        return BlockQuantized.cat([self, BlockQuantized(self.kind, *zeros)])

    @staticmethod
    def cat(parts: "list[BlockQuantized]") -> "BlockQuantized":
        if len({p.kind for p in parts}) != 1:
            raise ValueError(f"cannot fuse weights of different GGUF types {[p.kind for p in parts]}")
        return BlockQuantized(parts[0].kind, torch.cat([p.codes for p in parts]),
                              torch.cat([p.scale for p in parts]), torch.cat([p.offset for p in parts]))


Weight = torch.Tensor | BlockQuantized


def cat_weights(parts: list[Weight]) -> Weight:
    """Fuse projections (qkv, gate_up) whether they arrive dense or block-quantized; a mix (a
    GGUF with Q4_1 q/k and, say, Q6_K v, dequantized) is served dense."""
    if all(isinstance(p, BlockQuantized) for p in parts):
        return BlockQuantized.cat(parts)
    return torch.cat([p.dequantize() if isinstance(p, BlockQuantized) else p for p in parts])


@dataclass(frozen=True, slots=True)
class QuantizeChoice:
    method: str | None
    reason: str  # one phrase for the start-up log


def choose_quantize(requested: str | None, device_type: str, is_gguf: bool, fast_path: bool) -> QuantizeChoice:
    """The linear layers' kernels, decided once at start-up (cli._load).

    `--quantize gguf` serves a GGUF model's own quantized weights on the CPU: what llama.cpp
    runs, the closest to the file of the fast modes (98 % greedy agreement with its exact
    weights, int8 91 %, int4 89 %) and 2.2-2.6x fp32 at one stream. It is not the default (yet):
    at 32 streams it is slower than fp32 (the split Q8_0 LM head), and the served tests assume
    the dense default (README "CPU quantization"). Without --quantize every
    model is served dense in its dtype (a GGUF dequantized, the path the fidelity tests compare
    with transformers).
    """
    if requested is None:
        return QuantizeChoice(None, "no --quantize" + ("; a GGUF model dequantized" if is_gguf else ""))
    if requested == GGUF:
        if not is_gguf:
            raise ValueError("--quantize gguf serves a GGUF file's own quantized weights; this model is not a .gguf")
        if device_type != "cpu":
            raise ValueError(f"--quantize gguf runs CPU kernels; on {device_type} serve the dequantized model")
        if not fast_path:
            raise ValueError("--quantize gguf serves the Llama-family fast path only (llama, mistral, qwen2/3)")
    return QuantizeChoice(requested, "--quantize")


@functools.cache
def cpu_has_vnni() -> bool:
    """VNNI's int8 dot product accumulates in int32. Without it fbgemm multiplies u8*s8 pairs
    into saturating int16, and activations must be quantized to 7 bits (`reduce_range`), which
    costs accuracy (teacher-forced greedy agreement 84 % instead of 91 % on SmolLM2)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_vnni" in flags or " avx_vnni" in flags


class DenseLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns (int8 [N, K], fp32 scales [N]); w ≈ q * scale."""
    scale = weight.float().abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(weight.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8DynamicLinear(nn.Module):
    """fbgemm's dynamic linear, made per-token and batch-invariant.

    fbgemm quantizes the whole activation matrix with one scale from its min/max, so a request's
    numbers would depend on its batch-mates. Each row is divided by its own max-abs first and a
    guard row [1, -1, 0…] pins the matrix range to exactly [-1, 1]: the quantization step is then
    the same for every batch, and each token uses its own range (per-token quantization, more
    accurate than per-tensor). The row scales are multiplied back after the integer GEMM (a linear
    map without bias is homogeneous); the bias is added after.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        q, scale = quantize_int8(weight)
        with warnings.catch_warnings():
            # torch 2.13 deprecates quantized-tensor creation (pytorch#184982) but fbgemm's
            # prepack still takes one; the pinned torch has both. Revisit when the pin moves.
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(
                q, scale.double(), torch.zeros(q.shape[0], dtype=torch.long), 0)
        self.out_features, self.in_features = weight.shape
        # A packed-params object, not a Parameter: fbgemm owns its blocked layout.
        self.packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.bias = nn.Parameter(bias.float(), requires_grad=False) if bias is not None else None
        self.reduce_range = not cpu_has_vnni()
        guard = torch.zeros(1, self.in_features)
        guard[0, 0], guard[0, -1] = 1.0, -1.0
        self.register_buffer("guard", guard, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        row_scale = flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
        out = torch.ops.quantized.linear_dynamic(torch.cat([flat / row_scale, self.guard]), self.packed, self.reduce_range)
        out = out[:-1].mul_(row_scale)
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of `group_size` input features.

    Returns (q int32 in [0, 15] [N, K], scale [N, K/g], minimum [N, K/g]); w ≈ q * scale + minimum.
    """
    n, k = weight.shape
    groups = weight.float().view(n, k // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15.0).clamp(min=1e-12)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.view(n, k), scale, low


class Int4Linear(nn.Module):
    """W4A16 with torch's packed int4 CPU kernel. Built from a dense weight (quantized here, group
    32/64/128) or from a GGUF Q4_0 / Q4_1 / Q8_0 weight (`from_blocks`: the file's codes and
    scales). The kernel's scales must have the activations' dtype, and only its bf16 path is
    vectorized (fp32 and fp16 are 30-100x slower here), so scales and zeros are rounded to bf16:
    teacher-forced agreement with the exact file weights is in README "CPU quantization"."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        out_features, in_features = weight.shape
        group_size = next((g for g in INT4_GROUP_SIZES if in_features % g == 0), None)
        if group_size is None:
            raise ValueError(f"int4 needs input features divisible by {INT4_GROUP_SIZES[0]} (got {in_features})")
        q, scale, low = quantize_int4(weight, group_size)
        self._pack(q, scale, low, group_size, bias)

    @classmethod
    def from_blocks(cls, weight: BlockQuantized, bias: torch.Tensor | None) -> "Int4Linear":
        """Q4_0 / Q4_1: the file's codes, scales and minima as they are. Q8_0: each code split
        into two nibbles, q = 16 * high + low (high -8..7, low 0..15), laid side by side along
        the input features with scales 16 * d and d; the input is repeated to match, so
        one int4 GEMM sums both halves in its fp32 accumulator. Same bytes as int8, the file's
        per-32 scales kept (fbgemm's int8 GEMM has one scale per row)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        if weight.kind in ("q4_0", "q4_1"):
            layer._pack(weight.codes.to(torch.int32), weight.scale, weight.offset, GGUF_BLOCK, bias)
        elif weight.kind == "q8_0":
            q = weight.codes.to(torch.int32)
            high = torch.div(q, 16, rounding_mode="floor")
            codes = torch.cat([high + 8, q - 16 * high], dim=1)
            scale = torch.cat([16 * weight.scale, weight.scale], dim=1)
            offset = torch.cat([-128 * weight.scale, torch.zeros_like(weight.scale)], dim=1)  # (high + 8) * 16d - 128d
            layer._pack(codes, scale, offset, GGUF_BLOCK, bias, input_copies=2)
        else:
            raise ValueError(f"no int4 kernel for {weight.kind} weights")
        return layer

    def _pack(self, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int,
              bias: torch.Tensor | None, input_copies: int = 1) -> None:
        """q: int32 codes 0..15 [N, K * input_copies]; w = q * scale + offset per group of
        `group_size`; the layer's input (K features) is repeated `input_copies` times."""
        self.out_features = q.shape[0]
        self.in_features = q.shape[1] // input_copies
        self.input_copies = input_copies
        self.group_size = group_size
        # The kernel computes (q - 8) * scale + zero, so zero = offset + 8 * scale; layout [K/g, N, 2].
        scales_zeros = torch.stack([scale, offset + 8 * scale], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), persistent=False)
        self.register_buffer("scales_zeros", scales_zeros.to(torch.bfloat16), persistent=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def dequantize(self) -> torch.Tensor:
        """The weight [N, K] this layer multiplies by, exactly (bf16 scales included): the
        kernel's fp32 path applied to the identity (one product per output, no rounding)."""
        eye = torch.eye(self.in_features * self.input_copies)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scales_zeros.float())
        return out.view(self.input_copies, self.in_features, self.out_features).sum(0).t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.input_copies > 1:
            flat = flat.repeat(1, self.input_copies)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scales_zeros)
        out = out.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return out + self.bias if self.bias is not None else out


def make_linear(weight: Weight, bias: torch.Tensor | None, quantize: str | None) -> nn.Module:
    if isinstance(weight, BlockQuantized):
        # Only a GGUF served natively hands out block-quantized weights (shard/weights.py).
        return Int4Linear.from_blocks(weight, bias)
    if quantize is None or quantize == GGUF:
        # GGUF: a tensor the file keeps in a type without a kernel here (F32, F16, K-quants) was
        # dequantized by the conversion and is served dense.
        return DenseLinear(weight, bias)
    if weight.device.type != "cpu":
        raise ValueError(f"--quantize {quantize} is a CPU kernel; serve GPUs in float16/bfloat16")
    if quantize == "int8":
        return Int8DynamicLinear(weight, bias)
    if quantize == "int4":
        return Int4Linear(weight, bias)
    raise ValueError(f"unsupported quantization {quantize!r}; pytgi implements {', '.join(QUANTIZE_METHODS)}")
