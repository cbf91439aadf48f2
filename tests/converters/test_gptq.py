"""GPTQ checkpoints: every variant dequantizes exactly as AutoGPTQ's own code does.

Fixtures are packed by AutoGPTQ 0.7.1's `QuantLinear.pack` (qlinear_cuda.py, loaded by path) and
compared with its CPU dequantization. GPTQModel's v2 encoding is made from AutoGPTQ's v1 output
with GPTQModel's own conversion (ModelCloud/GPTQModel gptqmodel/utils/model.py,
`convert_gptq_v1_to_v2_format_module`: `qzeros += 0b00010001...` for 4 bits,
`0b00000001000000010000000100000001` for 8 bits).
"""

import pytest
import torch

import oracles
from qruntime.converters.gptq import GPTQSpec, read_linear, spec_for
from qruntime.errors import MissingTensorError, QRuntimeError, ShapeMismatchError, UnsupportedFormatError
from qruntime.kernels.reference import dequantize_original_order
from tensor_dict import TensorDict

V2_ADD = {4: 0b00010001000100010001000100010001, 8: 0b00000001000000010000000100000001}


def gptq_pack(n, k, bits, group_size, sym, act_order, seed=0, bias=False, zero_group=False):
    """(AutoGPTQ QuantLinear after pack, its tensors by suffix)."""
    torch.manual_seed(seed)
    w = (torch.randn(n, k) * torch.linspace(0.2, 2.0, k)).half()
    gs = k if group_size == -1 else group_size
    if act_order:
        order = torch.randperm(k)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[order] = (torch.arange(k) // gs).int()
    else:
        g_idx = (torch.arange(k) // gs).int()
    if zero_group:  # all-positive group 0 -> asymmetric zero 0, the v1 underflow
        w[:, g_idx == 0] = w[:, g_idx == 0].abs()
    scales, zeros = oracles.gptq_params(w, bits, group_size, sym, g_idx)
    # GPTQ hands `pack` its quantized-dequantized weight Q (auto_gptq/quantization/gptq.py)
    s, z = scales[:, g_idx.long()], zeros[:, g_idx.long()]
    w = ((torch.clamp(torch.round(w.float() / s) + z, 0, 2**bits - 1) - z) * s).half()
    linear = torch.nn.Linear(k, n, bias=bias).half()
    linear.weight.data = w
    QuantLinear = oracles.autogptq_quant_linear()
    q = QuantLinear(bits, group_size, k, n, bias)
    q.pack(linear, scales, zeros, g_idx=g_idx)
    tensors = {"qweight": q.qweight, "qzeros": q.qzeros, "scales": q.scales, "g_idx": q.g_idx}
    if bias:
        tensors["bias"] = q.bias
    return q, tensors


def read(tensors, bits, group_size, n, k, v2=False, name="model.layers.0.mlp.up_proj"):
    weights = TensorDict({f"{name}.{s}": t for s, t in tensors.items()})
    return read_linear(weights, name, GPTQSpec(bits, group_size, 0 if v2 else 1, "test config"), (n, k))


VARIANTS = [  # (bits, group_size, sym, act_order)
    (4, 32, False, False), (4, 64, True, False), (4, 128, False, False), (4, -1, False, False),
    (4, 32, True, True), (4, 128, False, True), (8, 32, False, False), (8, 128, True, False),
    (8, -1, True, False), (8, 64, False, True),
]


def vid(v):
    bits, gs, sym, act = v
    return f"w{bits}-g{gs}-{'sym' if sym else 'asym'}{'-actorder' if act else ''}"


@pytest.mark.parametrize("variant", VARIANTS, ids=vid)
@pytest.mark.parametrize("shape", [(64, 256), (96, 384)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_v1_equals_autogptq_dequantization(variant, shape):
    bits, group_size, sym, act_order = variant
    n, k = shape
    q, tensors = gptq_pack(n, k, bits, group_size, sym, act_order, bias=True)
    lin = read(tensors, bits, group_size, n, k)
    ref = oracles.autogptq_dequantize(q)  # fp16, as AutoGPTQ computes it
    ours = dequantize_original_order(lin)  # fp32, exact products of fp16 scales and small ints
    assert torch.equal(ours.half(), ref), (ours.half() - ref).abs().max()
    assert lin.zero_mode == ("symmetric" if sym else "int")
    assert (lin.perm is not None) == act_order
    assert torch.equal(lin.bias, q.bias)
    if act_order:  # stored columns are grouped: group g is stored columns [g*gs, (g+1)*gs)
        gs = k if group_size == -1 else group_size
        assert torch.equal(tensors["g_idx"][lin.perm.long()].long(), torch.arange(k) // gs)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if not v[2]], ids=vid)
def test_v2_zeros_equal_v1(variant):
    """GPTQModel's gptq_v2 stores raw zeros; the same weights read identically."""
    bits, group_size, sym, act_order = variant
    q, tensors = gptq_pack(64, 256, bits, group_size, sym, act_order)
    v2 = dict(tensors, qzeros=tensors["qzeros"] + V2_ADD[bits])  # GPTQModel's v1 -> v2 conversion
    lin = read(v2, bits, group_size, 64, 256, v2=True)
    assert torch.equal(dequantize_original_order(lin).half(), oracles.autogptq_dequantize(q))


@pytest.mark.parametrize("bits", [4, 8])
def test_v1_zero_underflow_kept_exactly(bits):
    """An asymmetric zero 0 underflows in v1 packing (AutoGPTQ reads it, and the fields it
    corrupts, as 2^b); qruntime reproduces AutoGPTQ's weights exactly via float offsets."""
    q, tensors = gptq_pack(64, 128, bits, 32, False, False, zero_group=True)
    lin = read(tensors, bits, 32, 64, 128)
    assert lin.zero_mode == "float" and lin.offsets.dtype == torch.float32
    assert torch.equal(dequantize_original_order(lin).half(), oracles.autogptq_dequantize(q))


def test_dynamic_overrides():
    default = GPTQSpec(4, 128, 1, "cfg")
    dynamic = {"-:.*layers\\.1\\..*": {}, "+:.*down_proj": {"bits": 8, "group_size": 32}}
    assert spec_for("model.layers.1.mlp.up_proj", default, dynamic) is None
    assert spec_for("model.layers.0.mlp.down_proj", default, dynamic).bits == 8
    assert spec_for("model.layers.0.mlp.up_proj", default, dynamic) == default


# ------------------------------------------------------------------------- malformed inputs

NAME = "model.layers.0.mlp.up_proj"


def test_missing_scales_names_tensor():
    _, tensors = gptq_pack(64, 256, 4, 128, False, False)
    del tensors["scales"]
    with pytest.raises(MissingTensorError, match=f"{NAME}.scales"):
        read(tensors, 4, 128, 64, 256)


def test_wrong_qweight_shape_names_tensor():
    _, tensors = gptq_pack(64, 256, 4, 128, False, False)
    tensors["qweight"] = tensors["qweight"][:-1]
    with pytest.raises(ShapeMismatchError, match=f"{NAME}.qweight.*bits=4"):
        read(tensors, 4, 128, 64, 256)


@pytest.mark.parametrize("config_bits,config_gs", [(8, 128), (4, 64)], ids=["bits-mismatch", "group-mismatch"])
def test_config_mismatch_names_tensor(config_bits, config_gs):
    _, tensors = gptq_pack(64, 256, 4, 128, False, False)
    with pytest.raises(ShapeMismatchError, match=f"{NAME}.(qweight|scales)"):
        read(tensors, config_bits, config_gs, 64, 256)


def test_g_idx_out_of_range_names_tensor():
    _, tensors = gptq_pack(64, 256, 4, 128, False, True)
    tensors["g_idx"] = tensors["g_idx"] + 5
    with pytest.raises(QRuntimeError, match=f"{NAME}.g_idx"):
        read(tensors, 4, 128, 64, 256)


def test_unbalanced_g_idx_is_refused():
    _, tensors = gptq_pack(64, 256, 4, 128, False, False)
    g = tensors["g_idx"].clone()
    g[:10] = 1  # group 0 short, group 1 long
    tensors["g_idx"] = g
    with pytest.raises(UnsupportedFormatError, match=f"{NAME}.g_idx"):
        read(tensors, 4, 128, 64, 256)
