"""Helpers shared by the readers of foreign integer checkpoints (GPTQ, AWQ, compressed-tensors).

Each of those formats packs b-bit unsigned fields into int32 words, low bits first, along one
axis; they differ in the axis, the field order inside a word, the zero-point encoding and how
groups are assigned to columns. The format modules say which; this module unpacks words, turns
a `g_idx` into the packed format's input permutation, and builds the `PackedLinear` (with the
code/zero layout the packed format wants, always through `quantizers.packing.pack`).
"""

from __future__ import annotations

from typing import Any

import torch

from qruntime.checkpoint import PackedLinear, effective_group_size, expects_bias
from qruntime.config import ModelConfig
from qruntime.errors import ShapeMismatchError, UnsupportedFormatError
from qruntime.quantizers.packing import pack

WORD_BITS = 32


def unpack_words(words: torch.Tensor, bits: int, dim: int, order: list[int] | None = None) -> torch.Tensor:
    """int32 words -> unsigned b-bit fields as int16, expanded along `dim` (0 or 1).

    Field i of a word sits in bits [b*i, b*i + b) (low bits first). Along `dim`, word j expands to
    the 32/b values j*(32/b) + [0, 32/b); `order[i]` (AWQ's interleave) says which of those values
    field i holds, so value j*(32/b) + order[i] = field i. Default: value i = field i.
    """
    per = WORD_BITS // bits
    shifts = torch.arange(0, WORD_BITS, bits, dtype=torch.int64)
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = w if dim == 1 else w.t()
    fields = (w.unsqueeze(-1) >> shifts) & (2**bits - 1)  # [R, C, per], field i at [..., i]
    if order is not None:
        inverse = [order.index(j) for j in range(per)]
        fields = fields[..., inverse]  # value j = field order.index(j)
    out = fields.reshape(w.shape[0], -1).to(torch.int16)
    return out if dim == 1 else out.t().contiguous()


def expect_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...], why: str) -> None:
    """ShapeMismatchError naming the tensor when its shape is not `shape`."""
    if tuple(tensor.shape) != tuple(shape):
        raise ShapeMismatchError(f"{name}: shape {list(tensor.shape)}, expected {list(shape)} ({why})")


def expect_int32(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype != torch.int32:
        raise ShapeMismatchError(f"{name}: dtype {tensor.dtype}, expected torch.int32 packed words")


def perm_from_g_idx(name: str, g_idx: torch.Tensor, group_size: int, k: int) -> torch.Tensor | None:
    """The input permutation that makes the groups of `g_idx` contiguous, or None if they are.

    g_idx[k] is the group of input column k. GPTQ act-order (desc_act) quantizes columns in a
    Hessian order and stores them in the original order, so g_idx is not monotonic; sorting the
    columns by group (stably) gives stored column j = original column perm[j], and group g is then
    stored columns [g*gs, (g+1)*gs) as the packed format requires (docs/FORMAT.md 4.4).
    """
    gs = effective_group_size(group_size, k)
    natural = torch.arange(k, dtype=torch.int64) // gs
    g = g_idx.to(torch.int64)
    expect_shape(name, g_idx, (k,), "one group index per input column")
    if torch.equal(g, natural):
        return None
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], natural):
        counts = torch.bincount(g, minlength=int(natural[-1]) + 1).tolist()
        raise UnsupportedFormatError(
            f"{name}: groups have sizes {counts[:8]}{'...' if len(counts) > 8 else ''}, but group_size={group_size} "
            f"needs {gs} columns per group (the last may be shorter); the checkpoint's g_idx does not match its config"
        )
    return perm.to(torch.int32)


def build_linear(
    name: str,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    perm: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> PackedLinear:
    """A PackedLinear from codes [N, K] (original column order), per-group scales [N, G] and
    integer zero points [N, G] (None: symmetric, implicit 2^(b-1)).

    With `perm`, columns are stored in perm order (W_stored[:, j] = W[:, perm[j]]). Zero points
    that are all 2^(b-1) become the symmetric mode (no zeros tensor, same weights). A zero point
    of 2^b (only a GPTQ v1 underflow produces it) does not fit a uint8 code zero, so that linear
    is stored exactly in the float mode instead: offsets = -s*z in float32 (s*q exact in fp32).
    """
    n, k = codes.shape
    if perm is not None:
        codes = codes[:, perm.long()]
    codes = codes.to(torch.uint8)
    offsets = None
    mid = 2 ** (bits - 1)
    if zeros is not None and bool((zeros == mid).all()):
        zeros = None
    elif zeros is not None and int(zeros.max()) >= 2**bits:
        offsets = -(scales.to(torch.float32) * zeros.to(torch.float32))
        zeros = None
    elif zeros is not None:
        zeros = zeros.to(torch.uint8)
    lin = PackedLinear(
        in_features=k, out_features=n, bits=bits, group_size=group_size, qweight=pack(codes.contiguous(), bits),
        scales=scales.contiguous(), zeros=None if zeros is None else zeros.contiguous(), offsets=offsets,
        perm=perm, bias=bias,
    )
    lin.validate(name)
    return lin


def checked_bias(name: str, bias: torch.Tensor | None, config: ModelConfig, n: int) -> torch.Tensor | None:
    """The stored bias, or None. Some GPTQ writers save an all-zero `bias` for every linear of
    an architecture without biases: dropping it is lossless; a non-zero one is an error."""
    if bias is not None:
        expect_shape(f"{name}.bias", bias, (n,), "one bias per output feature")
    if expects_bias(config, name):
        if bias is None:
            raise ShapeMismatchError(f"{name}.bias: missing, but the config says this layer has a bias")
        return bias
    if bias is not None and bool(bias.any()):
        raise ShapeMismatchError(f"{name}.bias: non-zero bias on a layer the config says has none")
    return None


def with_checked_bias(lin: PackedLinear, name: str, config: ModelConfig) -> PackedLinear:
    """`lin` with its bias checked against the config (see checked_bias)."""
    lin.bias = checked_bias(name, lin.bias, config, lin.out_features)
    return lin


def check_choice(source: str, key: str, value: Any, allowed: tuple, what: str) -> None:
    """UnsupportedFormatError naming the config key when `value` is not one of `allowed`."""
    if value not in allowed:
        raise UnsupportedFormatError(
            f"{source}: {key}={value!r} is not supported; qruntime reads {what} with {key} in {list(allowed)}"
        )
