"""AutoAWQ checkpoints (GEMM and GEMV layouts) -> the packed format, losslessly.

4-bit only, zero points always stored raw (no minus-one), no g_idx. W[n, k] = (q - z) * s.

GEMM ("gemm"), per linear (K = in_features, N = out_features, G = K / group_size):

    qweight  [K, N/8]  int32  packed along N; field i of word c holds column 8c + AWQ_ORDER[i]
    qzeros   [G, N/8]  int32  same interleave
    scales   [G, N]    fp16

    AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7] (the order its CUDA kernel's dequantization wants)

GEMV ("gemv"): packed along K in plain order, and zeros/scales padded to a kernel-friendly width:

    qweight  [N, K/8]          int32  field i of word c holds column 8c + i
    qzeros   [N, W]            int32  field i of word c holds group 8c + i; W >= ceil(G/8)
    scales   [N, 8*W]          fp16   columns [0, G) are the groups, the rest padding

Config: `config.json["quantization_config"]` {quant_method: "awq", bits, group_size, zero_point,
version, modules_to_not_convert} or AutoAWQ's older `quant_config.json` {w_bit, q_group_size,
zero_point, version}.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qruntime.checkpoint import PackedLinear, expected_linear_shapes
from qruntime.errors import InvalidOptionError, ShapeMismatchError, UnsupportedFormatError
from qruntime.format import read_json
from qruntime.quantizers.base import QuantPolicy, check_group_size

from .base import Converter, register
from .foreign import build_linear, check_choice, expect_int32, expect_shape, unpack_words, with_checked_bias
from .hf import HFWeights, build_checkpoint, peek_config, read_config, stores_tensor

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
QUANT_CONFIG = "quant_config.json"
VERSIONS = ("gemm", "gemv")


@dataclass(frozen=True)
class AWQSpec:
    group_size: int
    version: str
    source: str


def detect(path: Path) -> bool:
    if not path.is_dir():
        return False
    method = str(peek_config(path).get("quantization_config", {}).get("quant_method", "")).lower()
    return method == "awq" or (method == "" and (path / QUANT_CONFIG).is_file())


def read_awq_config(path: Path) -> tuple[AWQSpec, list[str]]:
    """(spec, modules_to_not_convert); refuses what AutoAWQ's GEMM/GEMV 4-bit layouts do not cover."""
    qc = peek_config(path).get("quantization_config")
    if isinstance(qc, dict):
        source, cfg = str(path / "config.json") + " quantization_config", qc
        bits, group_size = cfg.get("bits", cfg.get("w_bit")), cfg.get("group_size", cfg.get("q_group_size"))
    elif (path / QUANT_CONFIG).is_file():
        source, cfg = str(path / QUANT_CONFIG), read_json(path / QUANT_CONFIG)
        bits, group_size = cfg.get("w_bit", cfg.get("bits")), cfg.get("q_group_size", cfg.get("group_size"))
    else:
        raise UnsupportedFormatError(f"{path}: no AWQ config (config.json quantization_config or {QUANT_CONFIG})")
    check_choice(source, "bits", bits, (4,), "AWQ checkpoints")
    version = str(cfg.get("version", "gemm")).lower()
    check_choice(source, "version", version, VERSIONS, "AWQ checkpoints")
    check_choice(source, "zero_point", cfg.get("zero_point", True), (True,),
                 "AWQ checkpoints (AutoAWQ packs only zero-point models)")
    try:
        check_group_size(int(group_size))
    except (InvalidOptionError, TypeError, ValueError):
        raise UnsupportedFormatError(f"{source}: group_size={group_size!r}; need a power of two >= 16 or -1") from None
    return AWQSpec(int(group_size), version, source), list(cfg.get("modules_to_not_convert") or [])


def _groups(name: str, k: int, spec: AWQSpec) -> int:
    gs = k if spec.group_size == -1 else spec.group_size
    if k % gs:
        raise ShapeMismatchError(f"{name}: in_features={k} is not a multiple of group_size={gs} ({spec.source})")
    return k // gs


def read_linear(weights: HFWeights, name: str, spec: AWQSpec, shape: tuple[int, int]) -> PackedLinear:
    """One AWQ linear -> PackedLinear (lossless). `shape` is (out_features, in_features); a stored bias is returned as is."""
    n, k = shape
    g = _groups(name, k, spec)
    hint = f"in_features={k}, out_features={n}, 4 bits, group_size={spec.group_size}, version={spec.version}"
    qweight, qzeros = weights.get(f"{name}.qweight"), weights.get(f"{name}.qzeros")
    scales = weights.get(f"{name}.scales")
    expect_int32(f"{name}.qweight", qweight)
    expect_int32(f"{name}.qzeros", qzeros)
    if spec.version == "gemm":
        expect_shape(f"{name}.qweight", qweight, (k, n // 8), hint)
        expect_shape(f"{name}.qzeros", qzeros, (g, n // 8), hint)
        expect_shape(f"{name}.scales", scales, (g, n), hint)
        codes = unpack_words(qweight, 4, dim=1, order=AWQ_ORDER).t()  # [N, K]
        zeros = unpack_words(qzeros, 4, dim=1, order=AWQ_ORDER).t()  # [N, G]
        scales = scales.t()
    else:
        expect_shape(f"{name}.qweight", qweight, (n, k // 8), hint)
        width = qzeros.shape[1] if qzeros.dim() == 2 else -1
        if width * 8 < g:
            raise ShapeMismatchError(f"{name}.qzeros: shape {list(qzeros.shape)}, expected [{n}, >= {-(-g // 8)}] ({hint})")
        expect_shape(f"{name}.qzeros", qzeros, (n, width), hint)
        expect_shape(f"{name}.scales", scales, (n, 8 * width), f"{hint}; scales are padded like qzeros")
        codes = unpack_words(qweight, 4, dim=1)
        zeros = unpack_words(qzeros, 4, dim=1)[:, :g]
        scales = scales[:, :g]
    bias = weights.get(f"{name}.bias") if f"{name}.bias" in weights else None
    return build_linear(name, codes, scales, zeros, 4, spec.group_size, bias=bias)


def convert(path: Path, policy: QuantPolicy | None = None, hash_sources: bool = False, progress: bool = True):
    """Reads an AutoAWQ directory; float linears (modules_to_not_convert, lm_head) follow `policy`."""
    path = Path(path)
    spec, skipped = read_awq_config(path)
    config = read_config(path)
    shapes = dict(expected_linear_shapes(config, has_lm_head=True))

    def reader(weights: HFWeights, name: str) -> PackedLinear | None:
        if f"{name}.qweight" in weights:
            return with_checked_bias(read_linear(weights, name, spec, shapes[name]), name, config)
        if f"{name}.weight" not in weights and name != "lm_head":
            raise ShapeMismatchError(f"{path}: linear {name!r} has neither qweight nor weight "
                                     f"(modules_to_not_convert: {skipped})")
        return None

    return build_checkpoint(path, "awq", policy=policy, read_quantized=reader,
                            lm_head_quantized=stores_tensor(path, "lm_head.qweight"), hash_sources=hash_sources,
                            progress=progress)


register(Converter(name="awq", detect=detect, convert=convert))
