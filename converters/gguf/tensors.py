"""GGUF tensor data -> PackedLinear codes or dense torch tensors.

A GGUF 2-D weight has ne = (K, N): each of its N rows is K / block_size consecutive blocks, so
rows decode independently. We decode a bounded number of rows at a time (peak memory is the
output plus one chunk) and gather rows in an optional order (`rows`, used to undo llama.cpp's
Q/K permutation: quantization blocks never straddle rows, so the permutation is lossless).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

from qruntime.checkpoint import PackedLinear
from qruntime.errors import CorruptFileError
from qruntime.quantizers.packing import pack

from .reader import GGUFFile, TensorInfo
from .types import FLOAT_TYPES, QUANT_TYPES, QuantMapping

_CHUNK_ELEMENTS = 1 << 22  # weights decoded at once (a few tens of MiB of temporaries)
_FP16_MAX = float(np.finfo(np.float16).max)


def torch_shape(info: TensorInfo) -> tuple[int, ...]:
    """GGUF ne order (innermost first) -> row-major torch shape."""
    return tuple(reversed(info.shape))


def _row_chunks(n_rows: int, row_len: int, rows: np.ndarray | None) -> Iterator[np.ndarray]:
    step = max(1, _CHUNK_ELEMENTS // max(row_len, 1))
    order = np.arange(n_rows) if rows is None else rows
    for start in range(0, n_rows, step):
        yield order[start:start + step]


def _blocks(f: GGUFFile, info: TensorInfo, m: QuantMapping) -> np.ndarray:
    """uint8 [N, K / block, type_size] view of a 2-D quantized tensor."""
    k, n = info.shape[0], info.n_elements // info.shape[0]
    return f.tensor_bytes(info.name).reshape(n, k // m.block_size, m.type_size)


def _decode_rows(f: GGUFFile, info: TensorInfo, m: QuantMapping, idx: np.ndarray):
    """(q int16 [r, K], scale f32 [r, K/g], offset f32 [r, K/g] | None) of rows `idx`."""
    blocks = _blocks(f, info, m)[idx]
    r = len(idx)
    d = m.decode(blocks.reshape(-1, m.type_size))
    offset = None if d.offset is None else d.offset.reshape(r, -1)
    return d.q.reshape(r, -1), d.scale.reshape(r, -1), offset


def _scale_tensor(values: np.ndarray, f: GGUFFile, info: TensorInfo, what: str) -> torch.Tensor:
    """fp32 scales -> fp16, or fp32 for a tensor whose values exceed fp16's range (docs/FORMAT.md)."""
    if not np.isfinite(values).all():
        raise CorruptFileError(f"{f.source}: tensor {info.name!r} ({info.type_name}) has non-finite {what}; "
                               "the file is corrupt: re-download it")
    if np.abs(values).max(initial=0.0) > _FP16_MAX:
        return torch.from_numpy(np.ascontiguousarray(values))
    return torch.from_numpy(values.astype(np.float16))


def quantized_linear(f: GGUFFile, info: TensorInfo, rows: np.ndarray | None = None) -> PackedLinear:
    """A quantized 2-D GGUF weight as a PackedLinear, codes unchanged (module table in types.py)."""
    m = QUANT_TYPES[T(info.ggml_type)]
    k, n = info.shape[0], info.n_elements // info.shape[0]
    words, scales, offsets = [], [], []
    for idx in _row_chunks(n, k, rows):
        q, s, o = _decode_rows(f, info, m, idx)
        codes = torch.from_numpy((q + m.center).astype(np.uint8))
        words.append(pack(codes, m.bits))
        scales.append(s)
        if o is not None:
            offsets.append(o)
    return PackedLinear(
        in_features=k, out_features=n, bits=m.bits, group_size=m.group_size,
        qweight=torch.cat(words) if words else pack(torch.zeros(0, k, dtype=torch.uint8), m.bits),
        scales=_scale_tensor(np.concatenate(scales) if scales else np.zeros((0, k // m.group_size), np.float32),
                             f, info, "scales"),
        offsets=_scale_tensor(np.concatenate(offsets), f, info, "offsets") if offsets else None,
    )


def float_tensor(f: GGUFFile, info: TensorInfo, rows: np.ndarray | None = None) -> torch.Tensor:
    """An F32/F16/BF16 tensor in its own dtype, torch shape (rows gathered along dim 0)."""
    raw = f.tensor_bytes(info.name).view(FLOAT_TYPES[T(info.ggml_type)]).reshape(torch_shape(info))
    if rows is not None:
        raw = raw[rows]
    t = torch.from_numpy(np.array(raw))  # a copy: the file stays read-only and may be closed
    return t.view(torch.bfloat16) if info.ggml_type == T.BF16 else t


def dequantized(f: GGUFFile, info: TensorInfo, dtype: torch.dtype, rows: np.ndarray | None = None) -> torch.Tensor:
    """Any supported tensor as floats of `dtype`, torch shape; quantized types are dequantized in
    float32 exactly as llama.cpp does (`scale * q + offset`), then rounded once to `dtype`."""
    if info.ggml_type in FLOAT_TYPES:
        return float_tensor(f, info, rows).to(dtype)
    m = QUANT_TYPES[T(info.ggml_type)]
    k, n = info.shape[0], info.n_elements // info.shape[0]
    out = torch.empty(n, k, dtype=dtype)
    done = 0
    for idx in _row_chunks(n, k, rows):
        q, s, o = _decode_rows(f, info, m, idx)
        w = np.repeat(s, m.group_size, axis=1) * q.astype(np.float32)
        if o is not None:
            w += np.repeat(o, m.group_size, axis=1)
        out[done:done + len(idx)] = torch.from_numpy(w)
        done += len(idx)
    return out.reshape(torch_shape(info))


def any_float(f: GGUFFile, info: TensorInfo, rows: np.ndarray | None = None) -> torch.Tensor:
    """A small tensor (norm, bias) as floats whatever its type: float types keep their dtype,
    others are dequantized to float32."""
    if info.ggml_type in FLOAT_TYPES:
        return float_tensor(f, info, rows)
    if info.ggml_type in QUANT_TYPES:
        return dequantized(f, info, torch.float32, rows)
    return foreign_dequantized(f, info, rows)


def foreign_dequantized(f: GGUFFile, info: TensorInfo, rows: np.ndarray | None = None) -> torch.Tensor:
    """float32 weights of a type we do not map (IQ*, TQ*, ...), via gguf-py's dequantizer (the
    `--requantize` path)."""
    try:
        w = gguf_dequantize(np.array(f.tensor_bytes(info.name)).reshape(info.n_elements // info.shape[0], -1),
                            T(info.ggml_type))
    except Exception as e:  # gguf-py raises NotImplementedError, ValueError, ... on odd data
        raise CorruptFileError(f"{f.source}: tensor {info.name!r} ({info.type_name}) cannot be dequantized "
                               f"({type(e).__name__}: {e})") from None
    w = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).reshape(torch_shape(info))
    return w if rows is None else w[torch.from_numpy(rows)]
