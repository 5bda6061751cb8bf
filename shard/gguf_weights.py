"""A GGUF file's quantized tensors, decoded into `BlockQuantized` under the Hugging Face names.

Only the block types with a kernel here are decoded (Q4_0, Q4_1, Q8_0); any other tensor (F32
norms, F16, K-quants) returns None and the caller takes the dequantized dense copy that
model_source.convert_gguf wrote. Block layouts (ggml-common.h, `block_q4_0` / `block_q4_1` /
`block_q8_0`), 32 weights per block, little-endian:
  Q4_0: fp16 d, 16 bytes of nibbles;                 w = d * (q - 8)
  Q4_1: fp16 d, fp16 m, 16 bytes of nibbles;         w = d * q + m
  Q8_0: fp16 d, 32 int8;                             w = d * q
Nibbles: byte j holds weight j in its low half and weight j + 16 in its high half.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shard.layers.quant import GGUF_BLOCK, BlockQuantized

# GGUF type name → (BlockQuantized kind, bytes per block)
_BLOCK_TYPES = {"Q4_0": ("q4_0", 18), "Q4_1": ("q4_1", 20), "Q8_0": ("q8_0", 34)}

# Hugging Face (Llama family) name → GGUF name (llama.cpp's tensor names, gguf.constants).
_LAYER_PARTS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight"}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(\w+\.\w+)\.weight")


def gguf_name(hf_name: str) -> str | None:
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    match = _LAYER_NAME.fullmatch(hf_name)
    if match is None or match.group(2) not in _LAYER_PARTS:
        return None
    return f"blk.{match.group(1)}.{_LAYER_PARTS[match.group(2)]}.weight"


def decode_blocks(type_name: str, raw: np.ndarray) -> BlockQuantized:
    """raw: the tensor's bytes as GGUFReader maps them, uint8 [N, K / 32 * block bytes]."""
    kind, block_bytes = _BLOCK_TYPES[type_name]
    n = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(n, -1, block_bytes)
    scale = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "q8_0":
        codes = blocks[..., 2:].copy().view(np.int8).reshape(n, -1)
        offset = np.zeros_like(scale)
    else:
        start = 4 if kind == "q4_1" else 2
        packed = blocks[..., start:start + 16]
        codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1)
        offset = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if kind == "q4_1" else -8 * scale
    return BlockQuantized(kind, torch.from_numpy(codes), torch.from_numpy(scale), torch.from_numpy(offset))


def unpermute_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's rotary permutation of q_proj / k_proj.

    convert_hf_to_gguf.py regroups each head's rows from [first half; second half] (HF's
    rotate_half layout) to interleaved pairs; transformers' GGUF loader undoes it with
    `reshape(n_head, dim, 2, K).swapaxes(2, 1)` (LlamaTensorProcessor._reverse_permute_weights).
    Row r of the HF weight is row perm[r] of the file's; whole rows move, blocks stay intact."""
    half = n_rows // n_head // 2
    return torch.arange(n_rows).view(n_head, half, 2).transpose(1, 2).reshape(-1)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    type_name: str  # GGMLQuantizationType name: "F32", "Q4_1", ...
    shape: tuple[int, ...]  # rows first (the reverse of GGUF's ne order): [N, K] for a weight
    offset: int  # bytes from the file's start


# GGUF metadata value types (gguf.constants.GGUFValueType): fixed sizes in bytes; 8 string, 9 array.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_header(path: Path) -> tuple[dict[str, object], list[TensorInfo]]:
    """The GGUF's scalar/string metadata and its tensor table (gguf's file layout: header,
    key-value pairs, tensor infos, aligned data). GGUFReader builds every array field as numpy
    views (SmolLM2's 49k-token vocabulary and merges: 3-7 s here); this reads the same header in
    ~0.1 s, skipping arrays. tests/shard/test_gguf_native.py checks it against GGUFReader."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            return _parse_header(path, view)
        finally:
            view.release()


def _parse_header(path: Path, view: memoryview) -> tuple[dict[str, object], list[TensorInfo]]:
    pos = 0

    def unpack(fmt: str):
        nonlocal pos
        value = struct.unpack_from(fmt, view, pos)[0]
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        length = unpack("<Q")
        pos += length
        return bytes(view[pos - length:pos]).decode("utf-8", errors="replace")

    def skip(value_type: int) -> None:
        nonlocal pos
        if value_type == 8:
            length = unpack("<Q")  # first: `pos += unpack(...)` would add to the pos read before the call
            pos += length
        elif value_type == 9:
            item_type, count = unpack("<I"), unpack("<Q")
            if item_type in _SCALAR_SIZES:
                pos += count * _SCALAR_SIZES[item_type]
            else:
                for _ in range(count):
                    skip(item_type)
        else:
            pos += _SCALAR_SIZES[value_type]

    if bytes(view[:4]) != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    version = unpack("<4xI")
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is not supported")
    n_tensors, n_fields = unpack("<Q"), unpack("<Q")
    fields: dict[str, object] = {}
    for _ in range(n_fields):
        key, value_type = string(), unpack("<I")
        if value_type in _SCALAR_FORMATS:
            fields[key] = unpack(_SCALAR_FORMATS[value_type])
        elif value_type == 8:
            fields[key] = string()
        else:
            skip(value_type)
    from gguf import GGMLQuantizationType

    infos = []
    for _ in range(n_tensors):
        name, n_dims = string(), unpack("<I")
        dims = struct.unpack_from(f"<{n_dims}Q", view, pos)
        pos += 8 * n_dims
        type_id, offset = unpack("<I"), unpack("<Q")
        try:
            type_name = GGMLQuantizationType(type_id).name
        except ValueError:  # a type newer than the installed gguf package: served dense anyway
            type_name = f"TYPE_{type_id}"
        infos.append(TensorInfo(name, type_name, tuple(reversed(dims)), offset))
    alignment = int(fields.get("general.alignment", 32))
    start = -(-pos // alignment) * alignment
    return fields, [TensorInfo(t.name, t.type_name, t.shape, start + t.offset) for t in infos]


class GgufTensors:
    """The natively served tensors of one GGUF file, by Hugging Face name."""

    def __init__(self, path: Path):
        self.path = Path(path)
        fields, infos = read_header(self.path)
        self._tensors = {t.name: t for t in infos}
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.architecture = str(fields.get("general.architecture"))
        # Only the llama converter permutes q/k (transformers applies its inverse for "llama" only).
        self._permute = self.architecture == "llama"
        self._heads = fields.get(f"{self.architecture}.attention.head_count")
        self._kv_heads = fields.get(f"{self.architecture}.attention.head_count_kv") or self._heads

    def type_name(self, hf_name: str) -> str | None:
        name = gguf_name(hf_name)
        tensor = self._tensors.get(name) if name else None
        return None if tensor is None else tensor.type_name

    def get(self, hf_name: str) -> BlockQuantized | None:
        """The tensor in HF layout, or None: not in the file, or of a type without a kernel here."""
        name = gguf_name(hf_name)
        tensor = self._tensors.get(name) if name else None
        if tensor is None or tensor.type_name not in _BLOCK_TYPES or len(tensor.shape) != 2:
            return None
        rows, cols = tensor.shape
        if cols % GGUF_BLOCK:
            return None
        row_bytes = cols // GGUF_BLOCK * _BLOCK_TYPES[tensor.type_name][1]
        raw = self._data[tensor.offset:tensor.offset + rows * row_bytes].reshape(rows, row_bytes)
        weight = decode_blocks(tensor.type_name, raw)
        if self._permute and name.endswith((".attn_q.weight", ".attn_k.weight")):
            heads = self._heads if name.endswith(".attn_q.weight") else self._kv_heads
            weight = weight.rows(unpermute_rows(weight.shape[0], heads))
        return weight

def open_for_folder(folder: Path) -> GgufTensors:
    """The GGUF a converted folder came from (model_source.gguf_origin), for `--quantize gguf`."""
    from shard.model_source import gguf_origin

    origin = gguf_origin(folder)
    if origin is None:
        raise ValueError(f"--quantize gguf serves a GGUF file's own weights; {folder} was not converted from "
                         "an (unchanged) .gguf file")
    return GgufTensors(origin)
