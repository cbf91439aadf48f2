"""AutoAWQ checkpoints: GEMM and GEMV layouts dequantize exactly as AutoAWQ's own code does.

Fixtures are packed by AutoAWQ 0.2.9's `WQLinear_GEMM.from_linear` / `WQLinear_GEMV.from_linear`
(awq/modules/linear/gemm.py, gemv.py, loaded without `awq/__init__.py`). GEMM is compared with
`awq/utils/packing_utils.py: dequantize_gemm`. AutoAWQ has no Python dequantization for GEMV (its
CUDA kernel does it), so GEMV is compared with the integer weight `from_linear` computes (its own
expression, `round((w + z*s) / s)`) times the scales, and with the GEMM reading of the same inputs.
"""

import pytest
import torch

import oracles
from qruntime.converters.awq import AWQSpec, read_linear
from qruntime.errors import MissingTensorError, ShapeMismatchError
from qruntime.kernels.reference import dequantize
from tensor_dict import TensorDict

NAME = "model.layers.0.self_attn.q_proj"


def awq_inputs(n, k, group_size, seed=0):
    """(fp16 linear, scales [G, N], zeros [G, N]) as AutoAWQ's pseudo_quantize_tensor leaves them
    (awq/quantize/quantizer.py: fp16 arithmetic, the linear's weight replaced by its fake-quantized
    value, which from_linear then packs)."""
    torch.manual_seed(seed)
    gs = k if group_size == -1 else group_size
    w = (torch.randn(n, k) * torch.linspace(0.2, 2.0, k)).half().view(-1, gs)
    max_val, min_val = w.amax(dim=1, keepdim=True), w.amin(dim=1, keepdim=True)
    scales = (max_val - min_val).clamp(min=1e-5) / 15
    zeros = (-torch.round(min_val / scales)).clamp_(0, 15)
    w = ((torch.clamp(torch.round(w / scales) + zeros, 0, 15) - zeros) * scales).view(n, k)
    scales, zeros = scales.view(n, -1), zeros.view(n, -1)
    linear = torch.nn.Linear(k, n, bias=False).half()
    linear.weight.data = w
    return linear, scales.t().contiguous(), zeros.t().contiguous()


def pack(version, n, k, group_size):
    linear, scales, zeros = awq_inputs(n, k, group_size)
    # from_linear indexes groups with its group_size argument, so -1 (per channel) is passed as K
    group_size = k if group_size == -1 else group_size
    if version == "gemm":
        q = oracles.awq_module("awq.modules.linear.gemm").WQLinear_GEMM.from_linear(
            linear, 4, group_size, scales=scales, zeros=zeros)
    else:  # AutoAWQ's quantizer hands GEMV the [N, G] orientation
        q = oracles.awq_module("awq.modules.linear.gemv").WQLinear_GEMV.from_linear(
            linear, 4, group_size, scales=scales.t().contiguous(), zeros=zeros.t().contiguous())
    return linear, scales, zeros, {"qweight": q.qweight, "qzeros": q.qzeros, "scales": q.scales}


def read(tensors, version, group_size, n, k):
    weights = TensorDict({f"{NAME}.{s}": t for s, t in tensors.items()})
    return read_linear(weights, NAME, AWQSpec(group_size, version, "test config"), (n, k))


SHAPES = [(64, 256), (96, 512)]  # AutoAWQ packs whole 32-column blocks (N % 32 == 0)


@pytest.mark.parametrize("group_size", [32, 64, 128, -1], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gemm_equals_autoawq_dequantize_gemm(group_size, shape):
    n, k = shape
    _, _, _, t = pack("gemm", n, k, group_size)
    lin = read(t, "gemm", group_size, n, k)
    gs = k if group_size == -1 else group_size
    packing = oracles.awq_module("awq.utils.packing_utils")
    ref = packing.dequantize_gemm(t["qweight"], t["qzeros"], t["scales"], 4, gs)  # [K, N] fp16
    assert torch.equal(dequantize(lin).half(), ref.t())
    assert lin.perm is None and lin.zero_mode in ("int", "symmetric")


@pytest.mark.parametrize("group_size", [32, 64, 128], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gemv_equals_autoawq_integer_weight(group_size, shape):
    n, k = shape
    linear, scales, zeros, t = pack("gemv", n, k, group_size)
    lin = read(t, "gemv", group_size, n, k)
    # gemv.py from_linear, with its dtypes: scale_zeros = zeros * scales (fp32 * fp16 -> fp32),
    # intweight[:, k] = round((w[:, k] + scale_zeros[:, g]) / scales[:, g]), g = k // group_size
    s_half = scales.t().repeat_interleave(group_size, 1)
    z = zeros.t().repeat_interleave(group_size, 1)
    intweight = torch.round((linear.weight.data + z * s_half) / s_half)
    assert torch.equal(dequantize(lin), (intweight - z) * s_half.float())
    _, _, _, t_gemm = pack("gemm", n, k, group_size)  # the same inputs in the GEMM layout
    assert torch.equal(dequantize(lin), dequantize(read(t_gemm, "gemm", group_size, n, k)))


def test_interleave_order_field_by_field():
    """Field i of a GEMM word holds column 8c + [0,2,4,6,1,3,5,7][i] (gemm.py's order_map)."""
    from qruntime.converters.foreign import unpack_words

    word = torch.tensor([[sum(v << (4 * i) for i, v in enumerate([0, 2, 4, 6, 1, 3, 5, 7]))]], dtype=torch.int32)
    assert unpack_words(word, 4, dim=1, order=[0, 2, 4, 6, 1, 3, 5, 7]).tolist() == [list(range(8))]


def test_missing_scales_names_tensor():
    _, _, _, t = pack("gemm", 64, 256, 128)
    del t["scales"]
    with pytest.raises(MissingTensorError, match=f"{NAME}.scales"):
        read(t, "gemm", 128, 64, 256)


@pytest.mark.parametrize("version,gs", [("gemv", 128), ("gemm", 64)], ids=["layout-mismatch", "group-mismatch"])
def test_config_mismatch_names_tensor(version, gs):
    _, _, _, t = pack("gemm", 64, 256, 128)
    with pytest.raises(ShapeMismatchError, match=f"{NAME}.(qweight|qzeros|scales)"):
        read(t, version, gs, 64, 256)
