"""compressed-tensors checkpoints (llm-compressor), the `pack-quantized` weight-only schemes
W4A16 / W8A16 -> the packed format, losslessly.

Per quantized linear (K = in_features, N = out_features, b = 4 or 8, G = groups):

    weight_packed      [N, ceil(K*b/32)]  int32  packed along K, low bits first
    weight_scale       [N, G]             float  (G = 1 for the channel strategy)
    weight_zero_point  [ceil(N*b/32), G]  int32  packed along N (asymmetric only; older
                                                 writers store it unpacked, int8 [N, G])
    weight_shape       [2]                int    (N, K)
    weight_g_idx       [K]                int32  group of input column k (actorder "group")

Values are signed and stored offset by 2^(b-1), zero points too: with u the stored unsigned
field, W = s * ((u - 2^(b-1)) - zp) = s * (u - u_zp). So a symmetric scheme is the packed
format's symmetric mode (implicit zero 2^(b-1)) and an asymmetric one its int mode, codes
unchanged.

Anything else (activation quantization, fp8/fp4 types, 2:4 sparsity, KV cache quantization,
other storage formats) is refused with an error that names the scheme.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qruntime.checkpoint import PackedLinear, expected_linear_shapes
from qruntime.errors import ShapeMismatchError, UnsupportedFormatError
from qruntime.quantizers.base import QuantPolicy

from .base import Converter, register
from .foreign import build_linear, expect_int32, expect_shape, perm_from_g_idx, unpack_words, with_checked_bias
from .hf import HFWeights, build_checkpoint, peek_config, read_config, stores_tensor

FORMAT = "pack-quantized"
STRATEGIES = {"group": None, "channel": -1}  # strategy -> fixed group size (None: from the scheme)


@dataclass(frozen=True)
class CTScheme:
    """One config group: which linears it targets and how their weights are stored."""

    name: str
    targets: tuple[str, ...]
    bits: int
    group_size: int
    symmetric: bool
    source: str


def detect(path: Path) -> bool:
    qc = peek_config(path).get("quantization_config", {}) if path.is_dir() else {}
    return str(qc.get("quant_method", "")).lower() in ("compressed-tensors", "compressed_tensors")


def _describe(args: dict[str, Any] | None) -> str:
    if not args:
        return "none"
    return (f"{args.get('type', 'int')} {args.get('num_bits')}-bit {args.get('strategy')}"
            f"{'' if args.get('group_size') is None else ' ' + str(args.get('group_size'))}"
            f"{' dynamic' if args.get('dynamic') else ''}")


def parse_schemes(qc: dict[str, Any], source: str) -> tuple[list[CTScheme], list[str]]:
    """(schemes, ignore list) from a quantization_config; refuses schemes we cannot run."""
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise UnsupportedFormatError(f"{source}: quantization_status={status!r}; only 'compressed' checkpoints "
                                     "hold packed weights (save it with llm-compressor's save_compressed=True)")
    sparsity = qc.get("sparsity_config") or {}
    if sparsity and sparsity.get("format", "dense") != "dense":
        raise UnsupportedFormatError(f"{source}: sparsity scheme {sparsity.get('format')!r} "
                                     f"({sparsity.get('sparsity_structure', '?')}) is not supported; qruntime runs dense weights")
    if qc.get("kv_cache_scheme"):
        raise UnsupportedFormatError(f"{source}: kv_cache_scheme {_describe(qc['kv_cache_scheme'])} (KV cache "
                                     "quantization) is not supported")
    if qc.get("transform_config"):
        raise UnsupportedFormatError(f"{source}: transform_config (rotations) is not supported")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise UnsupportedFormatError(f"{source}: no config_groups")
    schemes = []
    for gname, group in groups.items():
        where = f"{source} config_groups.{gname}"
        fmt = group.get("format") or qc.get("format")
        weights = group.get("weights")
        scheme = (f"weights {_describe(weights)}, input_activations {_describe(group.get('input_activations'))}, "
                  f"output_activations {_describe(group.get('output_activations'))}, format {fmt}")
        if group.get("input_activations") or group.get("output_activations"):
            raise UnsupportedFormatError(f"{where}: activation quantization ({scheme}) is not supported; "
                                         "qruntime runs weight-only W4A16/W8A16 pack-quantized schemes")
        if not weights or weights.get("type", "int") != "int" or weights.get("num_bits") not in (4, 8):
            raise UnsupportedFormatError(f"{where}: {scheme} is not supported; qruntime reads int 4- or 8-bit weights")
        strategy = weights.get("strategy")
        if strategy not in STRATEGIES or fmt != FORMAT:
            raise UnsupportedFormatError(f"{where}: {scheme} is not supported; qruntime reads the {FORMAT} format "
                                         f"with strategy {' or '.join(STRATEGIES)}")
        gs = STRATEGIES[strategy] if STRATEGIES[strategy] is not None else int(weights.get("group_size") or 0)
        if gs != -1 and (gs < 16 or gs & (gs - 1)):
            raise UnsupportedFormatError(f"{where}: group_size={gs}; the packed format needs a power of two >= 16")
        schemes.append(CTScheme(gname, tuple(group.get("targets") or ()), int(weights["num_bits"]), gs,
                                bool(weights.get("symmetric", True)), where))
    return schemes, list(qc.get("ignore") or [])


def matches(name: str, target: str) -> bool:
    """compressed-tensors target rules: "re:<regex>" matches the module name, "Linear" every
    linear, anything else the exact module name."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == "Linear" or target == name


def read_linear(weights: HFWeights, name: str, scheme: CTScheme, shape: tuple[int, int]) -> PackedLinear:
    """One pack-quantized linear -> PackedLinear (lossless). `shape` is (out_features, in_features); a stored bias is returned as is."""
    n, k = shape
    b, off = scheme.bits, 2 ** (scheme.bits - 1)
    hint = f"in_features={k}, out_features={n}, {b} bits, group_size={scheme.group_size} from {scheme.source}"
    gs = k if scheme.group_size == -1 else scheme.group_size
    if k % gs:
        raise ShapeMismatchError(f"{name}: in_features={k} is not a multiple of group_size={gs} ({scheme.source})")
    g = k // gs
    packed = weights.get(f"{name}.weight_packed")
    scale = weights.get(f"{name}.weight_scale")  # MissingTensorError names the tensor
    expect_int32(f"{name}.weight_packed", packed)
    expect_shape(f"{name}.weight_packed", packed, (n, -(-k * b // 32)), hint)
    expect_shape(f"{name}.weight_scale", scale, (n, g), hint)
    if f"{name}.weight_shape" in weights:
        shape = [int(v) for v in weights.get(f"{name}.weight_shape").reshape(-1)]
        if shape != [n, k]:
            raise ShapeMismatchError(f"{name}.weight_shape: {shape}, the config expects [{n}, {k}]")
    codes = unpack_words(packed, b, dim=1)[:, :k]
    zeros = None
    if not scheme.symmetric:
        zp = weights.get(f"{name}.weight_zero_point")
        if zp.dtype == torch.int32:  # packed along N like the weight's K
            expect_shape(f"{name}.weight_zero_point", zp, (-(-n * b // 32), g), hint)
            zeros = unpack_words(zp, b, dim=0)[:n]
        else:  # older writers: signed int8 [N, G]
            expect_shape(f"{name}.weight_zero_point", zp, (n, g), hint)
            zeros = zp.to(torch.int16) + off
    perm = None
    if f"{name}.weight_g_idx" in weights:
        perm = perm_from_g_idx(f"{name}.weight_g_idx", weights.get(f"{name}.weight_g_idx"), scheme.group_size, k)
    bias = weights.get(f"{name}.bias") if f"{name}.bias" in weights else None
    # symmetric: zeros None -> the packed format's implicit 2^(b-1), exactly the stored offset
    return build_linear(name, codes, scale, zeros, b, scheme.group_size, perm=perm,
                        bias=bias)


def convert(path: Path, policy: QuantPolicy | None = None, hash_sources: bool = False, progress: bool = True):
    """Reads a compressed-tensors directory; ignored (float) linears follow `policy`."""
    path = Path(path)
    source = f"{path / 'config.json'} quantization_config"
    schemes, ignore = parse_schemes(peek_config(path).get("quantization_config") or {}, source)
    config = read_config(path)
    shapes = dict(expected_linear_shapes(config, has_lm_head=True))

    def reader(weights: HFWeights, name: str) -> PackedLinear | None:
        if f"{name}.weight_packed" not in weights:
            return None  # float weight (ignored module); build_checkpoint reads it or reports it missing
        if any(matches(name, t) for t in ignore):
            raise UnsupportedFormatError(f"{name}.weight_packed: present, but {source} ignores {name}")
        scheme = next((s for s in schemes if any(matches(name, t) for t in s.targets)), None)
        if scheme is None:
            raise UnsupportedFormatError(f"{name}.weight_packed: no config group of {source} targets {name}")
        return with_checked_bias(read_linear(weights, name, scheme, shapes[name]), name, config)

    return build_checkpoint(path, "compressed-tensors", policy=policy, read_quantized=reader,
                            lm_head_quantized=stores_tensor(path, "lm_head.weight_packed"),
                            hash_sources=hash_sources, progress=progress)


register(Converter(name="compressed-tensors", detect=detect, convert=convert))
