"""Calibration-based quantization (GPTQ, AWQ) of the decoder, one layer at a time.

Only one decoder layer's weights and the calibration activations [samples, seqlen, hidden] live
on the compute device at once, so a 7B model quantizes on one 24 GB GPU (CPU works, slowly).
Each layer is run with qruntime's own modules (Attention, MLP, RMSNorm over 16-bit
QuantLinears), built from the float weights of the HF checkpoint:

    hidden = embed(calibration ids)
    for each layer:
        GPTQ: for each input group (q/k/v, o, gate/up, down) in order, run the layer (earlier
              groups already quantized) to collect the group's input Hessian, then quantize it
        AWQ:  run the layer once to collect every group's input, search and fold the scales,
              search the clipping, then quantize every linear with RTN
        hidden = the layer's output with its quantized weights (the next layer's input)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from qruntime.backends import get_backend
from qruntime.checkpoint import LAYER_LINEARS, PackedLinear
from qruntime.config import ModelConfig
from qruntime.kernels.reference import dequantize_original_order
from qruntime.layers import MLP, Attention, QuantLinear, RMSNorm, RotaryEmbedding
from qruntime.model import DecoderLayer
from qruntime.tokenizer import load_tokenizer

from .awq import apply_clip, search_clip, search_scales
from .base import QuantPolicy
from .calibration import Calibration, calibration_ids
from .gptq import Hessian, gptq_quantize
from .rtn import quantize_rtn

# Linears that share one input, in the order the layer computes them, and (for AWQ) the tensor
# the inverse scale is folded into: a norm weight [K] or the rows of the previous linear.
GROUPS = (
    (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
    (("self_attn.o_proj",), "self_attn.v_proj"),
    (("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
    (("mlp.down_proj",), "mlp.up_proj"),
)
NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")  # AutoAWQ too: their error passes a softmax
MAX_TOKENS = 4096  # activation rows kept per group for AWQ's searches (clip uses an eighth)

Linears = dict[str, tuple[torch.Tensor, torch.Tensor | None]]  # short name -> (weight [N, K], bias)


def _layer(config: ModelConfig, lin: Linears, norms: dict[str, torch.Tensor], device, dtype) -> DecoderLayer:
    backend = get_backend("torch")

    def linear(short: str) -> QuantLinear:
        w, b = lin[short]
        return QuantLinear(PackedLinear(w.shape[1], w.shape[0], 16, -1, w, bias=b), backend, device, dtype)

    def norm(short: str) -> RMSNorm:
        return RMSNorm(norms[short].to(device=device, dtype=dtype), config.rms_norm_eps)

    attn = Attention(config, linear("self_attn.q_proj"), linear("self_attn.k_proj"), linear("self_attn.v_proj"),
                     linear("self_attn.o_proj"), q_norm=norm("self_attn.q_norm") if config.qk_norm else None,
                     k_norm=norm("self_attn.k_norm") if config.qk_norm else None)
    mlp = MLP(linear("mlp.gate_proj"), linear("mlp.up_proj"), linear("mlp.down_proj"))
    return DecoderLayer(attn, mlp, norm("input_layernorm"), norm("post_attention_layernorm"))


def _run(layer: DecoderLayer, hidden: torch.Tensor, cos, sin, capture: dict[str, Callable] | None = None,
         batch: int = 8) -> torch.Tensor:
    """The layer over every sample ([S, L, D] -> [S, L, D]); `capture` maps a linear's short name
    to a function called with each of its inputs."""
    hooks = []
    for short, fn in (capture or {}).items():
        module = layer.get_submodule(short)
        hooks.append(module.register_forward_pre_hook(lambda _m, args, fn=fn: fn(args[0])))
    cfg_kv, hd = layer.self_attn.num_kv_heads, layer.self_attn.head_dim
    out = torch.empty_like(hidden)
    try:
        with torch.no_grad():
            for s0 in range(0, hidden.shape[0], batch):
                x = hidden[s0: s0 + batch]
                cache = torch.zeros(x.shape[0], cfg_kv, x.shape[1], hd, device=x.device, dtype=x.dtype)
                out[s0: s0 + batch] = layer(x, cos, sin, cache, cache.clone(), 0)
    finally:
        for h in hooks:
            h.remove()
    return out


def quantize_layers(path: Path, config: ModelConfig, weights, dense: dict[str, torch.Tensor], policy: QuantPolicy,
                    progress: bool = True, device: str | torch.device | None = None
                    ) -> tuple[dict[str, PackedLinear], dict[str, torch.Tensor]]:
    """GPTQ or AWQ over every decoder layer -> (packed linears, norm weights AWQ changed)."""
    from qruntime.converters.hf import float_linear, read_tokenizer_files  # converters import quantizers

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    calib = policy.calibration or Calibration()
    ids = calibration_ids(load_tokenizer(read_tokenizer_files(path), source=str(path), model_type=config.family), calib)
    hidden = dense["model.embed_tokens.weight"][ids].to(device=device, dtype=dtype)  # [S, L, D]
    rotary = RotaryEmbedding(config, ids.shape[1], device, dtype=torch.float32)
    cos, sin = rotary(torch.arange(ids.shape[1], device=device))
    step = quantize_layer_gptq if policy.method == "gptq" else quantize_layer_awq
    packed: dict[str, PackedLinear] = {}
    new_dense: dict[str, torch.Tensor] = {}
    for i in tqdm(range(config.num_layers), desc=f"{policy.method} layers", unit="layer", disable=not progress):
        prefix = f"model.layers.{i}"
        lin = {s: tuple(None if t is None else t.to(device=device, dtype=torch.float32)
                        for t in float_linear(weights, config, f"{prefix}.{s}")) for s in LAYER_LINEARS}
        norm_names = ["input_layernorm", "post_attention_layernorm"] + (
            ["self_attn.q_norm", "self_attn.k_norm"] if config.qk_norm else [])
        norms = {s: dense[f"{prefix}.{s}.weight"].to(device=device, dtype=torch.float32) for s in norm_names}
        layer_packed, changed = step(config, lin, norms, hidden, cos, sin, policy, device, dtype)
        for short, p in layer_packed.items():
            packed[f"{prefix}.{short}"] = p
            lin[short] = (dequantize_original_order(p).to(device), lin[short][1])
        for short, w in changed.items():
            norms[short] = w
            new_dense[f"{prefix}.{short}.weight"] = w.to(dense[f"{prefix}.{short}.weight"].dtype).cpu()
        hidden = _run(_layer(config, lin, norms, device, dtype), hidden, cos, sin)
    return packed, new_dense


def quantize_layer_gptq(config, lin: Linears, norms, hidden, cos, sin, policy: QuantPolicy, device, dtype):
    """GPTQ, group by group: each group's Hessian sees the earlier groups already quantized."""
    packed = {}
    for shorts, _ in GROUPS:
        hessian = Hessian(lin[shorts[0]][0].shape[1], device)
        _run(_layer(config, lin, norms, device, dtype), hidden, cos, sin, capture={shorts[0]: hessian.add})
        for short in shorts:
            w, b = lin[short]
            p = gptq_quantize(w, hessian.h, policy.bits, policy.group_size, policy.symmetric,
                              act_order=policy.act_order, bias=b)
            packed[short] = p
            lin[short] = (dequantize_original_order(p).to(device), b)
    return packed, {}


def quantize_layer_awq(config, lin: Linears, norms, hidden, cos, sin, policy: QuantPolicy, device, dtype):
    """AWQ: scales searched on the float layer's inputs and folded, clipping searched, then RTN."""
    inputs: dict[str, list[torch.Tensor]] = {shorts[0]: [] for shorts, _ in GROUPS}
    capture = {short: (lambda x, store=store: store.append(x.reshape(-1, x.shape[-1]).float()))
               for short, store in inputs.items()}
    _run(_layer(config, lin, norms, device, dtype), hidden, cos, sin, capture=capture)
    changed = {}
    xs = {}
    for shorts, prev in GROUPS:
        x = torch.cat(inputs[shorts[0]])
        x = x[:: max(1, x.shape[0] // MAX_TOKENS)]
        fold_into_linear = prev.endswith("_proj")
        if prev == "self_attn.v_proj" and config.num_heads != config.num_kv_heads:
            xs[shorts] = x  # a v channel feeds several heads of o: no per-channel fold exists (GQA)
            continue
        s = search_scales(x, [lin[t][0] for t in shorts], policy.bits, policy.group_size, policy.symmetric)
        if fold_into_linear:  # previous linear's output rows / s: o's (down's) input is divided by s
            w, b = lin[prev]
            lin[prev] = (w / s.unsqueeze(1), None if b is None else b / s)
        else:  # RMSNorm weight / s
            norms[prev] = norms[prev] / s
            changed[prev] = norms[prev]
        for t in shorts:
            lin[t] = (lin[t][0] * s.unsqueeze(0), lin[t][1])
        xs[shorts] = x / s
    packed = {}
    for shorts, _ in GROUPS:
        x = xs[shorts][:: 8]
        for t in shorts:
            w, b = lin[t]
            if t not in NO_CLIP:
                w = apply_clip(w, search_clip(x, w, policy.bits, policy.group_size, policy.symmetric),
                               policy.group_size)
            packed[t] = quantize_rtn(w, policy.bits, policy.group_size, policy.symmetric, bias=b)
    for t, p in packed.items():
        p.qweight, p.scales = p.qweight.cpu(), p.scales.cpu()
        p.zeros = None if p.zeros is None else p.zeros.cpu()
        p.bias = None if p.bias is None else p.bias.cpu()
    return packed, changed
