"""compressed-tensors pack-quantized checkpoints: W4A16/W8A16 dequantize exactly as the library's
own `PackedQuantizationCompressor.decompress` does; other schemes are refused by name.

Fixtures: scales/zero points from compressed-tensors' `calculate_qparams`, packed by its
`PackedQuantizationCompressor.compress` (compressed_tensors/compressors/pack_quantized/base.py).
"""

import pytest
import torch

from qruntime.converters.compressed_tensors import CTScheme, parse_schemes, read_linear
from qruntime.errors import MissingTensorError, ShapeMismatchError, UnsupportedFormatError
from qruntime.kernels.reference import dequantize, dequantize_original_order
from tensor_dict import TensorDict

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

NAME = "model.layers.0.mlp.down_proj"


def ct_args(bits, group_size, symmetric):
    strategy = "channel" if group_size == -1 else "group"
    return QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                            group_size=None if group_size == -1 else group_size)


def ct_compress(w, bits, group_size, symmetric):
    """The library's compressed state dict for weight `w` [N, K] (and its scheme)."""
    args = ct_args(bits, group_size, symmetric)
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    grouped = w.view(n, k // gs, gs)
    scale, zp = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    state = {"weight": w, "weight_scale": scale.to(w.dtype), "weight_zero_point": zp}
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")
    return PackedQuantizationCompressor.compress(state, scheme), scheme


def read(state, bits, group_size, symmetric, n, k):
    weights = TensorDict({f"{NAME}.{s}": t for s, t in state.items()})
    return read_linear(weights, NAME, CTScheme("group_0", ("Linear",), bits, group_size, symmetric, "test config"), (n, k))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [32, 128, -1], ids=lambda g: "channel" if g == -1 else f"g{g}")
@pytest.mark.parametrize("bits", [4, 8], ids=lambda b: f"w{b}a16")
@pytest.mark.parametrize("shape", [(64, 256), (72, 384)], ids=lambda s: f"{s[0]}x{s[1]}")  # 72: N*b not whole words
def test_equals_compressor_decompress(bits, group_size, symmetric, dtype, shape):
    n, k = shape
    torch.manual_seed(bits + n)
    w = (torch.randn(n, k) * torch.linspace(0.2, 2.0, k)).to(dtype)
    state, scheme = ct_compress(w, bits, group_size, symmetric)
    lin = read(state, bits, group_size, symmetric, n, k)
    ref = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
    assert ref.dtype == dtype
    assert torch.equal(dequantize(lin).to(dtype), ref)
    assert lin.zero_mode == "symmetric" if symmetric else lin.zero_mode in ("int", "symmetric")
    assert lin.scales.dtype == dtype


def test_actorder_group_g_idx_becomes_perm():
    """actorder "group" (older writers store weight_g_idx): column k uses group g_idx[k]; the
    dequantized weight in model order equals that rule (compressed-tensors <= 0.9,
    quantization/lifecycle/forward.py `_process_quantization`, g_idx branch)."""
    n, k, gs = 64, 256, 64
    torch.manual_seed(0)
    w = torch.randn(n, k).half()
    state, _ = ct_compress(w, 4, gs, True)
    g_idx = torch.randperm(k) % (k // gs)
    state["weight_g_idx"] = g_idx.int()
    lin = read(state, 4, gs, True, n, k)
    from qruntime.quantizers.packing import unpack
    from qruntime.converters.foreign import unpack_words

    u = unpack_words(state["weight_packed"], 4, dim=1)[:, :k].float()
    expected = state["weight_scale"].float()[:, g_idx] * (u - 8)
    assert lin.perm is not None and torch.equal(dequantize_original_order(lin), expected)
    assert unpack(lin.qweight, 4, k).shape == (n, k)


QC = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
      "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
          "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128},
          "input_activations": None}}, "ignore": ["lm_head"]}


def with_group(**changes):
    group = {**QC["config_groups"]["group_0"], **changes}
    return {**QC, "config_groups": {"group_0": group}}


@pytest.mark.parametrize("qc,fragment", [
    (with_group(input_activations={"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}),
     "activation quantization"),
    (with_group(weights={"num_bits": 8, "type": "float", "strategy": "channel"}), "float 8-bit channel"),
    ({**with_group(), "format": "float-quantized"}, "format float-quantized"),
    ({**QC, "sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4"}}, "sparse-24-bitmask"),
    (with_group(weights={"num_bits": 4, "type": "int", "strategy": "tensor"}), "int 4-bit tensor"),
    (with_group(weights={"num_bits": 2, "type": "int", "strategy": "group", "group_size": 128}), "int 2-bit"),
    ({**QC, "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor"}}, "kv_cache_scheme"),
], ids=["w8a8-int", "fp8", "float-quantized", "2of4-sparse", "tensor-strategy", "w2", "kv-cache"])
def test_unsupported_schemes_are_named(qc, fragment):
    with pytest.raises(UnsupportedFormatError, match=fragment):
        parse_schemes(qc, "config.json")


def test_parse_w4a16():
    (scheme,), ignore = parse_schemes(QC, "config.json")
    assert (scheme.bits, scheme.group_size, scheme.symmetric, ignore) == (4, 128, True, ["lm_head"])


def test_missing_scale_names_tensor():
    state, _ = ct_compress(torch.randn(64, 256), 4, 128, True)
    del state["weight_scale"]
    with pytest.raises(MissingTensorError, match=f"{NAME}.weight_scale"):
        read(state, 4, 128, True, 64, 256)


@pytest.mark.parametrize("bits,gs", [(8, 128), (4, 64)], ids=["bits-mismatch", "group-mismatch"])
def test_config_mismatch_names_tensor(bits, gs):
    state, _ = ct_compress(torch.randn(64, 256), 4, 128, True)
    with pytest.raises(ShapeMismatchError, match=f"{NAME}.weight_(packed|scale)"):
        read(state, bits, gs, True, 64, 256)
