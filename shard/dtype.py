"""The weights dtype when `--dtype` is not given ("auto"), decided once in `cli._load`.

Rule (`resolve_dtype`, a pure function):
- `--dtype` given: that dtype, on any device.
- CPU: float32. bf16 is 3-10x slower for prefill on CPUs without native BF16
  (shared/reference/cpu-baseline.md §3d), and fp16 matmuls are slower still.
- CUDA: the checkpoint's own dtype (config.json `torch_dtype`, or `dtype` as newer transformers
  write it) when it is float16 or bfloat16, so a model trained in bf16 never meets fp16's range
  (overflow to inf past 65504). A float32 or unknown checkpoint gets bfloat16 where the GPU has
  it (compute capability >= 8.0, Ampere and later), float16 otherwise; so does a bf16 checkpoint
  on an older GPU.

vLLM's `--dtype auto` (`_resolve_auto_dtype`) takes the same decisions in these cases: keep a
16-bit checkpoint's dtype, turn float32 into the platform's preferred dtype (bf16 from compute
capability 8.0, else fp16), fall back when the GPU lacks the checkpoint's. It differs in that it
also reads the safetensors headers when config.json names no dtype (we take that as float32), and
it never picks float16 for model types that overflow in it (Gemma 2/3, GLM-4) and refuses an
explicit `--dtype float16` for them; here such a model gets float16 only on a pre-Ampere GPU or
when asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

# config.json spellings (transformers writes the torch name, with or without the "torch." prefix).
_CHECKPOINT_NAMES = {
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
}
_GPU_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True, slots=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str  # one phrase for the start-up log


def resolve_dtype(
    requested: torch.dtype | None, device_type: str, checkpoint: torch.dtype | None, has_bf16: bool,
) -> DtypeChoice:
    """The weights (and activations, and KV cache) dtype; see the module docstring for the rule."""
    if requested is not None:
        return DtypeChoice(requested, "--dtype")
    if device_type != "cuda":
        return DtypeChoice(torch.float32, f"default on {device_type}")
    if checkpoint in _GPU_DTYPES and (checkpoint != torch.bfloat16 or has_bf16):
        return DtypeChoice(checkpoint, "the checkpoint's dtype")
    fallback = torch.bfloat16 if has_bf16 else torch.float16
    if checkpoint == torch.bfloat16:
        return DtypeChoice(fallback, "bfloat16 checkpoint, no bfloat16 on this GPU (compute capability < 8)")
    what = "unknown" if checkpoint is None else str(checkpoint).removeprefix("torch.")
    why = "the GPU has bfloat16" if has_bf16 else "the GPU has no bfloat16 (compute capability < 8)"
    return DtypeChoice(fallback, f"{what} checkpoint, {why}")


def choose_dtype(requested: torch.dtype | None, device: torch.device, folder: Path) -> DtypeChoice:
    """`resolve_dtype` for this checkpoint on this device (reads config.json, asks the GPU)."""
    return resolve_dtype(requested, device.type, checkpoint_dtype(folder), has_bf16(device))


def checkpoint_dtype(folder: Path) -> torch.dtype | None:
    """The dtype config.json declares (a multimodal config's text part too), None if none or unknown."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for part in (config, config.get("text_config") or {}):
        for key in ("torch_dtype", "dtype"):
            value = part.get(key)
            if isinstance(value, str):
                found = _CHECKPOINT_NAMES.get(value.removeprefix("torch."))
                if found is not None:
                    return found
    return None


def has_bf16(device: torch.device) -> bool:
    """Native bfloat16 on this device (CUDA: compute capability 8.0 or later). Not
    `torch.cuda.is_bf16_supported()`: by default it also counts emulated bf16 on older GPUs."""
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)
