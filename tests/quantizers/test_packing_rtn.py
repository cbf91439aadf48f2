"""Packing is bit-exact; RTN codes reconstruct each weight within half a step of its group."""

import pytest
import torch

from qruntime.checkpoint import effective_group_size
from qruntime.errors import InvalidOptionError
from qruntime.kernels.reference import dequantize
from qruntime.quantizers.base import QuantPolicy
from qruntime.quantizers.packing import pack_int4, unpack_int4
from qruntime.quantizers.rtn import quantize_rtn


@pytest.mark.parametrize("k", [1, 7, 8, 9, 64, 100], ids=lambda k: f"k{k}")
def test_int4_pack_roundtrip_exact(k):
    codes = torch.randint(0, 16, (5, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(k))
    words = pack_int4(codes)
    assert words.dtype == torch.int32 and words.shape == (5, -(-k // 8))
    assert torch.equal(unpack_int4(words, k), codes)


def test_int4_packing_does_not_depend_on_byte_order(monkeypatch):
    """pack_int4 / unpack_int4 write and read a little-endian machine's bytes directly; elsewhere they
    shift whole words. Both give the same words and codes."""
    import sys

    codes = torch.randint(0, 16, (6, 45), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    words = pack_int4(codes)
    unpacked = unpack_int4(words, 45)
    monkeypatch.setattr(sys, "byteorder", "big" if sys.byteorder == "little" else "little")
    assert torch.equal(pack_int4(codes), words)
    assert torch.equal(unpack_int4(words, 45), unpacked) and torch.equal(unpacked, codes) and unpacked.is_contiguous()


@pytest.mark.parametrize("shape", [(0, 16), (3, 0), (0, 0)], ids=["no-rows", "no-columns", "empty"])
def test_int4_packing_of_empty_tensors(shape):
    words = pack_int4(torch.zeros(shape, dtype=torch.uint8))
    assert words.dtype == torch.int32 and words.shape == (shape[0], -(-shape[1] // 8))
    assert unpack_int4(words, shape[1]).shape == shape


def test_int4_bit_order_low_nibble_first():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.uint8)
    assert pack_int4(codes).item() == int.from_bytes(bytes([0x21, 0x43, 0x65, 0xF7]), "little", signed=True)


SHAPES = [(16, 64), (24, 96), (8, 200)]  # 200: last group partial for every group size


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_rtn_error_within_half_step(bits, group_size, symmetric, shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.linspace(0.1, 3.0, shape[1])  # varied column scales
    w[0, :5] = 0.0
    lin = quantize_rtn(w, bits, group_size, symmetric)
    lin.validate("test")
    assert lin.zero_mode == ("symmetric" if symmetric else "int")
    deq = dequantize(lin)
    gs = effective_group_size(group_size, shape[1])
    step = lin.scales.float().repeat_interleave(gs, dim=1)[:, : shape[1]]
    err = (deq - w).abs()
    # Inside the representable range [(0 - z) s, (qmax - z) s] rounding errs by at most half a step.
    # Asymmetric zero points are rounded integers, so a group's extreme value can fall up to half a
    # step outside that range and be clamped: its error stays below one step.
    z = 2 ** (bits - 1) if symmetric else lin.zeros.float().repeat_interleave(gs, dim=1)[:, : shape[1]]
    inside = (w >= (0 - z) * step - 1e-6) & (w <= (2**bits - 1 - z) * step + 1e-6)
    bad = ((err > step / 2 + 1e-6) & inside).nonzero()
    assert bad.numel() == 0, f"first violations at {bad[:5].tolist()}"
    assert torch.all(err <= step + 1e-6)
    assert inside.float().mean() > 0.95  # the range check excludes only a group's extremes
    assert torch.all(deq[0, :5] == 0.0)  # zero is exactly representable


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_rtn_in_row_blocks_is_the_whole_tensor_bit_for_bit(monkeypatch, bits, symmetric):
    """quantize_rtn works a block of rows at a time (bounded memory on an lm_head): blocks of 3 rows
    of 37, the last short, with a short last group, give the codes, scales and zeros of one block."""
    import qruntime.quantizers.rtn as rtn

    w = torch.randn(37, 200, generator=torch.Generator().manual_seed(bits)).to(torch.bfloat16)
    whole = quantize_rtn(w, bits, 64, symmetric=symmetric)
    monkeypatch.setattr(rtn, "_BLOCK_ELEMENTS", 3 * 200)
    blocked = quantize_rtn(w, bits, 64, symmetric=symmetric)
    for key, value in whole.tensors().items():
        assert torch.equal(blocked.tensors()[key], value), key


def test_rtn_all_zero_group_is_exact():
    lin = quantize_rtn(torch.zeros(4, 64), 4, 32, symmetric=False)
    assert torch.equal(dequantize(lin), torch.zeros(4, 64))


def test_policy_rejects_bad_options():
    with pytest.raises(InvalidOptionError, match="bits=3"):
        QuantPolicy(bits=3)
    with pytest.raises(InvalidOptionError, match="group_size=100"):
        QuantPolicy(bits=4, group_size=100)
    assert QuantPolicy(bits=4).for_linear("lm_head") == (8, 128)
    assert QuantPolicy(bits=4, lm_head_bits=16).for_linear("lm_head")[0] == 16
    assert QuantPolicy(bits=4, group_size=64).for_linear("model.layers.0.mlp.up_proj") == (4, 64)
