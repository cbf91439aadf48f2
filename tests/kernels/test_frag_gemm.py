"""kernels.frag_gemm (the few-row decode GEMM with the packed words as the MMAs' A fragments),
reached through qmatmul_accumulate's "frags" path, against kernels.reference.linear. In the
interpreter the kernel sums each lane's outputs in plain Triton (EMULATE); the PTX the GPU runs
is executed here by a model of a warp (its mov, lop3, prmt, shr, f16x2 and mma.sync
instructions, the MMA's fragments as the PTX ISA lays them out) on the words and x each lane
loads, and checked against the layout's product."""

import re

import numpy as np
import pytest
import torch

from qruntime.kernels.frag_gemm import frag_asm, frag_block_k, frag_constraints, try_frag_gemm
from qruntime.kernels.layout import prepare
from qruntime.kernels.qmatmul import qmatmul_accumulate
from qruntime.kernels.reference import linear as ref_linear
from packed_linears import assert_accumulates_product, make_linear
from tolerances import assert_close

# (M, N, K, group): M on both sides of 8 (one or two blocks of 8 rows), N not a multiple of the
# 64 columns of two warps, K slices of 256 with a partial last one, groups of one chunk and more
CASES = {
    "m3-n40-k200-per-channel": (3, 40, 200, -1),    # int4: 25 word rows, a partial chunk and block
    "m16-n70-k512-g128": (16, 70, 512, 128),        # two K slices, a partial column tile
    "m9-n33-k384-g64": (9, 33, 384, 64),            # a partial last slice
    "m1-n64-k128-g32": (1, 64, 128, 32),            # one row; int4 groups of one chunk
    "m8-n128-k256-g256": (8, 128, 256, 256),        # whole tiles, one block of 8 rows, full
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("zero_mode", ["symmetric", "int"])
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_frag_gemm_matches_reference(bits, zero_mode, case):
    assert_accumulates_product(try_frag_gemm, (64, 256, 1, 2, "frags"), bits, zero_mode, case)


# (config, case): SUPER blocks loaded together (config field 3), with super-blocks that run past K
SUPER_CASES = {
    "super2-m16-n70-k384-g128": ((64, 256, 2, 2, "frags"), (16, 70, 384, 128)),  # last slice: block 3 past K
    "super4-m9-n33-k640-g128": ((64, 512, 4, 2, "frags"), (9, 33, 640, 128)),   # last slice: 3 of 4 past K
    "super2-two-tiles-m3-n100-k512-g32": ((128, 256, 2, 2, "frags"), (3, 100, 512, 32)),  # int4: 1-chunk blocks
    "super2-m8-n64-k768-g256": ((64, 256, 2, 2, "frags"), (8, 64, 768, 256)),   # two blocks a group
}


@pytest.mark.parametrize("config,case", SUPER_CASES.values(), ids=SUPER_CASES.keys())
@pytest.mark.parametrize("zero_mode", ["symmetric", "int"])
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_frag_gemm_blocks_loaded_together(bits, zero_mode, config, case):
    """The K slice walked SUPER blocks at a time: a super-block of a partial last slice runs past K,
    and its blocks there read the last group's scales and add nothing. (The interpreter runs the
    emulated sums over the same walk; the GPU's loads are checked by benchmarks/bench_gemv.py.)"""
    assert_accumulates_product(try_frag_gemm, config, bits, zero_mode, case)


@pytest.mark.parametrize("shape", [(16, 100, 384), (5, 256, 256)], ids=["m16-n100-partial", "m5-n256-whole"])
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_frag_gemm_two_column_tiles_a_warp(bits, shape):
    """BLOCK_N = 64 num_warps: each warp's lanes multiply their x fragments into two tiles of 32
    columns. N 100: the second tile of the first program is partial, the second program's wholly
    past N; N 256: whole tiles only."""
    m, n, k = shape
    lin = make_linear(n, k, bits, 128, "int", seed=m)
    t = prepare(lin, torch.device("cpu"), torch.float16)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2)).half()
    out = torch.zeros(m, n)
    assert try_frag_gemm(x, t, out, (128, 256, 1, 2, "frags"))
    assert_close(out, ref_linear(x.float(), lin), "fp16_dot")


@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_frag_gemm_bf16_and_strided_activations(bits):
    """bf16 x is converted to fp16 first; x rows whose stride is not a multiple of 4 are copied."""
    lin = make_linear(48, 256, bits, 128, "int", seed=3)
    t = prepare(lin, torch.device("cpu"), torch.float16)
    wide = torch.randn(5, 262, generator=torch.Generator().manual_seed(4))
    for x in (wide[:, :256].bfloat16(), wide.half()[:, 3:259]):
        out = torch.zeros(5, 48)
        assert try_frag_gemm(x, t, out, (128, 128, 1, 4, "frags"))
        assert_close(out, ref_linear(x.float(), lin), "fp16_dot")


def test_frag_gemm_refuses_what_it_cannot_serve():
    """Float offsets (GGUF), act-order, a tile that is not 32 columns a warp, a K slice that is not
    whole blocks or whole super-blocks, groups smaller than a chunk (int4: 32 columns of K) and
    one-warp programs (wrong sums on the H200, benchmarks/results/h200/frag_one_warp.log) go
    elsewhere, leaving `out` untouched; qmatmul_accumulate still answers right through the other
    kernels."""
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1)).half()
    refused = [
        (make_linear(24, 256, 4, 128, "float", seed=1), (64, 256, 1, 2, "frags")),
        (make_linear(24, 256, 4, 128, "int", act_order=True, seed=2), (64, 256, 1, 2, "frags")),
        (make_linear(24, 256, 4, 128, "int", seed=3), (64, 256, 1, 4, "frags")),     # 64: not 32 or 64 x 4 warps
        (make_linear(24, 256, 4, 128, "int", seed=3), (128, 256, 1, 1, "frags")),    # four tiles a warp
        (make_linear(24, 256, 4, 128, "int", seed=4), (64, 192, 1, 2, "frags")),     # 192: 1.5 blocks
        (make_linear(24, 256, 4, 16, "int", seed=5), (64, 256, 1, 2, "frags")),      # 16 < one chunk
        (make_linear(24, 256, 4, 128, "int", seed=6), (64, 384, 2, 2, "frags")),     # 3 blocks, 2 at a time
        (make_linear(24, 256, 4, 128, "int", seed=6), (64, 256, 0, 2, "frags")),     # no block at a time
        (make_linear(24, 256, 8, 128, "int", seed=7), (64, 256, 1, 1, "frags")),     # one warp (wrong on the GPU)
        (make_linear(24, 256, 4, 128, "int", seed=7), (32, 256, 2, 1, "frags")),     # likewise
    ]
    for lin, cfg in refused:
        t = prepare(lin, torch.device("cpu"), torch.float16)
        out = torch.zeros(4, 24)
        assert not try_frag_gemm(x, t, out, cfg)
        assert torch.count_nonzero(out) == 0
        qmatmul_accumulate(x, t, out, config=cfg)
        assert_close(out, ref_linear(x.float(), lin), "fp16_dot")
    assert frag_block_k(prepare(make_linear(8, 4096, 8, -1, "int"), torch.device("cpu"), torch.float16)) == 128


# ---- the PTX on a model of one warp ----

def _f16(bits: int) -> np.float16:
    return np.array([bits], dtype=np.uint16).view(np.float16)[0]


def _f16_bits(v: float) -> int:
    return int(np.array([v], dtype=np.float16).view(np.uint16)[0])


def _halves(r: int) -> tuple[float, float]:
    return float(_f16(r & 0xFFFF)), float(_f16(r >> 16 & 0xFFFF))


def _pack_halves(lo: float, hi: float) -> int:
    return _f16_bits(lo) | _f16_bits(hi) << 16


def _f32(r: int) -> float:
    return float(np.array([r], dtype=np.uint32).view(np.float32)[0])


def _f32_bits(v: float) -> int:
    return int(np.array([v], dtype=np.float32).view(np.uint32)[0])


def _mma(lanes, d, a, b, c):
    """mma.sync m16n8k16 .row.col f32 += f16 x f16 across the warp, with the fragments of the PTX
    ISA: lane (g, c) holds A[g | g + 8][2c + (0, 1) | 2c + 8 + (0, 1)] in a0..a3 (a0: row g,
    columns 2c, 2c + 1; a1: row g + 8; a2: columns + 8; a3: both), B[2c + (0, 1) | + 8][g] in b0, b1
    and C[g | g + 8][2c + (0, 1)] in c0..c3."""
    A, B, C = np.zeros((16, 16)), np.zeros((16, 8)), np.zeros((16, 8))
    for lane, regs in enumerate(lanes):
        g, q = lane // 4, lane % 4
        for i, (row, col) in enumerate([(g, 2 * q), (g + 8, 2 * q), (g, 2 * q + 8), (g + 8, 2 * q + 8)]):
            A[row, col], A[row, col + 1] = _halves(regs[a[i]])
        for i, row in enumerate([2 * q, 2 * q + 8]):
            B[row, g], B[row + 1, g] = _halves(regs[b[i]])
        for i, (row, col) in enumerate([(g, 2 * q), (g, 2 * q + 1), (g + 8, 2 * q), (g + 8, 2 * q + 1)]):
            C[row, col] = _f32(regs[c[i]])
    D = (A @ B + C).astype(np.float32)
    for lane, regs in enumerate(lanes):
        g, q = lane // 4, lane % 4
        for i, (row, col) in enumerate([(g, 2 * q), (g, 2 * q + 1), (g + 8, 2 * q), (g + 8, 2 * q + 1)]):
            regs[d[i]] = _f32_bits(D[row, col])


def _run_warp(asm: str, operands: list[list[int]], outputs: int) -> list[list[int]]:
    """Executes frag_asm's PTX on 32 lanes in lockstep, lane l's $i = operands[l][i - outputs]
    (64-bit values for "l" operands); returns each lane's $0 .. $(outputs - 1)."""
    lanes = [{f"${outputs + i}": v for i, v in enumerate(ops)} for ops in operands]
    regs_of = lambda s: [r.strip() for r in s.strip().strip("{}").split(",")]
    for line in asm.strip("{}\n").splitlines():
        line = line.strip().rstrip(";")
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        if op.startswith("mma.sync"):
            groups = [regs_of(g) for g in args.split("}, ")]
            _mma(lanes, *groups)
            continue
        for regs in lanes:
            val = lambda o: regs[o] if o in regs else int(o, 0) & 0xFFFFFFFF
            if op == "mov.b64" and args.startswith("{"):  # {lo, hi}, 64-bit source
                pair, src = args.rsplit(",", 1)
                lo, hi = regs_of(pair)
                regs[lo], regs[hi] = val(src.strip()) & 0xFFFFFFFF, val(src.strip()) >> 32
                continue
            d, rest = [a.strip() for a in args.split(",", 1)]
            if op == "mov.b64":  # 64-bit destination from {lo, hi}
                lo, hi = regs_of(rest)
                regs[d] = regs[lo] | regs[hi] << 32
                continue
            src = [a.strip() for a in rest.split(",")]
            if op == "mov.b32":
                r = val(src[0])
            elif op == "lop3.b32":
                assert src[3] == "0xEA", line  # (a & b) | c
                r = (val(src[0]) & val(src[1])) | val(src[2])
            elif op == "shr.u32":
                r = val(src[0]) >> val(src[1])
            elif op == "prmt.b32":  # bytes of (b:a) picked by the selector's nibbles
                pool, sel = val(src[0]) | val(src[1]) << 32, val(src[2])
                r = sum(((pool >> 8 * (sel >> 4 * i & 7)) & 0xFF) << 8 * i for i in range(4))
            elif op == "sub.f16x2":
                (a0, a1), (b0, b1) = _halves(val(src[0])), _halves(val(src[1]))
                r = _pack_halves(a0 - b0, a1 - b1)
            elif op == "fma.rn.f16x2":
                (a0, a1), (b0, b1), (c0, c1) = (_halves(val(s)) for s in src)
                r = _pack_halves(a0 * b0 + c0, a1 * b1 + c1)  # exact in float64, one rounding to fp16
            else:
                raise AssertionError(f"unmodelled PTX: {line}")
            regs[d] = r & 0xFFFFFFFF
    return [[regs[f"${i}"] for i in range(outputs)] for regs in lanes]


@pytest.mark.parametrize("m_blocks", [1, 2])
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_frag_asm_computes_the_lane_layouts_product(bits, m_blocks):
    """One chunk (4 word rows) of one warp's 32 columns: each lane (g, c) given what the kernel loads
    (the words of word row c at columns 4g .. 4g + 3, x rows g and g + 8 at that word row's columns,
    the fp16x2 constants of its columns' zero points), the warp's outputs for x row 2c + p (block b:
    + 8 b) and column 4g + i land in element i of accumulator b, half p, and equal the product."""
    g = torch.Generator().manual_seed(bits + 10 * m_blocks)
    epw = 32 // bits
    kc = 4 * epw
    codes = torch.randint(0, 1 << bits, (kc, 32), generator=g)
    zeros = torch.randint(0, 1 << bits, (32,), generator=g)
    codes[:, 0], zeros[1] = (1 << bits) - 1, 0  # the extremes
    x = torch.randn(16, kc, generator=g).half()
    if m_blocks == 1:
        x[8:] = 0
    place = [c // 2 + 4 * (c % 2) for c in range(8)] if bits == 4 else list(range(4))  # column -> code slot
    words = [[sum(int(codes[epw * r + j, n]) << bits * place[j] for j in range(epw)) for n in range(32)]
             for r in range(4)]
    xbits = x.view(torch.int16).int() & 0xFFFF
    unit = 4 if bits == 4 else 2  # fp16 values per x operand: 64-bit (int4) or 32-bit (int8)
    operands = []
    for lane in range(32):
        gid, q = lane // 4, lane % 4
        ops = [words[q][4 * gid + i] for i in range(4)]
        for e in range(4):
            row, first = gid + 8 * (e // 2), epw * q + unit * (e % 2)
            ops.append(sum(int(xbits[row, first + h]) << 16 * h for h in range(unit)))
        zs = [int(zeros[4 * gid + i]) for i in range(4)]
        ops += [(0x6400 | z) * 0x10001 for z in zs]
        if bits == 4:
            ops += [(0xD400 | z << 4) * 0x10001 for z in zs]
        ops += [0] * (4 * m_blocks)
        operands.append(ops)
    out = _run_warp(frag_asm(bits, m_blocks), operands, 4 * m_blocks)
    want = x.double() @ (codes - zeros).double()                                          # [16, 32]
    for lane in range(32):
        gid, q = lane // 4, lane % 4
        for b in range(m_blocks):
            for i in range(4):
                got = out[lane][4 * b + i]
                for p, half in enumerate((got & 0xFFFFFFFF, got >> 32)):
                    assert _f32(half) == pytest.approx(float(want[8 * b + 2 * q + p, 4 * gid + i]), rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("m_blocks", [1, 2])
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_frag_constraints_cover_the_asm_operands(bits, m_blocks):
    """The constraint string the kernel passes with frag_asm names every operand the PTX uses, the
    64-bit ones as "l", and no more: its accumulators out first, 4 a block of 8 rows. (With one
    block, x[g + 8]'s two operands are passed and not read.)"""
    asm, cons = frag_asm(bits, m_blocks), frag_constraints(bits, m_blocks).split(",")
    used = {int(i) for i in re.findall(r"\$(\d+)", asm)}
    x = 4 * m_blocks + 4
    assert max(used) == len(cons) - 1
    assert set(range(len(cons))) - used == (set() if m_blocks == 2 else {x + 2, x + 3})
    assert [c for c in cons if c.startswith("=")] == ["=l"] * (4 * m_blocks)
    wide = {int(i) for i in re.findall(r"mov\.b64 \{[^}]*\}, \$(\d+)", asm)}  # 64-bit operands split in two
    wide |= {int(i) for i in re.findall(r"mov\.b64 \$(\d+), \{", asm)}
    assert wide == {i for i, c in enumerate(cons) if c.endswith("l") and i in used}
