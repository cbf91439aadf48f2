"""kernels.rmsnorm, kernels.swiglu and kernels.rope (RoPE + qk-norm + KV-cache write + int8 quantize)."""

import pytest
import torch

from qruntime.kernels import reference as R
from qruntime.kernels.rmsnorm import embed_rmsnorm, rmsnorm
from qruntime.kernels.rope import rope_qkv_to_cache
from qruntime.kernels.swiglu import swiglu
from tolerances import assert_close


@pytest.mark.parametrize("d", [1, 50, 64, 130], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("m", [1, 3], ids=lambda m: f"m{m}")
def test_rmsnorm(m, d):
    x, w = torch.randn(m, d), torch.randn(d)
    out = torch.full((m, d), float("nan"))
    rmsnorm(x, w, 1e-6, out=out)
    assert_close(out, R.rms_norm(x, w, 1e-6), "fp32")


@pytest.mark.parametrize("d", [50, 64], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32-table", "fp16-table"])
def test_embed_rmsnorm(dtype, d):
    """The decode step's first launch: rows = table[index] in fp32 and out = their RMSNorm (fp16)."""
    table = torch.randn(40, d).to(dtype)
    index = torch.tensor([37, 2], dtype=torch.int64)
    w = torch.randn(d)
    rows = torch.full((2, d), float("nan"))
    out = torch.full((2, d), float("nan"), dtype=torch.float16)
    embed_rmsnorm(table, index, w, 1e-6, rows=rows, out=out)
    assert torch.equal(rows, table[index].float())
    assert_close(out, R.rms_norm(table[index].float(), w, 1e-6).half(), "fp16_dot")
    with pytest.raises(ValueError, match="index must be int64"):
        embed_rmsnorm(table, index.int(), w, 1e-6, rows=rows, out=out)


@pytest.mark.parametrize("f", [7, 1024, 1500], ids=lambda f: f"f{f}")
def test_swiglu_and_zeroing(f):
    gu = torch.randn(2, 2 * f)
    ref = R.swiglu(gu)
    src = gu.clone()
    out = torch.full((2, f), float("nan"))
    swiglu(src, out=out, zero_input=True)
    assert_close(out, ref, "fp32")
    assert torch.all(src == 0)


H, KV, HD, S = 4, 2, 16, 40


@pytest.mark.parametrize("int8", [False, True], ids=["fp32-cache", "int8-cache"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk-norm"])
def test_rope_writes_q_and_cache(int8, qk_norm):
    g = torch.Generator().manual_seed(0)
    m = 3
    qkv = torch.randn(m, (H + 2 * KV) * HD, generator=g)
    pos = torch.tensor([5, 6, 39], dtype=torch.int32)
    angles = torch.rand(S, HD // 2, generator=g) * 6
    cos, sin = angles.cos(), angles.sin()
    qn, kn = (torch.rand(HD, generator=g) + 0.5, torch.rand(HD, generator=g) + 0.5) if qk_norm else (None, None)
    cache_dtype = torch.int8 if int8 else torch.float32
    kc, vc = torch.zeros(KV, S, HD, dtype=cache_dtype), torch.zeros(KV, S, HD, dtype=cache_dtype)
    ks, vs = (torch.zeros(KV, S), torch.zeros(KV, S)) if int8 else (None, None)
    q_out = torch.full((m, H, HD), float("nan"))
    rope_qkv_to_cache(qkv, pos, cos, sin, q_out, kc, vc, H, KV, HD, q_norm=qn, k_norm=kn, eps=1e-6,
                      k_scale=ks, v_scale=vs)

    t = qkv.view(m, H + 2 * KV, HD)
    c, s = cos[pos.long()][:, None], sin[pos.long()][:, None]
    q, k, v = t[:, :H], t[:, H:H + KV], t[:, H + KV:]
    if qk_norm:
        q, k = R.rms_norm(q, qn, 1e-6), R.rms_norm(k, kn, 1e-6)
    q_ref, k_ref = R.rope_rotate_half(q, c, s), R.rope_rotate_half(k, c, s)
    assert_close(q_out, q_ref, "fp32")
    written_k, written_v = kc[:, pos.long()].transpose(0, 1), vc[:, pos.long()].transpose(0, 1)
    if int8:
        codes_k, scale_k = R.quantize_kv_int8(k_ref)
        codes_v, scale_v = R.quantize_kv_int8(v)
        # codes equal the reference's up to a rounding tie (at most one step)
        assert (written_k.int() - codes_k.int()).abs().max() <= 1 and (written_v.int() - codes_v.int()).abs().max() <= 1
        torch.testing.assert_close(ks[:, pos.long()].T, scale_k, rtol=1e-5, atol=0)
        torch.testing.assert_close(vs[:, pos.long()].T, scale_v, rtol=1e-5, atol=0)
    else:
        assert_close(written_k, k_ref, "fp32")
        assert_close(written_v, v, "fp32")
    untouched = torch.ones(S, dtype=torch.bool)
    untouched[pos.long()] = False
    assert torch.all(kc[:, untouched] == 0)  # nothing written outside the given positions

