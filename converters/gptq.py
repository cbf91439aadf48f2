"""GPTQ checkpoints written by AutoGPTQ or GPTQModel -> the packed format, losslessly.

Per quantized linear (K = in_features, N = out_features, b = bits, G = groups):

    qweight  [K*b/32, N]  int32  packed along K, low bits first (field i of word r = row r*32/b + i)
    qzeros   [G, N*b/32]  int32  packed along N, low bits first
    scales   [G, N]       fp16
    g_idx    [K]          int32  group of input column k (optional: k // group_size when absent)
    bias     [N]          fp16   (optional)

    W[n, k] = scales[g_idx[k], n] * (q[k, n] - Z[g_idx[k], n])

Zero points: v1 ("gptq", AutoGPTQ and GPTQModel's default export) stores Z - 1 in each field, so
Z = field + 1, per field as AutoGPTQ's dequantization does it (a v1 asymmetric zero of 0 underflows
when packed; its field reads back as 2^b - 1 and Z = 2^b, which `build_linear` keeps exactly).
v2 ("gptq_v2", GPTQModel) stores Z itself. Act-order (desc_act) checkpoints have a non-monotonic
g_idx: it becomes the packed format's input permutation, so nothing is lost.

Config: `config.json["quantization_config"]` (quant_method "gptq") and/or `quantize_config.json`;
where both exist they must agree. GPTQModel's per-module `dynamic` overrides ("-:regex" skips a
module, "+:regex" or "regex" overrides bits/group_size) are honoured.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from qruntime.checkpoint import PackedLinear, expected_linear_shapes, num_groups
from qruntime.errors import InvalidOptionError, ShapeMismatchError, UnsupportedFormatError
from qruntime.format import read_json
from qruntime.quantizers.base import QuantPolicy, check_group_size

from .base import Converter, register
from .foreign import (
    build_linear, check_choice, expect_int32, expect_shape, perm_from_g_idx, unpack_words, with_checked_bias,
)
from .hf import HFWeights, build_checkpoint, peek_config, read_config, stores_tensor

QUANTIZE_CONFIG = "quantize_config.json"
# checkpoint_format -> what is added to a stored zero-point field to get Z
ZERO_ENCODINGS = {"gptq": 1, "gptq_v2": 0}
READ_BITS = (4, 8)  # 2 and 3 bits exist in GPTQ but the packed format has no 2/3-bit codes


@dataclass(frozen=True)
class GPTQSpec:
    """How one linear was quantized."""

    bits: int
    group_size: int
    zero_offset: int  # ZERO_ENCODINGS value
    source: str  # the config file, for error messages


def detect(path: Path) -> bool:
    if not path.is_dir():
        return False
    method = str(peek_config(path).get("quantization_config", {}).get("quant_method", "")).lower()
    return method == "gptq" or (method == "" and (path / QUANTIZE_CONFIG).is_file())


def read_gptq_config(path: Path) -> tuple[GPTQSpec, dict[str, Any], str]:
    """(default spec, dynamic overrides, source) from quantize_config.json and/or config.json."""
    found: list[tuple[str, dict[str, Any]]] = []
    qc = peek_config(path).get("quantization_config")
    if isinstance(qc, dict):
        method = str(qc.get("quant_method", "gptq")).lower()
        if method != "gptq":
            raise UnsupportedFormatError(f"{path / 'config.json'}: quant_method={method!r} is not a GPTQ checkpoint")
        found.append((str(path / "config.json") + " quantization_config", qc))
    if (path / QUANTIZE_CONFIG).is_file():
        found.append((str(path / QUANTIZE_CONFIG), read_json(path / QUANTIZE_CONFIG)))
    if not found:
        raise UnsupportedFormatError(f"{path}: no GPTQ config (config.json quantization_config or {QUANTIZE_CONFIG})")
    source, cfg = found[0]
    for other_source, other in found[1:]:
        for key in ("bits", "group_size"):
            if key in other and key in cfg and other[key] != cfg[key]:
                raise UnsupportedFormatError(
                    f"{source} says {key}={cfg[key]}, {other_source} says {key}={other[key]}; fix the stale file"
                )
    merged = {**found[-1][1], **cfg} if len(found) > 1 else cfg
    fmt = str(merged.get("checkpoint_format") or merged.get("format") or "gptq").lower()
    check_choice(source, "checkpoint_format", fmt, tuple(ZERO_ENCODINGS), "GPTQ checkpoints")
    check_choice(source, "pack_dtype", str(merged.get("pack_dtype", "int32")).replace("torch.", ""), ("int32",),
                 "GPTQ checkpoints")
    spec = _spec(merged, ZERO_ENCODINGS[fmt], source)
    dynamic = merged.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise UnsupportedFormatError(f"{source}: dynamic={dynamic!r} should map module regexes to overrides")
    return spec, dynamic, source


def _spec(cfg: dict[str, Any], zero_offset: int, source: str) -> GPTQSpec:
    if "bits" not in cfg:
        raise UnsupportedFormatError(f"{source}: no 'bits'")
    bits, group_size = int(cfg["bits"]), int(cfg.get("group_size", -1))
    if bits not in READ_BITS:
        raise UnsupportedFormatError(
            f"{source}: bits={bits}; qruntime reads 4- and 8-bit GPTQ (the packed format has no {bits}-bit codes)"
        )
    try:
        check_group_size(group_size)
    except InvalidOptionError:
        raise UnsupportedFormatError(f"{source}: group_size={group_size}; the packed format needs a power of two "
                                     ">= 16 or -1") from None
    return GPTQSpec(bits, group_size, zero_offset, source)


def spec_for(name: str, default: GPTQSpec, dynamic: dict[str, Any]) -> GPTQSpec | None:
    """The spec of linear `name` after GPTQModel `dynamic` overrides; None: left unquantized."""
    for pattern, override in dynamic.items():
        skip = pattern.startswith("-:")
        regex = pattern[2:] if pattern[:2] in ("-:", "+:") else pattern
        if re.match(regex, name):
            if skip:
                return None
            merged = {"bits": default.bits, "group_size": default.group_size, **(override or {})}
            return _spec(merged, default.zero_offset, f"{default.source} dynamic[{pattern!r}]")
    return default


def read_linear(weights: HFWeights, name: str, spec: GPTQSpec, shape: tuple[int, int]) -> PackedLinear:
    """One GPTQ linear -> PackedLinear (lossless). `shape` is (out_features, in_features); a stored bias is returned as is."""
    b = spec.bits
    n, k = shape
    hint = f"in_features={k}, out_features={n}, bits={b}, group_size={spec.group_size} from {spec.source}"
    if k * b % 32:
        raise UnsupportedFormatError(f"{name}.qweight: in_features={k} does not fill whole int32 words at {b} bits")
    qweight = weights.get(f"{name}.qweight")
    scales = weights.get(f"{name}.scales")  # MissingTensorError names the tensor
    qzeros = weights.get(f"{name}.qzeros")
    expect_int32(f"{name}.qweight", qweight)
    expect_int32(f"{name}.qzeros", qzeros)
    g = num_groups(spec.group_size, k)
    expect_shape(f"{name}.qweight", qweight, (k * b // 32, n), hint)
    expect_shape(f"{name}.scales", scales, (g, n), hint)
    expect_shape(f"{name}.qzeros", qzeros, (g, n * b // 32), hint)
    q = unpack_words(qweight, b, dim=0)  # [K, N]
    z = unpack_words(qzeros, b, dim=1) + spec.zero_offset  # [G, N]
    g_idx = weights.get(f"{name}.g_idx") if f"{name}.g_idx" in weights else None
    perm = None
    if g_idx is not None:
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= g:
            raise ShapeMismatchError(f"{name}.g_idx: group indices outside [0, {g}) ({hint})")
        perm = perm_from_g_idx(f"{name}.g_idx", g_idx, spec.group_size, k)
    bias = weights.get(f"{name}.bias") if f"{name}.bias" in weights else None
    return build_linear(name, q.t(), scales.t(), z.t(), b, spec.group_size, perm=perm,
                        bias=bias)


def convert(path: Path, policy: QuantPolicy | None = None, hash_sources: bool = False, progress: bool = True):
    """Reads a GPTQ directory; float linears (an unquantized lm_head, `dynamic` skips) follow `policy`."""
    path = Path(path)
    spec, dynamic, _ = read_gptq_config(path)
    config = read_config(path)
    shapes = dict(expected_linear_shapes(config, has_lm_head=True))

    def reader(weights: HFWeights, name: str) -> PackedLinear | None:
        if f"{name}.qweight" not in weights:
            if f"{name}.weight" not in weights and name != "lm_head":
                raise ShapeMismatchError(f"{path}: linear {name!r} has neither qweight nor weight")
            return None
        s = spec_for(name, spec, dynamic)
        if s is None:
            raise UnsupportedFormatError(f"{name}.qweight: present, but the config's dynamic rules skip {name}")
        return with_checked_bias(read_linear(weights, name, s, shapes[name]), name, config)

    return build_checkpoint(path, "gptq", policy=policy, read_quantized=reader,
                            lm_head_quantized=stores_tensor(path, "lm_head.qweight"), hash_sources=hash_sources,
                            progress=progress)


register(Converter(name="gptq", detect=detect, convert=convert))
