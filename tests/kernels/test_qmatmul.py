"""kernels.qmatmul (split-K decode GEMV and prefill GEMM) against kernels.reference.linear."""

import pytest
import torch

from qruntime.checkpoint import PackedLinear
from qruntime.kernels.layout import concat_out_features, prepare
from qruntime.kernels import reference as R
from qruntime.kernels.qmatmul import qmatmul, qmatmul_accumulate, qmatmul_accumulate_swiglu, swiglu_fusable
from qruntime.kernels.reference import linear as ref_linear
from qruntime.quantizers.rtn import quantize_rtn
from tolerances import assert_close

# (M, N, K): one row / a few / 16 rows; N and K not multiples of the blocks; K inside one group or many
SHAPES = {"m1-n33-k100": (1, 33, 100), "m3-n17-k64": (3, 17, 64), "m16-n40-k200": (16, 40, 200)}


def make_linear(n, k, bits, group, zero_mode, act_order=False, bias=True, seed=0) -> PackedLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    lin = quantize_rtn(w, bits, group, symmetric=zero_mode == "symmetric",
                       bias=torch.randn(n, generator=g) if bias else None)
    if zero_mode == "float":  # GGUF-style: w = s q + m with m = -s z (any float offset works)
        lin.offsets = (-lin.scales.float() * lin.zeros.float() + 0.01).to(torch.float16)
        lin.zeros = None
    if act_order:
        lin.perm = torch.randperm(k, generator=g).to(torch.int32)
    lin.validate("test")
    return lin


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("group", [32, 128, -1], ids=["g32", "g128", "per-channel"])
@pytest.mark.parametrize("zero_mode", ["symmetric", "int", "float"])
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_qmatmul_paths_match_reference(bits, zero_mode, group, shape):
    m, n, k = shape
    lin = make_linear(n, k, bits, group, zero_mode, seed=m + n)
    t = prepare(lin, torch.device("cpu"), torch.float32)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    ref = ref_linear(x, lin)

    # decode: accumulates onto what `out` holds (poisoned with a known start, not zeros)
    start = torch.randn(m, n)
    for use_dot in ([False, True] if m == 1 else [True]):
        out = start.clone()
        qmatmul_accumulate(x, t, out, config=(16, 32, 2, 4, use_dot))
        assert_close(out - start, ref, "fp16_dot" if use_dot else "fp32")

    # prefill: stores, with the residual in the epilogue; NaN poison catches unwritten elements
    residual = torch.randn(m, n)
    out = torch.full((m, n), float("nan"))
    qmatmul(x, t, residual=residual, out=out, config=(16, 16, 32, 4, 1))
    assert_close(out, ref + residual, "fp16_dot")


@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_act_order_permutation_applied_in_kernel(bits):
    lin = make_linear(24, 96, bits, 32, "int", act_order=True)
    t = prepare(lin, torch.device("cpu"), torch.float32)
    x = torch.randn(1, 96)
    out = torch.zeros(1, 24)
    qmatmul_accumulate(x, t, out, config=(16, 32, 1, 4, False))
    assert_close(out, ref_linear(x, lin), "fp32")
    y = qmatmul(torch.randn(5, 96), t, config=(16, 16, 32, 4, 1))
    assert y.shape == (5, 24)


def test_concat_out_features_is_row_stacking():
    a, b = make_linear(16, 64, 4, 32, "int", seed=1), make_linear(8, 64, 4, 32, "int", seed=2, bias=False)
    fused = concat_out_features([a, b])
    x = torch.randn(2, 64)
    torch.testing.assert_close(ref_linear(x, fused), torch.cat([ref_linear(x, a), ref_linear(x, b)], dim=1))
    with pytest.raises(ValueError, match="differ"):
        concat_out_features([a, make_linear(8, 64, 8, 32, "int")])


def test_rejects_bad_shapes():
    t = prepare(make_linear(16, 64, 4, 32, "int"), torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="K=65"):
        qmatmul(torch.randn(2, 65), t)
    with pytest.raises(ValueError, match="fp32"):
        qmatmul_accumulate(torch.randn(1, 64), t, torch.zeros(1, 16, dtype=torch.float16))
    with pytest.raises(ValueError, match="M=17"):
        qmatmul_accumulate(torch.randn(17, 64), t, torch.zeros(17, 16))


@pytest.mark.parametrize("shape", [(33, 96), (17, 64), (40, 200), (32, 128)], ids=["n33-k96", "n17-k64", "n40-k200", "n32-k128-whole-tiles"])
@pytest.mark.parametrize("group", [32, 128, -1], ids=["g32", "g128", "per-channel"])
@pytest.mark.parametrize("zero_mode", ["symmetric", "int", "float"])
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_packed_fp16_gemv_matches_reference(bits, zero_mode, group, shape):
    """The f16x2 decode path (inline PTX on the GPU; its plain-Triton emulation in the interpreter),
    two word rows chained per accumulator; n32-k128 has only whole tiles (the unmasked loads)."""
    n, k = shape
    lin = make_linear(n, k, bits, group, zero_mode, seed=n)
    t = prepare(lin, torch.device("cpu"), torch.float16)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(3)).half()
    start = torch.randn(1, n)
    out = start.clone()
    qmatmul_accumulate(x, t, out, config=(16, 32, 2, 4, "f16x2"))
    assert_close(out - start, ref_linear(x.float(), lin), "fp16_dot")


@pytest.mark.parametrize("shape", [(33, 96), (32, 128)], ids=["n33-k96", "n32-k128-whole-tiles"])
@pytest.mark.parametrize("zero_mode", ["symmetric", "int", "float"])
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_packed_fp16_gemv_one_word_row_tile(bits, zero_mode, shape):
    """A K tile of a single word row: nothing to chain, each word is its own fp16x2 accumulator."""
    n, k = shape
    lin = make_linear(n, k, bits, 32, zero_mode, seed=n + 1)
    t = prepare(lin, torch.device("cpu"), torch.float16)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(5)).half()
    out = torch.full((1, n), 0.0)
    qmatmul_accumulate(x, t, out, config=(16, 32 // bits, 1, 4, "f16x2"))
    assert_close(out, ref_linear(x.float(), lin), "fp16_dot")


@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_packed_fp16_gemv_scales_large_activations(bits):
    """Activations in the thousands (a down_proj input can reach them) would overflow the fp16 lane
    sums of a word on the GPU; the kernel scales such K slices by 2^-e and the result by 2^e, which
    is exact: here one slice is large, one moderate, one plain."""
    n, k = 24, 384
    lin = make_linear(n, k, bits, 128, "int", seed=5)
    t = prepare(lin, torch.device("cpu"), torch.float16)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(4))
    x[0, 5], x[0, 130] = 3000.0, -700.0
    x = x.half()
    out = torch.zeros(1, n)
    qmatmul_accumulate(x, t, out, config=(16, 128, 1, 4, "f16x2"))
    assert_close(out, ref_linear(x.float(), lin), "fp16_dot")



@pytest.mark.parametrize("tile", [(16, 32, 2, 4, "f16x2"), (16, 8, 1, 4, "f16x2")], ids=["chained-rows", "one-word-row"])
@pytest.mark.parametrize("shape", [(33, 96), (32, 128)], ids=["n33-k96", "n32-k128-whole-tiles"])
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_swiglu_fused_gemv_matches_swiglu_then_gemv(bits, shape, tile):
    """down_proj of the decode step reads the fp32 gate|up accumulator and forms silu(g) * u itself:
    the result equals the swiglu kernel's fp16 output fed to the plain GEMV, and gate_up is untouched."""
    n, k = shape
    lin = make_linear(n, k, bits, 32, "int", seed=k)
    t = prepare(lin, torch.device("cpu"), torch.float16)
    gu = torch.randn(1, 2 * k, generator=torch.Generator().manual_seed(7)) * 3
    gu[0, 7], gu[0, k + 7] = 40.0, 90.0  # one product in the thousands: the 2^-e scaling engages
    before = gu.clone()
    out = torch.zeros(1, n)
    qmatmul_accumulate_swiglu(gu, t, out, config=tile)
    assert torch.equal(gu, before)
    act = R.swiglu(gu).half()
    assert_close(out, ref_linear(act.float(), lin), "fp16_dot")


def test_swiglu_fused_gemv_refuses_what_it_cannot_serve():
    lin = make_linear(16, 64, 4, 32, "int", seed=1)
    t = prepare(lin, torch.device("cpu"), torch.float16)
    assert swiglu_fusable(t, (16, 32, 1, 4, "f16x2")) and not swiglu_fusable(t, (16, 32, 1, 4, True))
    with pytest.raises(ValueError, match="no packed-fp16 GEMV"):
        qmatmul_accumulate_swiglu(torch.zeros(1, 128), t, torch.zeros(1, 16), config=(16, 32, 1, 4, False))
    with pytest.raises(ValueError, match="fp32"):
        qmatmul_accumulate_swiglu(torch.zeros(1, 128).half(), t, torch.zeros(1, 16), config=(16, 32, 1, 4, "f16x2"))
