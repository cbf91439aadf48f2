"""kernels.gemv_dense (the decode GEMV over a 16-bit weight) against fp32 matmuls of the same inputs,
for each way it forms its input: a row, silu(gate) * up, flash-decoding's splits, the deferred norm."""

import pytest
import torch

from qruntime.kernels import reference as R
from qruntime.kernels.gemv_dense import (DenseLinear, dense_accumulate, dense_accumulate_attention,
                                         dense_accumulate_deferred_norm, dense_accumulate_swiglu)
from qruntime.kernels.rmsnorm import DeferredNorm
from tolerances import assert_close

# the default tile, and one that splits small K into several slices and N into ragged tiles
TILES = [None, (8, 32, 2)]
TILE_IDS = ["default-tile", "n8-k32"]


def make_dense(n, k, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
    return DenseLinear(weight, (torch.randn(n, generator=g) * 0.1).to(dtype) if bias else None)


def reference(x, lin):
    """fp32 x @ W.T + b of the weight's values."""
    y = x.float() @ lin.weight.float().T
    return y if lin.bias is None else y + lin.bias.float()


@pytest.mark.parametrize("tile", TILES, ids=TILE_IDS)
@pytest.mark.parametrize("shape", [(40, 100), (33, 600), (16, 64)], ids=["n40-k100", "n33-k600", "n16-k64"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_dense_gemv_adds_x_times_w(dtype, shape, tile, bias):
    """out += x @ W.T (+ b once, whatever the K slices): N and K not multiples of the tile."""
    n, k = shape
    lin = make_dense(n, k, dtype, bias, seed=n + k)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(k)).half()
    start = torch.randn(1, n)
    out = start.clone()
    dense_accumulate(x, lin, out, tile=tile)
    assert_close(out - start, reference(x, lin), "fp32")


@pytest.mark.parametrize("tile", TILES, ids=TILE_IDS)
def test_dense_swiglu_gemv_with_deferred_norm(tile):
    """gate|up from the un-normalized residual (h * w; the squares summed once per K slice), then
    down_proj forming silu(r g) * r u itself: RMSNorm -> GEMV -> swiglu -> GEMV."""
    n, k, eps = 48, 96, 1e-5
    gen = torch.Generator().manual_seed(3)
    gate_up = make_dense(2 * n, k, torch.bfloat16, bias=False, seed=1)
    down = make_dense(k, n, torch.bfloat16, seed=2)
    h = torch.randn(1, k, generator=gen) * 30
    w = torch.rand(k, generator=gen) + 0.5
    norm = DeferredNorm(torch.full((1,), 2.5), k, eps)  # the sum starts at 2.5: it must be added to
    gu = torch.zeros(1, 2 * n)
    dense_accumulate_deferred_norm(h, w, gate_up, gu, norm, tile=tile)
    torch.testing.assert_close(norm.sum_squares, 2.5 + (h.double() ** 2).sum().float().view(1), rtol=1e-6, atol=0)
    assert_close(gu, reference(h * w, gate_up), "fp32")
    norm.sum_squares.fill_((h ** 2).sum().item())
    before = gu.clone()
    out = torch.zeros(1, k)
    dense_accumulate_swiglu(gu, down, out, norm=norm, tile=tile)
    assert torch.equal(gu, before)
    scale = torch.rsqrt((h ** 2).sum() / k + eps)
    act = R.swiglu(gu * scale).half()  # rounded to fp16, as the swiglu kernel's output
    assert_close(out, reference(act, down), "fp32")


@pytest.mark.parametrize("tile", TILES, ids=TILE_IDS)
@pytest.mark.parametrize("heads,hd", [(4, 16), (2, 48)], ids=["h4-hd16", "h2-hd48"])
def test_dense_attention_merging_gemv(tile, heads, hd):
    """o_proj merging flash-decoding's splits for its own K slice: heads 0 and 1 use a prefix of the
    splits (the rest empty: lse -inf, o NaN, never read); the buffer to clear ends up zero. The
    default tile is one head per K slice (hd 16), or cuts heads of 48 into pieces."""
    splits, n = 8, 24
    lin = make_dense(n, heads * hd, torch.float16, seed=5)
    g = torch.Generator().manual_seed(6)
    o = torch.randn(splits, heads, hd, generator=g) * 2
    lse = torch.randn(splits, heads, generator=g) * 3
    for head, count in enumerate((3, 5)):
        lse[count:, head], o[count:, head] = float("-inf"), float("nan")
    clear = torch.randn(37)
    out = torch.zeros(1, n)
    dense_accumulate_attention((o, lse), lin, out, clear=clear, tile=tile)
    assert torch.equal(clear, torch.zeros(37))
    assert_close(out, reference(R.merge_splits(o, lse).half()[None], lin), "fp32")


def test_dense_gemvs_refuse_what_they_cannot_serve():
    lin = make_dense(16, 64, torch.float16)
    norm = DeferredNorm(torch.zeros(1), 64, 1e-6)
    with pytest.raises(ValueError, match="one contiguous row"):
        dense_accumulate(torch.zeros(2, 64).half(), lin, torch.zeros(2, 16))
    with pytest.raises(ValueError, match="out must be contiguous fp32"):
        dense_accumulate(torch.zeros(1, 64).half(), lin, torch.zeros(1, 16).half())
    with pytest.raises(ValueError, match="bias"):
        dense_accumulate_deferred_norm(torch.zeros(1, 64), torch.ones(64), lin, torch.zeros(1, 16), norm)
    with pytest.raises(ValueError, match="fp32"):
        dense_accumulate_swiglu(torch.zeros(1, 128).half(), lin, torch.zeros(1, 16))
    with pytest.raises(ValueError, match="power of two"):
        dense_accumulate_attention((torch.zeros(3, 4, 16), torch.zeros(3, 4)), lin, torch.zeros(1, 16))
