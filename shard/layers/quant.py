"""Linear kernels: dense, or quantized at load time for CPU serving (`--quantize int8|int4`).

int8 (W8A8): symmetric per-output-channel int8 weights; activations quantized per token at each
call, integer GEMM (fbgemm's dynamic linear). The fastest at every batch size.
int4 (W4A16): asymmetric int4 weights in groups of 32 input features (the GGUF Q4 block size),
bf16 activations, torch's packed int4 CPU kernel. Half of int8's bytes: the best at batch 1.
The kernel's fp32-activation path is not vectorized (25x slower for the LM head), its bf16 one is.

Speed and quality on the bundled SmolLM2 (README "Performance"; `python -m benchmarks.quant_quality`):
int8 3x fp32's decode and prefill throughput, ~91 % teacher-forced greedy agreement with fp32;
int4 4x fp32 at batch 1, ~89 %.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

QUANTIZE_METHODS = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)  # the first that divides the input features is used


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
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group_size = next((g for g in INT4_GROUP_SIZES if self.in_features % g == 0), None)
        if self.group_size is None:
            raise ValueError(f"int4 needs input features divisible by {INT4_GROUP_SIZES[0]} (got {self.in_features})")
        q, scale, low = quantize_int4(weight, self.group_size)
        # The kernel computes (q - 8) * scale + zero, so zero = minimum + 8 * scale; layout [K/g, N, 2].
        scales_zeros = torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), persistent=False)
        self.register_buffer("scales_zeros", scales_zeros.to(torch.bfloat16), persistent=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scales_zeros)
        out = out.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return out + self.bias if self.bias is not None else out


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, quantize: str | None) -> nn.Module:
    if quantize is None:
        return DenseLinear(weight, bias)
    if weight.device.type != "cpu":
        raise ValueError(f"--quantize {quantize} is a CPU kernel; serve GPUs in float16/bfloat16")
    if quantize == "int8":
        return Int8DynamicLinear(weight, bias)
    if quantize == "int4":
        return Int4Linear(weight, bias)
    raise ValueError(f"unsupported quantization {quantize!r}; pytgi implements {', '.join(QUANTIZE_METHODS)}")
