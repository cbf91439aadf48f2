"""kernels.slot_gemm (the few-row decode GEMM: one tensor-core dot per code slot), reached through
qmatmul_accumulate's "slots" and "slots-unrolled" paths, against kernels.reference.linear. In the interpreter the codes
are unpacked in plain Triton (EMULATE); the PTX itself is checked on the GPU (benchmarks/bench_gemv.py)."""

import pytest
import torch

from qruntime.kernels.layout import prepare
from qruntime.kernels.qmatmul import qmatmul_accumulate
from qruntime.kernels.reference import linear as ref_linear
from qruntime.kernels.slot_gemm import slot_rows, try_slot_gemm
from packed_linears import assert_accumulates_product, make_linear
from tolerances import assert_close

# (M, N, K, group): K slices of 16 word rows inside a group; N and K not multiples of the tiles
CASES = {
    "m3-n40-k200-per-channel": (3, 40, 200, -1),      # int4: 25 word rows, the last slice 9 of 16
    "m16-n33-k256-g128": (16, 33, 256, 128),          # two groups, a partial column tile
    "m1-n17-k384-g128": (1, 17, 384, 128),
    "m5-n32-k512-g256": (5, 32, 512, 256),            # several slices per group (int8: 4 per group)
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("zero_mode", ["symmetric", "int", "float"])
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_slot_gemm_matches_reference(bits, zero_mode, case):
    """One column tile per program, four awkward shapes (the unrolled path: see the next test)."""
    assert_accumulates_product(try_slot_gemm, (16, 128, 1, 4, "slots"), bits, zero_mode, case)


@pytest.mark.parametrize("path", ["slots", "slots-unrolled"])
@pytest.mark.parametrize("tiles", [2, 3], ids=["2-tiles", "3-tiles"])
@pytest.mark.parametrize("shape", [(40, 256), (96, 256)], ids=["n40-partial", "n96-whole"])
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_slot_gemm_several_column_tiles(bits, shape, tiles, path):
    """A program's K slice across `tiles` column tiles of 16, the next requested while the current
    is multiplied (a pipelined loop, or unrolled with register prefetch). N 40: a partial tile,
    and with 2 tiles a program whose second tile lies wholly past N. N 96 with 2 and 3 tiles: only
    whole tiles (EVEN, no masks on the words)."""
    n, k = shape
    lin = make_linear(n, k, bits, 128, "int", seed=tiles)
    t = prepare(lin, torch.device("cpu"), torch.float16)
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(6)).half()
    out = torch.zeros(4, n)
    assert try_slot_gemm(x, t, out, (16, 128, tiles, 4, path))
    assert_close(out, ref_linear(x.float(), lin), "fp16_dot")


@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_slot_gemm_act_order_and_bias(bits):
    """An act-order permutation gathers x's columns in the kernel; the bias is added once (first slice)."""
    lin = make_linear(24, 256, bits, 128, "int", act_order=True, seed=7)
    t = prepare(lin, torch.device("cpu"), torch.float16)
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(8)).half()
    out = torch.zeros(6, 24)
    qmatmul_accumulate(x, t, out, config=(16, 128, 1, 4, "slots"))
    assert_close(out, ref_linear(x.float(), lin), "fp16_dot")


def test_slot_gemm_needs_sixteen_word_rows_in_a_group():
    """int4 with groups of 32 (4 word rows) and int8 with groups of 32 (8) take the general
    tensor-core kernel instead; qmatmul_accumulate still gives the right answer."""
    for bits in (4, 8):
        lin = make_linear(20, 128, bits, 32, "int", seed=bits)
        t = prepare(lin, torch.device("cpu"), torch.float16)
        assert slot_rows(t, 128) is None
        x = torch.randn(3, 128, generator=torch.Generator().manual_seed(9)).half()
        out = torch.zeros(3, 20)
        assert not try_slot_gemm(x, t, out, (16, 128, 1, 4, "slots"))
        assert torch.count_nonzero(out) == 0
        qmatmul_accumulate(x, t, out, config=(16, 128, 1, 4, "slots"))
        assert_close(out, ref_linear(x.float(), lin), "fp16_dot")
    assert slot_rows(prepare(make_linear(20, 256, 8, 64, "int"), torch.device("cpu"), torch.float16), 128) == 16
