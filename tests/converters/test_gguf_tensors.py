"""Per tensor: the converter's packed weights vs gguf-py's own dequantization of the same tensor.

Exact (bit for bit) for F32/F16 and the one-level types (their scales are the file's fp16 values);
within docs/FORMAT.md's bound for the K types, whose two-level scales d*sc and dmin*m are rounded
to fp16. The Q/K rows are compared after re-applying llama.cpp's permutation with the fixture's
own implementation, so the converter's un-permutation is checked too.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf_fixtures import QUANT_FILE_TYPES, _gguf_name, llama_permute

from qruntime.converters.gguf import convert
from qruntime.kernels.reference import dequantize
from qruntime.quantizers.packing import unpack

EXACT_TYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}
K_TYPES = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
FP16_EPS = 2.0**-11        # half an fp16 ulp, relative (normal range)
FP16_SUBNORMAL = 2.0**-25  # half the fp16 subnormal spacing, absolute
FILES = [(m, t) for m in ("llama", "qwen2") for t in ("F32", "F16", *QUANT_FILE_TYPES)] + [("qwen2", "BF16")]


def _report(name: str, diff: np.ndarray, bound: np.ndarray | float) -> str:
    bad = np.argwhere(diff > bound)
    return f"{name}: {len(bad)} elements beyond the bound, first at {bad[:5].tolist()}; max diff {diff.max():.3e}"


def _gguf_dequantized(reader: gguf.GGUFReader) -> dict[str, tuple[str, np.ndarray]]:
    return {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type)
                     .reshape(tuple(reversed(t.shape.tolist())))) for t in reader.tensors}


def _in_gguf_layout(cfg, hf_name: str, w: np.ndarray) -> np.ndarray:
    """Re-applies llama.cpp's Q/K permutation (llama arch only) to a weight in HF layout."""
    if cfg.family == "llama" and ".self_attn.q_proj" in hf_name:
        return llama_permute(w, cfg.num_heads)
    if cfg.family == "llama" and ".self_attn.k_proj" in hf_name:
        return llama_permute(w, cfg.num_kv_heads)
    return w


def _k_bound(lin, q_signed: np.ndarray, w: np.ndarray) -> np.ndarray:
    """docs/FORMAT.md GGUF bound: |dW| <= 2^-11 (|s q| + |m|) + 2^-25 (|q| + 1) with s, m the exact
    two-level values (taken here from the stored fp16 ones, widened by one more rounding), plus
    float32 rounding of the result."""
    gs = lin.group_size
    s = np.repeat(lin.scales.float().numpy(), gs, axis=1)
    m = np.repeat(lin.offsets.float().numpy(), gs, axis=1) if lin.offsets is not None else 0.0
    widen = 1 + 2 * FP16_EPS
    return (FP16_EPS * (np.abs(s * q_signed) + np.abs(m)) * widen + FP16_SUBNORMAL * (np.abs(q_signed) + 1)
            + 2.0**-23 * np.abs(w))


@pytest.mark.parametrize("model,ftype", FILES, ids=[f"{m}-{t}" for m, t in FILES])
def test_tensors_match_gguf_dequantize(gguf_zoo, model, ftype):
    path = gguf_zoo.file(model, ftype)
    ckpt = convert(path, progress=False)
    ref = _gguf_dequantized(gguf.GGUFReader(str(path)))
    cfg, seen = ckpt.config, set()
    for hf, lin in ckpt.linears.items():
        gname = "token_embd.weight" if hf == "lm_head" and "output.weight" not in ref else _gguf_name(hf + ".weight")
        seen.add(gname)
        qtype, expected = ref[gname]
        ours_hf = dequantize(lin).numpy()
        ours = _in_gguf_layout(cfg, hf, ours_hf)
        diff = np.abs(ours - expected)
        if qtype in EXACT_TYPES:
            assert np.array_equal(ours, expected), _report(f"{hf} ({qtype})", diff, 0.0)
        else:
            assert qtype in K_TYPES, qtype
            q = unpack(lin.qweight, lin.bits, lin.in_features).numpy().astype(np.float64)
            q -= 2 ** (lin.bits - 1) if lin.zero_mode == "symmetric" else 0
            bound = _in_gguf_layout(cfg, hf, _k_bound(lin, q, ours_hf))
            assert (diff <= bound).all(), _report(f"{hf} ({qtype})", diff, bound)
        if lin.bias is not None:
            _, b = ref[_gguf_name(hf + ".bias")]
            assert np.array_equal(_in_gguf_layout(cfg, hf, lin.bias.numpy()), b), f"{hf}.bias"
    for hf, t in ckpt.dense.items():
        gname = _gguf_name(hf)
        seen.add(gname)
        qtype, expected = ref[gname]
        ours = t.float().numpy()
        if qtype in ("F32", "F16", "BF16"):
            assert np.array_equal(ours, expected), _report(f"{hf} ({qtype})", np.abs(ours - expected), 0.0)
        else:  # a quantized embedding, dequantized exactly then rounded once to fp16
            assert t.dtype == torch.float16
            bound = FP16_EPS * np.abs(expected) + FP16_SUBNORMAL
            assert (np.abs(ours - expected) <= bound).all(), _report(hf, np.abs(ours - expected), bound)
    assert seen | {"rope_freqs.weight"} >= set(ref) - {n for n in ref if n.endswith(".bias")}


def test_fixture_files_hold_the_types_under_test(gguf_zoo):
    """The fixtures really contain every mapped type, including llama.cpp's fallbacks for rows that
    are not a multiple of 256 (Q5_0, Q5_1, Q8_0 in the hidden-320 model)."""
    seen: dict[str, set[str]] = {}
    for model, ftype in FILES:
        for t in gguf.GGUFReader(str(gguf_zoo.file(model, ftype))).tensors:
            seen.setdefault(t.tensor_type.name, set()).add(f"{model}-{ftype}")
    assert {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"} <= set(seen)
    assert "qwen2-Q4_K_M" in seen["Q5_0"] or "qwen2-Q4_K_M" in seen["Q5_1"] or "qwen2-Q4_K_M" in seen["Q8_0"]
