"""Whole tiny checkpoints in GPTQ / AWQ / compressed-tensors form, written with the libraries'
own packing code (see oracles.py) and configs laid out as those libraries write them.

The source is a tiny fp16 HF model (qruntime.demo.build_tiny_model); every decoder linear (and
lm_head when asked) is quantized with simple min/max parameters, its fake-quantized weight handed
to the library's packer (as GPTQ and AWQ do), and its float `weight` replaced by the packed tensors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import oracles
from qruntime.checkpoint import LAYER_LINEARS


def _fake_quant(w, bits, gs, sym, g_idx):
    """(W_fake fp16, scales [N, G], zeros [N, G]) with GPTQ-style min/max parameters."""
    scales, zeros = oracles.gptq_params(w, bits, gs, sym, g_idx)
    s, z = scales[:, g_idx.long()], zeros[:, g_idx.long()]
    return ((torch.clamp(torch.round(w.float() / s) + z, 0, 2**bits - 1) - z) * s).to(w.dtype), scales, zeros


def pack_gptq(w, bias, bits, group_size, sym, act_order, v2=False, seed=0):
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    g_idx = (torch.arange(k) // gs).int()
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=torch.Generator().manual_seed(seed))].contiguous()
    wq, scales, zeros = _fake_quant(w, bits, gs, sym, g_idx)
    linear = torch.nn.Linear(k, n, bias=bias is not None).half()
    linear.weight.data = wq.half()
    if bias is not None:
        linear.bias.data = bias.half()
    q = oracles.autogptq_quant_linear()(bits, group_size, k, n, bias is not None)
    q.pack(linear, scales, zeros, g_idx=g_idx)
    out = {"qweight": q.qweight, "qzeros": q.qzeros, "scales": q.scales, "g_idx": q.g_idx}
    if v2:  # GPTQModel gptqmodel/utils/model.py convert_gptq_v1_to_v2_format_module
        out["qzeros"] = out["qzeros"] + {4: 0b00010001000100010001000100010001, 8: 0b00000001000000010000000100000001}[bits]
    if bias is not None:
        out["bias"] = q.bias
    return out


def pack_awq(w, bias, group_size, version):
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    wq, scales, zeros = _fake_quant(w, 4, gs, False, (torch.arange(k) // gs).int())
    linear = torch.nn.Linear(k, n, bias=bias is not None).half()
    linear.weight.data = wq.half()
    if bias is not None:
        linear.bias.data = bias.half()
    scales = scales.half()
    if version == "gemm":
        q = oracles.awq_module("awq.modules.linear.gemm").WQLinear_GEMM.from_linear(
            linear, 4, gs, scales=scales.t().contiguous(), zeros=zeros.t().contiguous())
    else:
        q = oracles.awq_module("awq.modules.linear.gemv").WQLinear_GEMV.from_linear(
            linear, 4, gs, scales=scales, zeros=zeros)
    out = {"qweight": q.qweight, "qzeros": q.qzeros, "scales": q.scales}
    if bias is not None:
        out["bias"] = q.bias
    return out


def pack_ct(w, bias, bits, group_size, sym):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    n, k = w.shape
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="channel" if group_size == -1 else "group",
                            group_size=None if group_size == -1 else group_size)
    gs = k if group_size == -1 else group_size
    grouped = w.view(n, k // gs, gs)
    scale, zp = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    state = {"weight": w, "weight_scale": scale.to(w.dtype), "weight_zero_point": zp}
    out = dict(PackedQuantizationCompressor.compress(state, QuantizationScheme(targets=["Linear"], weights=args)))
    if bias is not None:
        out["bias"] = bias
    return out, args.model_dump(mode="json")


def write_model(src: Path, out: Path, pack_one, quant_lm_head: bool = False) -> Path:
    """Copies the HF dir `src` to `out`, replacing each decoder linear's weight with pack_one(w, b)."""
    shutil.copytree(src, out)
    state = load_file(out / "model.safetensors")
    cfg = json.loads((out / "config.json").read_text())
    names = [f"model.layers.{i}.{s}" for i in range(cfg["num_hidden_layers"]) for s in LAYER_LINEARS]
    if quant_lm_head:
        names.append("lm_head")
        if cfg.get("tie_word_embeddings"):
            state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    for name in names:
        w, b = state.pop(f"{name}.weight"), state.pop(f"{name}.bias", None)
        for suffix, t in pack_one(w, b).items():
            state[f"{name}.{suffix}"] = t.contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def set_quantization_config(out: Path, qc: dict | None, side_file: tuple[str, dict] | None = None) -> None:
    cfg = json.loads((out / "config.json").read_text())
    if qc is not None:
        cfg["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if side_file is not None:
        (out / side_file[0]).write_text(json.dumps(side_file[1], indent=2))
