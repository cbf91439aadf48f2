"""kernels.gemv_packed (the packed decode GEMV, reached through qmatmul_accumulate's "packed" path,
and the forms that make their own input) against kernels.reference.linear. In the interpreter the
kernel takes its plain-Triton EMULATE branch; the PTX it runs on the GPU is executed here by a
small model of its six instructions (test_int_dot_asm_computes_the_layouts_dot), and the kernel
itself is checked on the GPU (benchmarks/bench_decode.py)."""

import json

import pytest
import torch

from qruntime.kernels import reference as R
from qruntime.kernels import tuning
from qruntime.kernels.flash_decode import flash_decode, flash_decode_splits
from qruntime.kernels.gemv_packed import (_int_dot_asm, activation_levels, packed_gemv_serves, qmatmul_accumulate_attention,
                                          qmatmul_accumulate_deferred_norm, qmatmul_accumulate_swiglu)
from qruntime.kernels.layout import prepare
from qruntime.kernels.qmatmul import qmatmul_accumulate
from qruntime.kernels.reference import linear as ref_linear
from qruntime.kernels.rmsnorm import DeferredNorm
from packed_linears import make_linear
from tolerances import assert_close


@pytest.mark.parametrize("shape", [(33, 96), (17, 64), (40, 200), (32, 128)], ids=["n33-k96", "n17-k64", "n40-k200", "n32-k128-whole-tiles"])
@pytest.mark.parametrize("group", [32, 128, -1], ids=["g32", "g128", "per-channel"])
@pytest.mark.parametrize("zero_mode", ["symmetric", "int", "float"])
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_packed_gemv_matches_reference(bits, zero_mode, group, shape):
    """The packed decode path, word rows chained per int32 sum (four int4 rows, two int8); n32-k128
    has only whole tiles (the unmasked loads)."""
    n, k = shape
    lin = make_linear(n, k, bits, group, zero_mode, seed=n)
    t = prepare(lin, torch.device("cpu"), torch.float16)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(3)).half()
    start = torch.randn(1, n)
    out = start.clone()
    qmatmul_accumulate(x, t, out, config=(16, 32, 2, 4, "packed"))
    assert_close(out - start, ref_linear(x.float(), lin), "fp16_dot")


def _kernel_activations(x: torch.Tensor, block_k: int, levels: int) -> torch.Tensor:
    """x [K] as the kernel's products see it, in float64: per K slice of block_k, the integers
    floor(x * (levels / max|x|) + 0.5) (fp32 arithmetic, as the kernel) times max|x| / levels."""
    out = torch.empty(x.numel(), dtype=torch.float64)
    for k0 in range(0, x.numel(), block_k):
        xs = x[k0:k0 + block_k].float()
        top = xs.abs().max()
        top = top if top > 0 else torch.tensor(1.0)
        q = torch.floor(xs * (torch.tensor(float(levels)) / top) + 0.5)
        assert q.abs().max() <= levels
        out[k0:k0 + block_k] = q.double() * (top / levels).double()
    return out


@pytest.mark.parametrize("group", [32, 128, -1], ids=["g32", "g128", "per-channel"])
@pytest.mark.parametrize("zero_mode", ["symmetric", "int", "float"])
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_packed_gemv_sums_are_exact(bits, zero_mode, group):
    """The products are exact integer sums: the only rounding is the activations' (to integers of
    at most activation_levels, per K slice) and the fp32 epilogue's, so the output equals the
    float64 GEMV of the quantized activations to fp32 precision. (K 200: the last slice is partial.)"""
    n, k, block_k = 40, 200, 32
    lin = make_linear(n, k, bits, group, zero_mode, seed=bits + n)
    t = prepare(lin, torch.device("cpu"), torch.float16)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(8)).half()
    x[0, 40] = 900.0  # a slice whose step is 2^10 times coarser than the others'
    out = torch.zeros(1, n)
    qmatmul_accumulate(x, t, out, config=(16, block_k, 2, 4, "packed"))
    seen = _kernel_activations(x[0], block_k, activation_levels(block_k, bits))
    assert_close(out, ref_linear(seen[None], lin), "fp32")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy, on purpose
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_packed_gemv_does_not_hide_a_non_finite_activation(bad):
    """A NaN or inf activation must not vanish into the integer quantization: the outputs are not
    finite, as with float math (every column reads the bad value's K slice)."""
    lin = make_linear(24, 128, 4, 32, "int", seed=3)
    t = prepare(lin, torch.device("cpu"), torch.float16)
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(2)).half()
    x[0, 70] = bad
    out = torch.zeros(1, 24)
    qmatmul_accumulate(x, t, out, config=(16, 32, 2, 4, "packed"))
    assert not torch.isfinite(out).any()


def _run_ptx(asm: str, operands: list[int]) -> int:
    """Executes the straight-line PTX _int_dot_asm writes (mov, prmt, and, dp2a.lo/hi, shr, add, on
    32-bit registers) with $1.. = operands; returns $0 as a signed int."""
    regs = {f"${i + 1}": v & 0xFFFFFFFF for i, v in enumerate(operands)}
    val = lambda o: regs[o] if o in regs else int(o, 0) & 0xFFFFFFFF
    signed = lambda v, bits: v - (1 << bits) if v >> (bits - 1) & 1 else v
    for line in asm.strip("{}\n").splitlines():
        line = line.strip().rstrip(";")
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        d, *src = [a.strip() for a in args.split(",")]
        if op == "mov.b32":
            r = val(src[0])
        elif op == "prmt.b32":  # bytes of (b:a) picked by the selector's nibbles
            pool = val(src[0]) | val(src[1]) << 32
            sel = val(src[2])
            r = sum(((pool >> 8 * (sel >> 4 * i & 7)) & 0xFF) << 8 * i for i in range(4))
        elif op == "and.b32":
            r = val(src[0]) & val(src[1])
        elif op.startswith("dp2a."):  # d = c + a.h0 * b.byte(i0) + a.h1 * b.byte(i0 + 1), a signed, b unsigned
            assert op.endswith(".s32.u32"), op
            a, b, c = val(src[0]), val(src[1]), signed(val(src[2]), 32)
            i0 = 0 if ".lo." in op else 2
            r = c + sum(signed(a >> 16 * h & 0xFFFF, 16) * (b >> 8 * (i0 + h) & 0xFF) for h in range(2))
        elif op == "shr.s32":
            r = signed(val(src[0]), 32) >> val(src[1])
        elif op == "add.s32":
            r = signed(val(src[0]), 32) + signed(val(src[1]), 32)
        else:
            raise AssertionError(f"unmodelled PTX: {line}")
        regs[d] = r & 0xFFFFFFFF
    return signed(regs["$0"], 32)


@pytest.mark.parametrize("bits,words", [(4, 1), (4, 2), (4, 4), (8, 1), (8, 2)],  # the chains MAX_CHAIN allows
                         ids=["int4-1", "int4-2", "int4-4", "int8-1", "int8-2"])
def test_int_dot_asm_computes_the_layouts_dot(bits, words):
    """The PTX the GPU runs for a chain of words sums q x over the columns the layout puts in each
    word (kernels.layout: int4 columns 2i, 2i + 1 in nibbles i, i + 4; int8 column j in byte j),
    given the activations as pairs of 16-bit integers (pair p: columns 2p, 2p + 1), extremes included."""
    g = torch.Generator().manual_seed(bits * 10 + words)
    epw, levels = 32 // bits, activation_levels(128, bits)
    for trial in range(20):
        codes = torch.randint(0, 1 << bits, (words, epw), generator=g)
        x = torch.randint(-levels, levels + 1, (words, epw), generator=g)
        if trial == 0:  # the extremes: every code at its maximum, x at +-levels
            codes.fill_((1 << bits) - 1)
            x[:, 0::2], x[:, 1::2] = levels, -levels
        place = [c // 2 + 4 * (c % 2) for c in range(8)] if bits == 4 else list(range(4))  # column -> code slot
        packed_words = [sum(int(codes[w, c]) << bits * place[c] for c in range(epw)) for w in range(words)]
        pairs = [(int(x[w, 2 * p]) & 0xFFFF) | (int(x[w, 2 * p + 1]) & 0xFFFF) << 16
                 for w in range(words) for p in range(epw // 2)]
        assert _run_ptx(_int_dot_asm(bits, words), packed_words + pairs) == int((codes * x).sum())


@pytest.mark.parametrize("tiles", [2, 3], ids=["2-tiles", "3-tiles"])
@pytest.mark.parametrize("shape", [(40, 200), (96, 384)], ids=["n40-k200", "n96-k384"])
@pytest.mark.parametrize("group", [32, 128], ids=["g32", "g128"])
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_packed_gemv_several_tiles_per_program(bits, group, shape, tiles):
    """A program takes a K slice of 64 (two groups of 32, or inside a group of 128) across `tiles`
    column tiles of 16, requesting the next while multiplying the current. N 40: a partial tile,
    and with 2 tiles a program whose second tile lies wholly past N; K 200 ends inside a chain of
    int4 word rows (25 rows: the last chain of four has one). N 96, K 384: only whole tiles (no masks)."""
    n, k = shape
    lin = make_linear(n, k, bits, group, "int", seed=k + tiles)
    t = prepare(lin, torch.device("cpu"), torch.float16)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(11)).half()
    start = torch.randn(1, n)
    out = start.clone()
    qmatmul_accumulate(x, t, out, config=(16, 64, tiles, 4, "packed"))
    assert_close(out - start, ref_linear(x.float(), lin), "fp16_dot")


def _small_group_entries():
    """(bits, group, zero mode, config) of every small-group M = 1 entry of the tuned tables
    (kernels.tuning.weights_key: "w8g32s", "w4g32f", ...), each once."""
    found = set()
    for path in tuning.TABLES.glob("*.json"):
        for key, cfg in json.loads(path.read_text()).items():
            bits, group, zero_mode = tuning.parse_weights_key(key.split("/")[1])
            if group:
                found.add((bits, group, zero_mode, tuple(cfg)))
    return sorted(found, key=str)


@pytest.mark.parametrize("bits, group, zero_mode, config", _small_group_entries(), ids=str)
def test_packed_gemv_with_the_small_group_tiles(bits, group, zero_mode, config):
    """Each tile the tables give weights of small groups (GGUF's), on those weights: a K slice of
    several groups across 1-4 column tiles, N with a partial last tile, K with a partial last slice."""
    bn, bk, tiles, _, path = config
    assert path == "packed"
    n, k = bn * tiles + bn // 2, 2 * bk + 4 * group
    lin = make_linear(n, k, bits, group, zero_mode, seed=bk + tiles)
    t = prepare(lin, torch.device("cpu"), torch.float16)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(13)).half()
    start = torch.randn(1, n)
    out = start.clone()
    qmatmul_accumulate(x, t, out, config=config)
    assert_close(out - start, ref_linear(x.float(), lin), "fp16_dot")


@pytest.mark.parametrize("shape", [(33, 96), (32, 128)], ids=["n33-k96", "n32-k128-whole-tiles"])
@pytest.mark.parametrize("zero_mode", ["symmetric", "int", "float"])
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_packed_gemv_one_word_row_tile(bits, zero_mode, shape):
    """A K tile of a single word row: nothing to chain, each word is its own int32 sum."""
    n, k = shape
    lin = make_linear(n, k, bits, 32, zero_mode, seed=n + 1)
    t = prepare(lin, torch.device("cpu"), torch.float16)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(5)).half()
    out = torch.full((1, n), 0.0)
    qmatmul_accumulate(x, t, out, config=(16, 32 // bits, 1, 4, "packed"))
    assert_close(out, ref_linear(x.float(), lin), "fp16_dot")


@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_packed_gemv_scales_large_activations(bits):
    """Activations in the thousands (a down_proj input can reach them): each K slice takes its
    integer step from its own largest |x|, so one slice here is large, one moderate, one plain."""
    n, k = 24, 384
    lin = make_linear(n, k, bits, 128, "int", seed=5)
    t = prepare(lin, torch.device("cpu"), torch.float16)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(4))
    x[0, 5], x[0, 130] = 3000.0, -700.0
    x = x.half()
    out = torch.zeros(1, n)
    qmatmul_accumulate(x, t, out, config=(16, 128, 1, 4, "packed"))
    assert_close(out, ref_linear(x.float(), lin), "fp16_dot")


@pytest.mark.parametrize("tile", [(16, 32, 2, 4, "packed"), (16, 8, 1, 4, "packed")], ids=["chained-rows", "one-word-row"])
@pytest.mark.parametrize("shape", [(33, 96), (32, 128)], ids=["n33-k96", "n32-k128-whole-tiles"])
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_swiglu_fused_gemv_matches_swiglu_then_gemv(bits, shape, tile):
    """down_proj of the decode step reads the fp32 gate|up accumulator and forms silu(g) * u itself:
    the result equals the swiglu kernel's fp16 output fed to the plain GEMV, and gate_up is untouched."""
    n, k = shape
    lin = make_linear(n, k, bits, 32, "int", seed=k)
    t = prepare(lin, torch.device("cpu"), torch.float16)
    gu = torch.randn(1, 2 * k, generator=torch.Generator().manual_seed(7)) * 3
    gu[0, 7], gu[0, k + 7] = 40.0, 90.0  # one product in the thousands: its slice's step is coarser
    before = gu.clone()
    out = torch.zeros(1, n)
    qmatmul_accumulate_swiglu(gu, t, out, config=tile)
    assert torch.equal(gu, before)
    act = R.swiglu(gu).half()
    assert_close(out, ref_linear(act.float(), lin), "fp16_dot")


@pytest.mark.parametrize("tile", [(16, 32, 2, 4, "packed"), (8, 64, 3, 4, "packed")], ids=["k32-2-tiles", "k64-3-tiles"])
@pytest.mark.parametrize("shape", [(40, 96), (24, 200)], ids=["f40-k96", "f24-k200"])
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_deferred_norm_gemv_then_scaled_swiglu(bits, shape, tile):
    """gate|up from the un-normalized residual (h * w, the squares summed once per K slice), then
    down_proj applying the deferred scale before silu: equal to RMSNorm -> GEMV -> swiglu -> GEMV.
    One residual value makes h * w exceed fp16's range: it is quantized from fp32, never rounded to fp16."""
    n, k = shape
    gen = torch.Generator().manual_seed(k)
    gate_up_packed = make_linear(2 * n, k, bits, 32, "int", bias=False, seed=n)
    gate_up = prepare(gate_up_packed, torch.device("cpu"), torch.float16)
    down_packed = make_linear(k, n, bits, 32, "float", seed=k)
    down = prepare(down_packed, torch.device("cpu"), torch.float16)
    h = torch.randn(1, k, generator=gen) * 30
    h[0, 5] = 50000.0
    w = torch.rand(k, generator=gen) + 0.5
    eps = 1e-5
    norm = DeferredNorm(torch.full((1,), 2.5), k, eps)  # the sum starts at 2.5: it must be added to
    start = torch.randn(1, 2 * n, generator=gen)  # an accumulator: the products are added to it
    gu = start.clone()
    qmatmul_accumulate_deferred_norm(h, w, gate_up, gu, norm, config=tile)
    torch.testing.assert_close(norm.sum_squares, 2.5 + (h.double() ** 2).sum().float().view(1), rtol=1e-6, atol=0)
    assert torch.isfinite(gu).all()
    gu -= start
    assert_close(gu, ref_linear(h * w, gate_up_packed), "fp16_dot")
    norm.sum_squares.fill_((h ** 2).sum().item())
    out = torch.zeros(1, k)
    qmatmul_accumulate_swiglu(gu, down, out, config=(16, 32, 2, 4, "packed"), norm=norm)
    scale = torch.rsqrt((h ** 2).sum() / k + eps)
    act = R.swiglu(gu * scale).half()
    assert_close(out, ref_linear(act.float(), down_packed), "fp16_dot")
    # the whole chain against the plain one: normalize, then the GEMVs
    xn = (h * scale * w).half()
    assert_close(gu * scale, ref_linear(xn.float(), gate_up_packed), "fp16_dot")


def test_deferred_norm_gemv_refuses_what_it_cannot_serve():
    lin = make_linear(16, 64, 4, 32, "int", seed=1, bias=True)
    t = prepare(lin, torch.device("cpu"), torch.float16)
    norm = DeferredNorm(torch.zeros(1), 64, 1e-6)
    with pytest.raises(ValueError, match="bias"):
        qmatmul_accumulate_deferred_norm(torch.zeros(1, 64), torch.ones(64), t, torch.zeros(1, 16), norm,
                                         config=(16, 32, 1, 4, "packed"))
    # left to the reader: the output has no bias in it
    h = torch.randn(1, 64, generator=torch.Generator().manual_seed(2))
    out = torch.zeros(1, 16)
    qmatmul_accumulate_deferred_norm(h, torch.ones(64), t, out, norm, config=(16, 32, 1, 4, "packed"), bias_to_reader=True)
    assert_close(out, ref_linear(h, lin) - lin.bias.float(), "fp16_dot")
    t = prepare(make_linear(16, 64, 4, 32, "int", bias=False, seed=1), torch.device("cpu"), torch.float16)
    with pytest.raises(ValueError, match="fp32"):
        qmatmul_accumulate_deferred_norm(torch.zeros(1, 64).half(), torch.ones(64), t, torch.zeros(1, 16), norm,
                                         config=(16, 32, 1, 4, "packed"))
    with pytest.raises(ValueError, match="one fp32 element"):
        qmatmul_accumulate_deferred_norm(torch.zeros(1, 64), torch.ones(64), t, torch.zeros(1, 16),
                                         DeferredNorm(torch.zeros(2), 64, 1e-6), config=(16, 32, 1, 4, "packed"))


def test_swiglu_fused_gemv_refuses_what_it_cannot_serve():
    lin = make_linear(16, 64, 4, 32, "int", seed=1)
    t = prepare(lin, torch.device("cpu"), torch.float16)
    assert packed_gemv_serves(t, (16, 32, 1, 4, "packed")) and not packed_gemv_serves(t, (16, 32, 1, 4, True))
    with pytest.raises(ValueError, match="no packed GEMV"):
        qmatmul_accumulate_swiglu(torch.zeros(1, 128), t, torch.zeros(1, 16), config=(16, 32, 1, 4, False))
    with pytest.raises(ValueError, match="fp32"):
        qmatmul_accumulate_swiglu(torch.zeros(1, 128).half(), t, torch.zeros(1, 16), config=(16, 32, 1, 4, "packed"))


@pytest.mark.parametrize("splits,used", [(4, (2, 3)), (16, (11, 9))], ids=["4-splits", "16-splits-2-chunks"])
@pytest.mark.parametrize("tile", [(16, 32, 2, 4, "packed"), (16, 64, 1, 4, "packed")], ids=["k32-2-tiles", "k64"])
@pytest.mark.parametrize("heads,hd", [(4, 16), (2, 48)], ids=["h4-hd16", "h2-hd48"])
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_attention_merging_gemv_matches_merge_then_gemv(bits, heads, hd, tile, splits, used):
    """o_proj of the decode step merges flash-decoding's splits for its own K slice: the result
    equals the merged attention rounded to fp16 fed to the plain GEMV. K slices of 32 or 64 span
    several heads of 16 and cut heads of 48. Heads 0 and 1 use a prefix of `used` splits (as
    flash-decoding leaves them: the rest empty, lse -inf, o NaN, which must not be read; the
    others use all); 16 splits are read 8 at a time. The buffer to clear (not a multiple of the
    programs) ends up zero."""
    n, k = 40, heads * hd
    lin = make_linear(n, k, bits, 32, "int", seed=k + bits)
    t = prepare(lin, torch.device("cpu"), torch.float16)
    g = torch.Generator().manual_seed(heads + splits)
    o = torch.randn(splits, heads, hd, generator=g) * 2
    lse = torch.randn(splits, heads, generator=g) * 3
    for head, count in enumerate(used):
        lse[count:, head], o[count:, head] = float("-inf"), float("nan")
    clear = torch.randn(37)
    start = torch.randn(1, n)
    out = start.clone()
    qmatmul_accumulate_attention((o, lse), t, out, clear=clear, config=tile)
    assert torch.equal(clear, torch.zeros(37))
    attn = R.merge_splits(o, lse).half()
    assert_close(out - start, ref_linear(attn.float()[None], lin), "fp16_dot")


@pytest.mark.parametrize("splits,length", [(8, 21), (16, 150)], ids=["8-splits-len21", "16-splits-len150"])
def test_attention_merging_gemv_after_flash_decode_splits(splits, length):
    """flash_decode_splits then the merging GEMV equals flash_decode (splits and combine) then the
    plain GEMV, over a cache where some splits are empty (their o left unwritten: NaN here); at
    length 150, 10 splits of 16 positions are used, merged in two chunks of 8."""
    heads, kv, hd = 8, 2, 16
    g = torch.Generator().manual_seed(length)
    k_cache, v_cache = torch.randn(kv, 160, hd, generator=g), torch.randn(kv, 160, hd, generator=g)
    q = torch.randn(heads, hd, generator=g)
    seq_len = torch.tensor([length], dtype=torch.int32)
    lin = make_linear(24, heads * hd, 4, 32, "int", seed=9)
    t = prepare(lin, torch.device("cpu"), torch.float16)
    workspace = (torch.full((splits, heads, hd), float("nan")), torch.full((splits, heads), float("nan")))
    fused = torch.zeros(1, 24)
    qmatmul_accumulate_attention(flash_decode_splits(q, k_cache, v_cache, seq_len, num_splits=splits, block_s=16,
                                                     workspace=workspace), t, fused, config=(16, 32, 1, 4, "packed"))
    attn = torch.zeros(heads * hd)
    flash_decode(q, k_cache, v_cache, seq_len, attn, num_splits=splits, block_s=16)
    reference = R.attention_over_cache(q[None], k_cache, v_cache, length - 1)[0]
    assert_close(attn, reference, "fp16_dot")
    plain = torch.zeros(1, 24)
    qmatmul_accumulate(attn.half()[None], t, plain, config=(16, 32, 1, 4, "packed"))
    assert_close(fused, plain, "fp16_dot")
    assert_close(fused, ref_linear(reference.half().float()[None], lin), "fp16_dot")


def test_attention_merging_gemv_refuses_what_it_cannot_serve():
    lin = make_linear(16, 64, 4, 32, "int", seed=1)
    t = prepare(lin, torch.device("cpu"), torch.float16)
    o, lse = torch.zeros(4, 4, 16), torch.zeros(4, 4)
    with pytest.raises(ValueError, match="no packed GEMV"):
        qmatmul_accumulate_attention((o, lse), t, torch.zeros(1, 16), config=(16, 32, 1, 4, False))
    with pytest.raises(ValueError, match="H \\* hd = 64"):
        qmatmul_accumulate_attention((torch.zeros(4, 4, 8), torch.zeros(4, 4)), t, torch.zeros(1, 16))
    with pytest.raises(ValueError, match="power of two"):
        qmatmul_accumulate_attention((torch.zeros(3, 4, 16), torch.zeros(3, 4)), t, torch.zeros(1, 16))
