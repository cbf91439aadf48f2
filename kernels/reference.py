"""Plain, obvious PyTorch references, shared by the torch backend and the tests."""

from __future__ import annotations

import torch

from qruntime.checkpoint import PackedLinear, effective_group_size
from qruntime.quantizers.packing import unpack


def dequantize(lin: PackedLinear, dtype: torch.dtype = torch.float32, rows: slice = slice(None)) -> torch.Tensor:
    """The stored weight W_stored [N, K] (columns in stored order; see PackedLinear.perm), or the
    block `rows` of its rows."""
    if lin.bits == 16:
        return lin.qweight[rows].to(dtype)
    k, groups = lin.in_features, lin.num_groups
    gs = effective_group_size(lin.group_size, k)
    q = unpack(lin.qweight[rows], lin.bits, k).to(torch.float32)
    n = q.shape[0]
    if groups * gs != k:  # a short last group: pad it with codes that are cut off below
        q = torch.nn.functional.pad(q, (0, groups * gs - k))
    q = q.view(n, groups, gs)  # each group's scale (and zero) broadcasts over its columns

    def per_group(t: torch.Tensor) -> torch.Tensor:
        return t[rows].to(torch.float32)[..., None]

    # in place on q, a fresh float32 tensor: the same products as s * (q - z) and s * q + m
    if lin.zero_mode == "symmetric":
        w = q.sub_(2 ** (lin.bits - 1)).mul_(per_group(lin.scales))
    elif lin.zero_mode == "int":
        w = q.sub_(per_group(lin.zeros)).mul_(per_group(lin.scales))
    else:
        w = q.mul_(per_group(lin.scales)).add_(per_group(lin.offsets))
    return w.view(n, groups * gs)[:, :k].to(dtype)


def dequantize_original_order(lin: PackedLinear, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [N, K] with columns in the model's input order (act-order permutation undone)."""
    w = dequantize(lin, dtype)
    if lin.perm is None:
        return w
    out = torch.empty_like(w)
    out[:, lin.perm.long()] = w
    return out


# Weights dequantized on a CPU this many elements at a time: one block's float32 values (4 MB) stay
# in the caches between dequantizing and multiplying, where a whole float W would go out to memory and
# back (Llama-3.2-1B's 8-bit lm_head on two cores: 2.4 s -> 0.09 s a token).
CPU_BLOCK_ELEMENTS = 1 << 20


def linear(x: torch.Tensor, lin: PackedLinear) -> torch.Tensor:
    """y = x @ W.T + bias, dequantizing on every call (the reference for the GEMV/GEMM kernels); on a
    CPU a block of W's rows at a time, on a GPU all at once (fewer launches)."""
    if lin.perm is not None:
        x = x.index_select(-1, lin.perm.to(x.device).long())
    n = lin.out_features
    step = n if x.is_cuda else max(1, CPU_BLOCK_ELEMENTS // lin.in_features)
    bias = None if lin.bias is None else lin.bias.to(x.dtype)
    blocks = [torch.nn.functional.linear(x, dequantize(lin, x.dtype, slice(r, r + step)),
                                         None if bias is None else bias[r:r + step])
              for r in range(0, n, step)]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as HF Llama computes it: in fp32, cast back, then scale."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """[M, 2F] -> silu(gate) * up [M, F]."""
    g, u = gate_up.float().chunk(2, dim=-1)
    return torch.nn.functional.silu(g) * u


def merge_splits(o: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Flash-decoding's partial outputs o [S, H, hd] merged by their log-sum-exps lse [S, H] -> [H * hd];
    an empty split (lse -inf) weighs 0, whatever its o holds."""
    w = torch.softmax(lse.float(), dim=0)[..., None]
    return torch.where(w > 0, o.float() * w, 0.0).sum(0).reshape(-1)


def quantize_kv_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-vector (last dim) int8 quantization: scale = max|x| / 127, codes round(x / scale)."""
    scale = x.float().abs().amax(-1).clamp(min=1e-8) / 127.0
    codes = torch.floor(x.float() / scale[..., None] + 0.5).to(torch.int8)
    return codes, scale


def rope_rotate_half(x: torch.Tensor, cos_half: torch.Tensor, sin_half: torch.Tensor) -> torch.Tensor:
    """x [..., hd] with cos/sin [..., hd/2] (broadcastable): (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos_half - x2 * sin_half, x2 * cos_half + x1 * sin_half), dim=-1)


def attention_over_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """q [M, H, hd] at positions start.. over k, v [KV, S, hd] (dequantized) -> [M, H * hd], fp32, causal."""
    m, h, hd = q.shape
    kv = k.shape[0]
    end = start + m
    keys = k[:, :end].float().repeat_interleave(h // kv, dim=0)       # [H, end, hd]
    values = v[:, :end].float().repeat_interleave(h // kv, dim=0)
    scores = torch.einsum("mhd,hsd->hms", q.float(), keys) * hd ** -0.5
    visible = torch.arange(end, device=q.device)[None, :] <= (start + torch.arange(m, device=q.device))[:, None]
    scores = scores.masked_fill(~visible[None], float("-inf"))
    out = torch.einsum("hms,hsd->mhd", scores.softmax(-1), values)
    return out.reshape(m, h * hd)
