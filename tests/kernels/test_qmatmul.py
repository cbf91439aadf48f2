"""kernels.qmatmul (split-K decode GEMV and prefill GEMM) against kernels.reference.linear."""

import pytest
import torch

from qruntime.kernels.layout import concat_out_features, prepare
from qruntime.kernels.qmatmul import qmatmul, qmatmul_accumulate
from qruntime.kernels.reference import linear as ref_linear
from packed_linears import make_linear, shipped_decode_configs
from tolerances import assert_close

# (M, N, K): one row / a few / 16 rows; N and K not multiples of the blocks; K inside one group or many
SHAPES = {"m1-n33-k100": (1, 33, 100), "m3-n17-k64": (3, 17, 64), "m16-n40-k200": (16, 40, 200)}


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


@pytest.mark.parametrize("k, group", [(96, -1), (100, -1), (144, 48)], ids=["one-group-k96", "one-group-k100", "groups-of-48"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_default_tiles_fit_any_group(k, group, dtype):
    """The general kernel's K tile stays a power of two inside one group whatever K and the group:
    one group over a K that is not a power of two (per-channel weights of a hidden size such as 96;
    it was min(tile, K) = 96, which Triton cannot lay out), and groups of 48 (tiles of 16). Default
    configs, both entries, one row (the packed GEMV declines bf16, fp32 and K = 100, so the FMA path
    runs) and three."""
    lin = make_linear(24, k, 4, group, "int", seed=k)
    t = prepare(lin, torch.device("cpu"), dtype)
    for m in (1, 3):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
        ref = ref_linear(x.float(), lin)
        start = torch.randn(m, 24)
        out = start.clone()
        qmatmul_accumulate(x, t, out)
        assert_close(out - start, ref, "fp16_dot")
        assert_close(qmatmul(x, t, out=torch.full((m, 24), float("nan"))), ref, "fp16_dot")


@pytest.mark.parametrize("config", [(128, 3, 2, 4, "ws-tma-stream+scales"), (128, 12, 3, 2, "tma-stream"),
                                    (128, 512, 2, 4, "tma-frags"), (64, 1024, 1, 2, "frags")],
                         ids=lambda c: c[4])
def test_few_row_configs_serve_weights_no_fast_kernel_takes(config):
    """Float offsets in groups of 32 (GGUF's Q4_K) at M = 3: the fragment kernels take integer zero
    points only and the slot kernel a K slice of 128 inside a group, so every few-row config ends on
    the general kernel. A stream config's second field counts programs an SM, not columns of K (taken
    for a K tile, 3 and 12 failed): the stream paths fall back with the fragment kernel's K slice."""
    lin = make_linear(40, 96, 4, 32, "float", seed=3)
    t = prepare(lin, torch.device("cpu"), torch.float16)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(4)).half()
    out = torch.zeros(3, 40)
    qmatmul_accumulate(x, t, out, config=config)
    assert_close(out, ref_linear(x.float(), lin), "fp16_dot")


# weights that the fast kernels take, and some that each declines: float offsets in groups of 32
# (GGUF's Q4_K), act-order, one group over a K that is not a power of two, groups of 16 (Q6_K)
WEIGHTS = [(4, 128, "int", False, 256), (4, 32, "float", False, 128), (8, 128, "int", True, 256),
           (4, -1, "symmetric", False, 96), (8, 16, "symmetric", False, 64)]


@pytest.mark.parametrize("config, rows", sorted(shipped_decode_configs().items(), key=str), ids=str)
def test_every_shipped_config_serves_any_linear(config, rows):
    """A table entry is chosen by shape alone, so it meets whatever weights that shape has: each
    shipped config, at the rows it was tuned for (1, or 3 and 16 for a few-row entry), adds x @ W.T
    for every kind of weights, through its own kernel or the fallbacks (the interpreter has no TMA,
    so the TMA configs take theirs). fp16 rows, as the decode step's."""
    for bits, group, zero_mode, act_order, k in WEIGHTS:
        lin = make_linear(24, k, bits, group, zero_mode, act_order=act_order, seed=k + bits)
        t = prepare(lin, torch.device("cpu"), torch.float16)
        for m in ([1] if rows == 1 else [3, 16]):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).half()
            start = torch.randn(m, 24)
            out = start.clone()
            qmatmul_accumulate(x, t, out, config=config)
            assert_close(out - start, ref_linear(x.float(), lin), "fp16_dot")


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


@pytest.mark.parametrize("zero_mode", ["symmetric", "int", "float"])
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_reference_linear_in_row_blocks_is_the_whole_product(monkeypatch, bits, zero_mode):
    """On a CPU reference.linear dequantizes a block of rows at a time: blocks of 3 rows of 37 (the
    last one short), a short last group, act order and a bias give x @ W.T + b of the whole weight;
    and dequantize's row blocks are the whole weight's rows, bit for bit."""
    from qruntime.kernels import reference

    n, k = 37, 200
    lin = make_linear(n, k, bits, 64, zero_mode, act_order=True, seed=bits)
    whole = reference.dequantize(lin)
    assert torch.equal(torch.cat([reference.dequantize(lin, rows=slice(r, r + 5)) for r in range(0, n, 5)]), whole)
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(2))
    expected = x @ reference.dequantize_original_order(lin).T + lin.bias.float()
    monkeypatch.setattr(reference, "CPU_BLOCK_ELEMENTS", 3 * k)
    y = reference.linear(x, lin)
    assert y.shape == (4, n) and torch.allclose(y, expected, rtol=1e-5, atol=1e-5)
