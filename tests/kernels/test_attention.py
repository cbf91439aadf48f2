"""kernels.flash_decode and kernels.prefill_attention against kernels.reference.attention_over_cache,
over fp32 and int8 caches, with GQA."""

import pytest
import torch

from qruntime.kernels import reference as R
from qruntime.kernels.flash_decode import flash_decode
from qruntime.kernels.prefill_attention import prefill_attention
from tolerances import assert_close

S, HD = 96, 16


def make_cache(kv, int8, seed=0):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(kv, S, HD, generator=g), torch.randn(kv, S, HD, generator=g)
    if not int8:
        return dict(k_cache=k, v_cache=v), k, v
    (kc, ks), (vc, vs) = R.quantize_kv_int8(k), R.quantize_kv_int8(v)
    return dict(k_cache=kc, v_cache=vc, k_scale=ks, v_scale=vs), kc.float() * ks[..., None], vc.float() * vs[..., None]


@pytest.mark.parametrize("int8", [False, True], ids=["fp32-cache", "int8-cache"])
@pytest.mark.parametrize("heads,kv", [(4, 4), (8, 2)], ids=["mha", "gqa4"])
@pytest.mark.parametrize("length", [1, 15, 16, 17, 77, 96], ids=lambda n: f"len{n}")
def test_flash_decode(int8, heads, kv, length):
    cache, k, v = make_cache(kv, int8)
    q = torch.randn(heads, HD, generator=torch.Generator().manual_seed(length))
    out = torch.full((heads * HD,), float("nan"))
    flash_decode(q, cache["k_cache"], cache["v_cache"], torch.tensor([length], dtype=torch.int32), out,
                 num_splits=4, block_s=16, k_scale=cache.get("k_scale"), v_scale=cache.get("v_scale"))
    ref = R.attention_over_cache(q[None], k, v, length - 1)[0]
    assert_close(out, ref, "fp16_dot")


@pytest.mark.parametrize("int8", [False, True], ids=["fp32-cache", "int8-cache"])
@pytest.mark.parametrize("start,m", [(0, 1), (0, 16), (0, 37), (5, 20), (30, 33)], ids=lambda v: str(v))
def test_prefill_attention(int8, start, m):
    cache, k, v = make_cache(2, int8, seed=start)
    q = torch.randn(m, 8, HD, generator=torch.Generator().manual_seed(m))
    out = torch.full((m, 8 * HD), float("nan"))
    prefill_attention(q, cache["k_cache"], cache["v_cache"], start, out=out, k_scale=cache.get("k_scale"),
                      v_scale=cache.get("v_scale"), block_m=16, block_n=16)
    assert_close(out, R.attention_over_cache(q, k, v, start), "fp16_dot")
