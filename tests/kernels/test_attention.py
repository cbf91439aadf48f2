"""kernels.flash_decode and kernels.prefill_attention against kernels.reference.attention_over_cache,
over fp32 and int8 caches, with GQA."""

import pytest
import torch

from qruntime.kernels import flash_decode as fd_module
from qruntime.kernels import reference as R
from qruntime.kernels.flash_decode import RopeInput, flash_decode
from qruntime.kernels.prefill_attention import prefill_attention
from qruntime.kernels.rmsnorm import DeferredNorm
from qruntime.kernels.rope import padded_head_slots, rope_qkv_to_cache
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
@pytest.mark.parametrize("heads_last", [False, True], ids=["heads-as-rows", "heads-as-columns"])
def test_flash_decode(int8, heads, kv, length, heads_last):
    """Both MMA arrangements of the heads (kernels._common.attend_loaded / attend_loaded_heads_last)."""
    _check_flash_decode(int8, heads, kv, length, heads_last, cache_seed=0, q_seed=length)


@pytest.mark.parametrize("int8", [False, True], ids=["fp32-cache", "int8-cache"])
@pytest.mark.parametrize("heads_last", [False, True], ids=["heads-as-rows", "heads-as-columns"])
def test_flash_decode_with_seven_heads_a_group(int8, heads_last):
    """Qwen2.5-7B's grouping (28 query heads over 4 KV heads): 7 heads padded to 8 columns or 16 rows."""
    _check_flash_decode(int8, 14, 2, 77, heads_last, cache_seed=3, q_seed=3)


@pytest.mark.parametrize("int8", [False, True], ids=["fp32-cache", "int8-cache"])
def test_flash_decode_combines_a_head_in_pieces(int8, monkeypatch):
    """The combine's programs each merge PIECE dims of a head (4 programs a head here); with rope,
    the decode step's `clear` is zeroed across all of them."""
    monkeypatch.setattr(fd_module, "COMBINE_PIECE", HD // 4)
    _check_flash_decode(int8, 8, 2, 77, True, cache_seed=5, q_seed=5)
    _check_rope_in_flash_decode(int8, False, 8, 2, 95, deferred=False)


def _check_flash_decode(int8, heads, kv, length, heads_last, cache_seed, q_seed):
    cache, k, v = make_cache(kv, int8, seed=cache_seed)
    q = torch.randn(heads, HD, generator=torch.Generator().manual_seed(q_seed))
    out = torch.full((heads * HD,), float("nan"))
    # poisoned: the empty splits' o rows stay unwritten, and the combine must weigh them 0, not multiply by 0
    workspace = (torch.full((4, heads, HD), float("nan")), torch.full((4, heads), float("nan")))
    flash_decode(q, cache["k_cache"], cache["v_cache"], torch.tensor([length], dtype=torch.int32), out,
                 num_splits=4, block_s=16, k_scale=cache.get("k_scale"), v_scale=cache.get("v_scale"),
                 heads_last=heads_last, workspace=workspace)
    assert_close(out, R.attention_over_cache(q[None], k, v, length - 1)[0], "fp16_dot")


@pytest.mark.parametrize("int8", [False, True], ids=["fp32-cache", "int8-cache"])
@pytest.mark.parametrize("start,m", [(0, 1), (0, 16), (0, 37), (5, 20), (30, 33)], ids=lambda v: str(v))
def test_prefill_attention(int8, start, m):
    cache, k, v = make_cache(2, int8, seed=start)
    q = torch.randn(m, 8, HD, generator=torch.Generator().manual_seed(m))
    out = torch.full((m, 8 * HD), float("nan"))
    prefill_attention(q, cache["k_cache"], cache["v_cache"], start, out=out, k_scale=cache.get("k_scale"),
                      v_scale=cache.get("v_scale"), block_m=16, block_n=16)
    assert_close(out, R.attention_over_cache(q, k, v, start), "fp16_dot")


def _padded(x: torch.Tensor, real: int, padded: int) -> torch.Tensor:
    """x [..., real] laid out in heads of `padded` dims (kernels.rope.padded_head_slots), zeros elsewhere."""
    out = x.new_zeros((*x.shape[:-1], padded))
    out[..., padded_head_slots(real, padded)] = x
    return out


def test_padded_head_slots_put_each_half_at_a_half():
    assert padded_head_slots(6, 8).tolist() == [0, 1, 2, 4, 5, 6]
    assert padded_head_slots(100, 128).tolist()[48:52] == [48, 49, 64, 65]
    assert padded_head_slots(16, 16).tolist() == list(range(16))


@pytest.mark.parametrize("int8", [False, True], ids=["fp32-cache", "int8-cache"])
def test_attention_over_padded_heads(int8):
    """Heads of 12 dims padded to 16 (a head_dim that is not a power of two): flash_decode and
    prefill_attention given head_dim=12 scale by 12 ** -0.5 and return the real dims packed,
    [*, H * 12], as attention over the unpadded heads does. The padding's outputs are never written
    (outputs poisoned)."""
    real, heads, kv, length = 12, 8, 2, 77
    g = torch.Generator().manual_seed(11)
    k, v = torch.randn(kv, S, real, generator=g), torch.randn(kv, S, real, generator=g)
    kp, vp = _padded(k, real, HD), _padded(v, real, HD)
    if int8:
        (kc, ks), (vc, vs) = R.quantize_kv_int8(kp), R.quantize_kv_int8(vp)
        cache = dict(k_cache=kc, v_cache=vc, k_scale=ks, v_scale=vs)
        k = (kc.float() * ks[..., None])[..., padded_head_slots(real, HD)]  # what the cache holds
        v = (vc.float() * vs[..., None])[..., padded_head_slots(real, HD)]
    else:
        cache = dict(k_cache=kp, v_cache=vp)
    q = torch.randn(heads, real, generator=g)
    out = torch.full((heads * real,), float("nan"))
    flash_decode(_padded(q, real, HD), cache["k_cache"], cache["v_cache"], torch.tensor([length], dtype=torch.int32), out,
                 num_splits=4, block_s=16, k_scale=cache.get("k_scale"), v_scale=cache.get("v_scale"), head_dim=real)
    assert_close(out, R.attention_over_cache(q[None], k, v, length - 1)[0], "fp16_dot")
    qm = torch.randn(20, heads, real, generator=g)
    out = torch.full((20, heads * real), float("nan"))
    prefill_attention(_padded(qm, real, HD), cache["k_cache"], cache["v_cache"], 5, out=out, k_scale=cache.get("k_scale"),
                      v_scale=cache.get("v_scale"), block_m=16, block_n=16, head_dim=real)
    assert_close(out, R.attention_over_cache(qm, k, v, 5), "fp16_dot")


@pytest.mark.parametrize("int8", [False, True], ids=["fp32-cache", "int8-cache"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk-norm"])
@pytest.mark.parametrize("heads,kv", [(4, 4), (8, 2)], ids=["mha", "gqa4"])
@pytest.mark.parametrize("pos", [0, 15, 16, 40, 95], ids=lambda p: f"pos{p}")
def test_flash_decode_with_rope_equals_rope_then_attention(int8, qk_norm, heads, kv, pos):
    _check_rope_in_flash_decode(int8, qk_norm, heads, kv, pos, deferred=False)


@pytest.mark.parametrize("int8", [False, True], ids=["fp32-cache", "int8-cache"])
@pytest.mark.parametrize("pos", [0, 40, 95], ids=lambda p: f"pos{p}")
def test_flash_decode_with_rope_and_heads_as_rows(int8, pos):
    """The decode step's path with the heads as MMA rows (attend_loaded; its default, tested
    above, has them as columns)."""
    _check_rope_in_flash_decode(int8, True, 8, 2, pos, deferred=False, heads_last=False)


@pytest.mark.parametrize("int8", [False, True], ids=["fp32-cache", "int8-cache"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk-norm"])
@pytest.mark.parametrize("pos", [15, 95], ids=lambda p: f"pos{p}")
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_flash_decode_applies_a_deferred_input_norm(int8, qk_norm, pos, bias):
    """q|k|v accumulated from the un-normalized residual (the GEMV left the input RMSNorm's scale,
    and its bias, to flash-decoding): given the sum of squares, the result is that of the
    normalized q|k|v plus the bias."""
    _check_rope_in_flash_decode(int8, qk_norm, 8, 2, pos, deferred=True, bias=bias)


def _check_rope_in_flash_decode(int8, qk_norm, heads, kv, pos, deferred, bias=False, heads_last=None):
    """The decode step's flash_decode(rope=...) rotates q and the new k from the fp32 q|k|v
    accumulator, writes the new k/v at `pos` and attends to them in the same launch: the cache it
    leaves and its output equal kernels.rope followed by the cache-only flash_decode; `clear` is zeroed.
    With 4 splits of 16-position blocks, pos 95 gives chunks of two blocks (the loop) and the others
    chunks of one (the block requested before the kernel waits for its producer)."""
    g = torch.Generator().manual_seed(pos + 100 * heads)
    cache, _, _ = make_cache(kv, int8, seed=pos)
    qkv = torch.randn(1, (heads + 2 * kv) * HD, generator=g)
    angles = torch.rand(S, HD // 2, generator=g) * 6
    cos, sin = angles.cos().contiguous(), angles.sin().contiguous()
    qn, kn = (torch.rand(HD, generator=g) + 0.5, torch.rand(HD, generator=g) + 0.5) if qk_norm else (None, None)
    seq_len = torch.tensor([pos + 1], dtype=torch.int32)

    ref_cache = {k: v.clone() for k, v in cache.items()}
    q = torch.empty(1, heads, HD)
    rope_qkv_to_cache(qkv, torch.tensor([pos], dtype=torch.int32), cos, sin, q, ref_cache["k_cache"],
                      ref_cache["v_cache"], heads, kv, HD, q_norm=qn, k_norm=kn, eps=1e-6,
                      k_scale=ref_cache.get("k_scale"), v_scale=ref_cache.get("v_scale"))
    expected = torch.full((heads * HD,), float("nan"))
    flash_decode(q[0], ref_cache["k_cache"], ref_cache["v_cache"], seq_len, expected, num_splits=4, block_s=16,
                 k_scale=ref_cache.get("k_scale"), v_scale=ref_cache.get("v_scale"))

    out = torch.full((heads * HD,), float("nan"))
    side = torch.randn(1, 300, generator=g)
    norm, qkv_bias = None, None
    if deferred:  # the kernel multiplies the accumulator by 1 / sqrt(37.5 / 24 + 1e-5), then adds the bias
        norm = DeferredNorm(torch.tensor([37.5]), 24, 1e-5)
        qkv_bias = torch.randn(qkv.shape[1], generator=g).half() if bias else None
        qkv = (qkv - (0 if qkv_bias is None else qkv_bias.float())) * (37.5 / 24 + 1e-5) ** 0.5
    flash_decode(None, cache["k_cache"], cache["v_cache"], seq_len, out, num_splits=4, block_s=16,
                 k_scale=cache.get("k_scale"), v_scale=cache.get("v_scale"), clear=side, heads_last=heads_last,
                 rope=RopeInput(qkv, cos, sin, q_norm=qn, k_norm=kn, eps=1e-6, input_norm=norm, qkv_bias=qkv_bias))
    assert torch.all(side == 0)
    for name in cache:  # the same cache, the new position included (fp32 rounding; int8 codes within one step)
        if int8 and name.endswith("cache"):
            assert (cache[name].int() - ref_cache[name].int()).abs().max() <= 1, name
        else:
            torch.testing.assert_close(cache[name], ref_cache[name], rtol=1e-5, atol=1e-6, msg=name)
    assert_close(out, expected, "fp16_dot")
    if not int8:  # and against the plain reference
        k = ref_cache["k_cache"]
        assert_close(out, R.attention_over_cache(q, k, ref_cache["v_cache"], pos)[0], "fp16_dot")


def test_flash_decode_with_rope_checks_its_input():
    cache, _, _ = make_cache(2, False)
    rope = RopeInput(torch.zeros(1, 10 * HD), torch.ones(S, HD // 2), torch.zeros(S, HD // 2))
    with pytest.raises(ValueError, match="q=None"):
        flash_decode(torch.zeros(8, HD), cache["k_cache"], cache["v_cache"], torch.tensor([3], dtype=torch.int32),
                     torch.empty(8 * HD), rope=rope)
    bad = RopeInput(torch.zeros(1, 10 * HD, dtype=torch.float16), rope.cos, rope.sin)
    with pytest.raises(ValueError, match="fp32"):
        flash_decode(None, cache["k_cache"], cache["v_cache"], torch.tensor([3], dtype=torch.int32),
                     torch.empty(6 * HD), rope=bad)
