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


# ----------------------------------------------------------------------------- sampling
# The reference for kernels.sampling: transformers' filters by a sort, and the same Philox noise.

_MASK32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * b for uint32 values held in int64 (in 16-bit halves: the
    64-bit product would overflow int64)."""
    a_hi, a_lo, b_hi, b_lo = a >> 16, a & 0xFFFF, b >> 16, b & 0xFFFF
    low = a_lo * b_lo
    cross = a_hi * b_lo + a_lo * b_hi + (low >> 16)
    return a_hi * b_hi + (cross >> 16), ((cross << 16) | (low & 0xFFFF)) & _MASK32


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Triton's tl.rand(seed, offsets) for int64 offsets, bit for bit: Philox-4x32-10 keyed by the
    seed's two words, counter (offset low word, offset high word, 0, 0); the first output word as
    int32, negatives complemented, times 4.6566127342e-10 in fp32 (triton.language.random)."""
    c0, c1 = offsets & _MASK32, (offsets >> 32) & _MASK32
    c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul32(c2, 0xCD9E8D57)
        hi_a, lo_a = _mul32(c0, 0xD2511F53)
        c0, c2, c1, c3 = hi_b ^ c1 ^ k0, hi_a ^ c3 ^ k1, lo_b, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    x = torch.where(c0 >= 2 ** 31, c0 - 2 ** 32, c0)  # the int32 bit pattern
    x = torch.where(x < 0, -x - 1, x)                   # ~x
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor on the `seen` mask: seen logits < 0 times the
    penalty, the others over it."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def sampling_scaled_logits(logits: torch.Tensor, plan, seen: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 logits with transformers' repetition penalty on the `seen` mask, times 1 / temperature
    (kernels.sampling's l)."""
    x = logits.float()
    if plan.penalized:
        x = repetition_penalty(x, seen, plan.repetition_penalty)
    return x * torch.tensor(1.0 / plan.temperature if plan.noise else 1.0, dtype=torch.float32)


def sampling_threshold(scaled: torch.Tensor, plan) -> float:
    """The smallest kept value after top-k then top-p, by transformers' rule on a sort (float64
    sums): top-k keeps values >= the k-th largest; top-p then keeps, in descending order, every
    token before the first whose mass with its predecessors reaches top_p of the kept mass."""
    x = scaled.double()
    threshold = -float("inf")
    if plan.top_k:
        threshold = torch.topk(x, plan.top_k).values[-1].item()
    if plan.top_p < 1.0:
        kept = torch.sort(x[x >= threshold], descending=True).values
        mass = torch.exp(kept - kept[0]).cumsum(0)
        first = int((mass < plan.top_p * mass[-1]).sum())  # predecessors' mass below the target
        threshold = kept[min(first, kept.numel() - 1)].item()
    return threshold


def sample_token(logits: torch.Tensor, plan, seed: int, step: int, seen: torch.Tensor | None = None) -> int:
    """kernels.sampling.sample_token's draw number `step` under Philox `seed`: argmax over the kept
    tokens of l - log(-log(U)) (the first index among equal scores); plain argmax when greedy."""
    x = sampling_scaled_logits(logits, plan, seen)
    keep = x.double() >= sampling_threshold(x, plan)
    if plan.noise:
        u = philox_uniform(seed, step * x.numel() + torch.arange(x.numel(), dtype=torch.int64))
        x = x - torch.log(-torch.log(u))
    return int(torch.argmax(torch.where(keep, x, torch.tensor(-float("inf")))))
