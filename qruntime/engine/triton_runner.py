"""The fast engine: the same decoder as `qruntime.model`, scheduled as Triton kernels over static
buffers, with the whole decode step captured in one CUDA graph.

Decode step (one token, all buffers static, positions and lengths in device memory):

    h (fp32 residual) = embed[token]                     (with layer 0's RMSNorm: kernels.rmsnorm.embed_rmsnorm)
    per layer:  qkv += (h * w_in) @ Wqkv.T; ss += h.h    (kernels.gemv_packed / gemv_dense, split-K atomics, fused q|k|v;
                                                          the RMSNorm deferred: below)
                q, cache[pos] = rope(r qkv)              (in flash_decode: r = rsqrt(ss / D + eps), then
                                                          norm, rotate, int8-quantize)
                attn = flash_decode(q, cache[:pos+1])    (kernels.flash_decode: splits over the cache)
                h += attn @ Wo.T                         (atomics straight into the residual stream; the
                                                          GEMV merges the splits itself and zeroes
                                                          qkv, ss and gu, read by now)
                gu += (h * w_post) @ Wgu.T; ss2 += h.h   (fused gate|up, its norm deferred likewise)
                h += (silu(r2 g) * r2 u) @ Wd.T          (formed in the GEMV; else kernels.swiglu first)
    logits = rmsnorm(h) @ lm_head.T; token = argmax     (kernels.argmax: greedy stays on the device)
    sampled decoding: token = a draw from the logits     (kernels.sampling, a second graph: top-k / top-p
                                                          thresholds by search, Gumbel-max, no sort)

An RMSNorm is linear in its scale r, so the GEMV after it multiplies h by the norm's weight only
and sums h^2 as it reads h, and the kernel reading that GEMV's output applies r: no norm launch
(8B w4 -1%, 1B w4 -6% per token on an H200). A q|k|v bias (Qwen2) is left to flash-decoding too,
added after r. Where that cannot be (gate|up with a bias, or q|k|v or gate|up not one linear of
one format), the step launches kernels.rmsnorm first. 16-bit linears take the same path through
kernels.gemv_dense (8B bf16 shapes on an H200: 1.3-2x cuBLAS and its add, which also cost two
launches more a linear).

The split-K matmuls accumulate in fp32 with atomics, so their outputs must start at zero: the
consumer of each accumulator zeroes it after reading (the gate|up one, read by every program of
the fused down_proj GEMV, by the next layer's o_proj; the logits by layer 0's o_proj), and the
residual stream is itself the accumulator of o_proj and down_proj ("h += ..." costs no extra pass). Prefill runs the same kernels
eagerly on M rows (whole-K matmuls, causal flash attention over the cache).

A head_dim that is not a power of two (OpenLLaMA 3B: 100) runs with padded heads
(attention_head_dim, pad_heads): q|k|v, the cache and the RoPE tables in heads of the next power
of two, the attention's output packed back to the model's head_dim for o_proj (kernels.rope).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

import torch

from qruntime.checkpoint import PackedLinear, QuantizedCheckpoint
from qruntime.config import ModelConfig
from qruntime.engine.kv_cache import padded_head_dim
from qruntime.kernels.argmax import greedy_advance, greedy_workspace
from qruntime.kernels.flash_decode import RopeInput, flash_decode, flash_decode_splits
from qruntime.kernels.gemv_dense import (DenseLinear, dense_accumulate, dense_accumulate_attention,
                                         dense_accumulate_deferred_norm, dense_accumulate_swiglu)
from qruntime.kernels.layout import concat_out_features, prepare
from qruntime.kernels.prefill_attention import prefill_attention
from qruntime.kernels.gemv_packed import (packed_gemv_serves, qmatmul_accumulate_attention,
                                          qmatmul_accumulate_deferred_norm, qmatmul_accumulate_swiglu)
from qruntime.kernels.qmatmul import qmatmul, qmatmul_accumulate
from qruntime.kernels.rmsnorm import DeferredNorm, embed_rmsnorm, rmsnorm
from qruntime.kernels.rope import padded_head_slots, rope_qkv_to_cache
from qruntime.kernels.sampling import SamplingPlan, SamplingWorkspace, reseed, sample_token, sampling_workspace
from qruntime.kernels.swiglu import swiglu
from qruntime.layers.rotary import inv_frequencies


class RunnerLinear:
    """One linear for the runner: packed (Triton kernels), or 16-bit (the decode row through
    kernels.gemv_dense, so that it joins the step's chain of launches and forms its own input as a
    packed linear does; several rows through cuBLAS)."""

    def __init__(self, packed: PackedLinear, device: torch.device, dtype: torch.dtype) -> None:
        self.bits = packed.bits
        self.out_features = packed.out_features
        if packed.bits == 16:
            self.weight = packed.qweight.to(device=device, dtype=dtype)
            self.bias = None if packed.bias is None else packed.bias.to(device=device, dtype=dtype)
            self.triton = None
            self.dense = DenseLinear(self.weight, self.bias)
        else:
            self.triton = prepare(packed, device, dtype)
            self.triton.in_decode_step = True  # tiles chosen by the step's end-to-end time (kernels.tuning)
            self.bias = self.triton.bias
            self.dense = None

    def accumulate(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out (fp32) += x @ W.T (+ bias); x has at most 16 rows."""
        if self.triton is not None:
            qmatmul_accumulate(x, self.triton, out)
        elif x.shape[0] == 1:
            dense_accumulate(x, self.dense, out)
        else:
            out.add_(torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias))

    def forms_own_input(self) -> bool:
        """Whether accumulate_swiglu, accumulate_attention and accumulate_deferred_norm serve this
        linear (a packed or a 16-bit decode GEMV)."""
        return self.dense is not None or packed_gemv_serves(self.triton)

    def accumulate_deferred_norm(self, h: torch.Tensor, norm_weight: torch.Tensor, out: torch.Tensor,
                                 norm: DeferredNorm, bias_to_reader: bool = False) -> None:
        """out (fp32) += (h * norm_weight) @ W.T, the RMSNorm's scale (and with bias_to_reader, the
        bias) left to out's reader; adds sum(h^2) to norm.sum_squares."""
        if self.dense is not None:
            dense_accumulate_deferred_norm(h, norm_weight, self.dense, out, norm, bias_to_reader=bias_to_reader)
        else:
            qmatmul_accumulate_deferred_norm(h, norm_weight, self.triton, out, norm, bias_to_reader=bias_to_reader)

    def accumulate_swiglu(self, gate_up: torch.Tensor, out: torch.Tensor, norm: DeferredNorm | None = None) -> None:
        """out (fp32) += (silu(gate) * up) @ W.T for one row of the fp32 gate|up accumulator (first
        scaled by the deferred norm of its input, if given)."""
        if self.dense is not None:
            dense_accumulate_swiglu(gate_up, self.dense, out, norm=norm)
        else:
            qmatmul_accumulate_swiglu(gate_up, self.triton, out, norm=norm)

    def accumulate_attention(self, splits: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor,
                             clear: torch.Tensor) -> None:
        """out (fp32) += attn @ W.T, attn merged from flash-decoding's splits; zeroes `clear`."""
        if self.dense is not None:
            dense_accumulate_attention(splits, self.dense, out, clear=clear)
        else:
            qmatmul_accumulate_attention(splits, self.triton, out, clear=clear)

    def matmul(self, x: torch.Tensor, residual: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W.T (+ bias) (+ residual), written to `out` when given."""
        if self.triton is not None:
            return qmatmul(x, self.triton, residual=residual, out=out)
        y = torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias)
        if residual is not None:
            y = residual + y
        if out is None:
            return y
        out.copy_(y)
        return out

    def nbytes(self) -> int:
        if self.triton is not None:
            return self.triton.nbytes()
        return self.weight.numel() * self.weight.element_size() + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())


def _fused(lins: list[PackedLinear]) -> list[PackedLinear]:
    """The linears stacked into one when their formats agree (one launch), else as they are."""
    try:
        return [concat_out_features(lins)]
    except ValueError:
        return lins


def pad_heads(lin: PackedLinear, heads: int, head_dim: int, padded: int) -> PackedLinear:
    """q_proj, k_proj or v_proj with its `heads` heads of head_dim outputs laid out in heads of
    `padded` (kernels.rope.padded_head_slots), the other outputs zero (zero codes, scales and bias):
    the attention kernels' layout for a head_dim that is not a power of two."""
    if padded == head_dim:
        return lin
    rows = (torch.arange(heads)[:, None] * padded + padded_head_slots(head_dim, padded)[None, :]).reshape(-1)

    def spread(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        out = t.new_zeros((heads * padded, *t.shape[1:]))
        out[rows.to(t.device)] = t
        return out
    return dataclasses.replace(lin, out_features=heads * padded, qweight=spread(lin.qweight), scales=spread(lin.scales),
                               zeros=spread(lin.zeros), offsets=spread(lin.offsets), bias=spread(lin.bias))


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: list[RunnerLinear]       # one fused linear, or q, k, v when their formats differ
    o: RunnerLinear
    gate_up: list[RunnerLinear]
    down: RunnerLinear
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None


# flash-decoding tiles of the decode step: at the benchmark's few hundred positions each split holds
# one block, so the launch is a chain of dependent loads; 64 positions and 8 warps gave 8B w4
# 1.672 ms/token against 1.752 with 128 and 4 (H200, same run; benchmarks/results/h200/fd_decode_tiles.log).
# Two pipeline stages, not Triton's three: three take 72 KB of shared memory a program, and an SM
# running flash-decoding's two programs in that shared-memory configuration takes none of the GEMVs
# around it until they leave (8B w4 1.394 -> 1.354 ms/token at 128 positions, equal at 8k; setting
# every kernel's carveout to 72% instead gave the same: ab_fd_stages.log)
# The step's flash-decoding has the heads as the MMA's columns (kernels._common.attend_loaded_heads_last:
# 1B w4 0.377 -> 0.361 ms/token, 8B at 8k positions 1.726 -> 1.702, 8B at 128 equal). With an int8
# cache it wants 4 warps: 8B w4 1.361 -> 1.328 ms/token at 128 positions, 1.957 -> 1.692 at 8k; fp16
# keeps 8 (8k: 1.721 with 4; ab_fd_heads_last.log).
DECODE_ATTENTION_BLOCK = 64
DECODE_ATTENTION_WARPS = 8
DECODE_ATTENTION_WARPS_INT8 = 4
DECODE_ATTENTION_STAGES = 2
# Prompts longer than this prefill in pieces (TritonRunner.prefill): one piece's activations at
# Llama-3.1-8B's widths are ~0.3 GB (gate|up alone 2048 x 28672 fp16 is 0.12 GB), inside the
# workspace that qruntime.memory reserves beside the weights and the cache; a 32k prompt at once
# would need ~4.5 GB. A piece of 2048 rows keeps the prefill GEMMs' tiles full.
PREFILL_CHUNK = 2048


def attention_head_dim(cfg: ModelConfig, device: torch.device) -> int:
    """The head size of the runner's cache and attention kernels: they lay a head out as one
    power-of-two range (tl.arange), and on a GPU multiply on tensor cores, which take 16 columns.
    Every Llama / Qwen release has head_dim 64 or 128; a few Llama-architecture models do not
    (OpenLLaMA 3B: 100), and run with padded heads (pad_heads, kernels.rope)."""
    return padded_head_dim(cfg.head_dim, 16 if device.type == "cuda" else 1)


def unsupported_reason(cfg: ModelConfig, device: torch.device) -> str | None:
    """Why this backend cannot run the model, or None: per-head q/k norms (Qwen3) over padded heads
    (attention_head_dim), which would average over the padding; no release has them."""
    hd = cfg.head_dim
    if cfg.qk_norm and attention_head_dim(cfg, device) != hd:
        return (f"its q/k norms need head_dim to be a power of two{' of 16 or more' if hd < 16 else ''}, "
                f"and this model's is {hd}")
    return None


class TritonRunner:
    def __init__(self, ckpt: QuantizedCheckpoint, device: torch.device, dtype: torch.dtype, max_seq_len: int,
                 kv_cache_dtype: str = "auto", num_splits: int = 32, consume: bool = False) -> None:
        """consume=True empties `ckpt.linears` layer by layer as the weights are re-laid, so peak
        memory stays near one copy of the model (fusing q|k|v and gate|up copies them)."""
        # On a CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, tests only) and
        # the decode step runs eagerly instead of as a CUDA graph.
        self.use_graph = device.type == "cuda"
        cfg: ModelConfig = ckpt.config
        self.cfg, self.device, self.dtype, self.max_seq_len = cfg, device, dtype, max_seq_len
        self.num_splits = num_splits
        self.prefill_chunk = PREFILL_CHUNK  # tokens a prefill piece (tests set it small)
        self.head_dim = attention_head_dim(cfg, device)  # the model's, or padded (pad_heads)

        def dense(name: str) -> torch.Tensor:
            return ckpt.dense[name].to(device=device, dtype=dtype)

        def linears(packed: list[PackedLinear]) -> list[RunnerLinear]:
            return [RunnerLinear(p, device, dtype) for p in packed]

        def attention_inputs(p: str) -> list[PackedLinear]:
            heads = {"q": cfg.num_heads, "k": cfg.num_kv_heads, "v": cfg.num_kv_heads}
            return [pad_heads(ckpt.linears[f"{p}.self_attn.{x}_proj"], heads[x], cfg.head_dim, self.head_dim)
                    for x in "qkv"]

        self.layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}"
            self.layers.append(LayerWeights(
                input_norm=dense(f"{p}.input_layernorm.weight"),
                post_norm=dense(f"{p}.post_attention_layernorm.weight"),
                qkv=linears(_fused(attention_inputs(p))),
                o=RunnerLinear(ckpt.linears[f"{p}.self_attn.o_proj"], device, dtype),
                gate_up=linears(_fused([ckpt.linears[f"{p}.mlp.{x}_proj"] for x in ("gate", "up")])),
                down=RunnerLinear(ckpt.linears[f"{p}.mlp.down_proj"], device, dtype),
                q_norm=dense(f"{p}.self_attn.q_norm.weight") if cfg.qk_norm else None,
                k_norm=dense(f"{p}.self_attn.k_norm.weight") if cfg.qk_norm else None,
            ))
            if consume:
                for name in [n for n in ckpt.linears if n.startswith(f"{p}.")]:
                    del ckpt.linears[name]
        self.embed = dense("model.embed_tokens.weight")
        self.final_norm = dense("model.norm.weight")
        if "lm_head" in ckpt.linears:
            self.lm_head = RunnerLinear(ckpt.linears["lm_head"], device, dtype)
        else:  # tied, 16-bit: share the embedding
            self.lm_head = RunnerLinear(PackedLinear(cfg.hidden_size, cfg.vocab_size, 16, -1, self.embed), device, dtype)

        freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_frequencies(cfg)).to(device)
        pad = (self.head_dim - cfg.head_dim) // 2  # padded heads: the padding rotates by 0
        self.cos = torch.nn.functional.pad(freqs.cos(), (0, pad), value=1.0).contiguous()
        self.sin = torch.nn.functional.pad(freqs.sin(), (0, pad), value=0.0).contiguous()

        int8 = kv_cache_dtype == "int8"
        if kv_cache_dtype not in ("auto", "int8", "fp16", "bf16"):
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r}; choose auto, fp16, bf16 or int8")
        cache_dtype = torch.int8 if int8 else dtype
        shape = (cfg.num_layers, cfg.num_kv_heads, max_seq_len, self.head_dim)
        self.k_cache = torch.zeros(shape, device=device, dtype=cache_dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=cache_dtype)
        self.k_scale = torch.zeros(shape[:3], device=device, dtype=torch.float32) if int8 else None
        self.v_scale = torch.zeros(shape[:3], device=device, dtype=torch.float32) if int8 else None
        # down_proj forms silu(gate) * up itself when every layer's can (one launch fewer per
        # layer); whoever zeroes the q|k|v accumulator after flash-decoding then zeroes the gate|up
        # one too, in place of the swiglu kernel. Likewise o_proj merges flash-decoding's splits
        # itself when every layer's can (no combine launch) and does that zeroing.
        # Neither in fp32 mode, which exists to match the reference without fp16 activations, nor
        # the merge over padded heads (o_proj reads heads of its own K / H columns).
        self.fused_swiglu = dtype != torch.float32 and all(lw.down.forms_own_input() for lw in self.layers)
        self.fused_merge = dtype != torch.float32 and self.head_dim == cfg.head_dim and \
            all(lw.o.forms_own_input() for lw in self.layers)
        # The RMSNorms inside the layers cost no launch when the GEMV after them (one fused linear)
        # multiplies h by the norm's weight and sums h^2 as it reads it, and the kernel reading that
        # GEMV's output applies the scale: flash-decoding for q|k|v (and adds q|k|v's bias after it),
        # down_proj (which forms silu(gate) * up itself) for gate|up (which must have no bias).
        def defers(lins: list[RunnerLinear]) -> bool:
            return dtype != torch.float32 and len(lins) == 1 and lins[0].forms_own_input()
        self.defer_attention_norm = all(defers(lw.qkv) for lw in self.layers)
        self.defer_mlp_norm = self.fused_swiglu and all(defers(lw.gate_up) and lw.gate_up[0].bias is None
                                                        for lw in self.layers)
        self._allocate_decode_buffers()
        self.input_norms = [DeferredNorm(self.sum_squares[i, 0:1], cfg.hidden_size, cfg.rms_norm_eps)
                            for i in range(cfg.num_layers)]
        self.post_norms = [DeferredNorm(self.sum_squares[i, 1:2], cfg.hidden_size, cfg.rms_norm_eps)
                           for i in range(cfg.num_layers)]
        self.rope_inputs = self.build_rope_inputs()
        self.graph: torch.cuda.CUDAGraph | None = None
        # sampled decoding (kernels.sampling): its workspace, the seen-token mask the repetition
        # penalty reads, and a graph of the draw per plan (all made at the first sampled generate)
        self.sampling: SamplingWorkspace | None = None
        self.seen: torch.Tensor | None = None
        self.draw_graphs: dict[SamplingPlan, torch.cuda.CUDAGraph] = {}

    def build_rope_inputs(self) -> list[RopeInput]:
        """Each layer's RopeInput for flash-decoding, with the deferred input norm and the q|k|v bias
        when defer_attention_norm (rebuild after changing it, then recapture)."""
        defer = self.defer_attention_norm
        return [RopeInput(self.qkv_acc, self.cos, self.sin, lw.q_norm, lw.k_norm, self.cfg.rms_norm_eps,
                          input_norm=self.input_norms[i] if defer else None,
                          qkv_bias=lw.qkv[0].bias if defer else None)
                for i, lw in enumerate(self.layers)]

    # ------------------------------------------------------------------ buffers
    def _allocate_decode_buffers(self) -> None:
        cfg, dev = self.cfg, self.device
        f32 = dict(device=dev, dtype=torch.float32)
        # the matmul inputs are fp16 whatever the model dtype: the packed GEMVs take fp16 rows, and
        # the tensor-core paths convert to fp16 anyway
        # (an fp32 model keeps fp32 inputs: that mode exists to compare against the reference)
        act = dict(device=dev, dtype=torch.float32 if self.dtype == torch.float32 else torch.float16)
        qkv_width = (cfg.num_heads + 2 * cfg.num_kv_heads) * self.head_dim
        self.token = torch.zeros(1, device=dev, dtype=torch.long)
        self.pos = torch.zeros(1, device=dev, dtype=torch.int32)       # position of `token`
        self.seq_len = torch.ones(1, device=dev, dtype=torch.int32)    # pos + 1
        self.h = torch.zeros((1, cfg.hidden_size), **f32)
        self.xn = torch.zeros((1, cfg.hidden_size), **act)
        # The split-K accumulators: the logits (lm_head's), q|k|v, the deferred norms' sums of
        # squares (two per layer) and gate|up, side by side so one pass zeroes them. Layer 0's
        # zeroing (after its flash-decoding) takes the logits too: the step's previous ones have
        # been read (argmax, or the host's sampler between steps), and lm_head's GEMV then needs no
        # zeroing launch before it, which would break the chain of PDL launches there. Every
        # layer's zeroing takes all the sums: each is zeroed after its reader and before its next
        # accumulation, whichever layer zeroes.
        v, sums = cfg.vocab_size, 2 * cfg.num_layers
        self.step_accumulators = torch.zeros(v + qkv_width + sums + 2 * cfg.intermediate_size, **f32)
        self.logits = self.step_accumulators[:v].view(1, v)
        self.accumulators = self.step_accumulators[v:]
        self.qkv_acc = self.accumulators[:qkv_width].view(1, qkv_width)
        self.sum_squares = self.accumulators[qkv_width:qkv_width + sums].view(cfg.num_layers, 2)
        # the attention output, for an o_proj that cannot merge flash-decoding's splits itself
        self.attn = None if self.fused_merge else torch.zeros((1, cfg.num_heads * cfg.head_dim), **act)
        self.gu_acc = self.accumulators[qkv_width + sums:].view(1, 2 * cfg.intermediate_size)
        # silu(gate) * up for a down_proj that cannot form it itself (fused_swiglu: none is needed)
        self.act = None if self.fused_swiglu else torch.zeros((1, cfg.intermediate_size), **act)
        self.greedy_ws = greedy_workspace(dev)  # argmax key and finish counter; the kernel resets them
        self.workspace = (torch.empty((self.num_splits, cfg.num_heads, self.head_dim), **f32),
                          torch.empty((self.num_splits, cfg.num_heads), **f32))

    def cache_nbytes(self) -> int:
        total = 2 * self.k_cache.numel() * self.k_cache.element_size()
        if self.k_scale is not None:
            total += 2 * self.k_scale.numel() * 4
        return total

    def weight_nbytes(self) -> int:
        lin = sum(l.nbytes() for layer in self.layers for l in (*layer.qkv, layer.o, *layer.gate_up, layer.down))
        tied = self.lm_head.triton is None and self.lm_head.weight is self.embed
        lin += 0 if tied else self.lm_head.nbytes()
        return lin

    # ----------------------------------------------------------------- pieces
    def _qkv_to_cache(self, layer_idx: int, qkv: torch.Tensor, positions: torch.Tensor, q_out: torch.Tensor) -> None:
        cfg, lw = self.cfg, self.layers[layer_idx]
        rope_qkv_to_cache(
            qkv, positions, self.cos, self.sin, q_out, self.k_cache[layer_idx], self.v_cache[layer_idx],
            cfg.num_heads, cfg.num_kv_heads, self.head_dim, q_norm=lw.q_norm, k_norm=lw.k_norm, eps=cfg.rms_norm_eps,
            k_scale=None if self.k_scale is None else self.k_scale[layer_idx],
            v_scale=None if self.v_scale is None else self.v_scale[layer_idx],
        )

    def _scales(self, i: int) -> dict:
        if self.k_scale is None:
            return {}
        return dict(k_scale=self.k_scale[i], v_scale=self.v_scale[i])

    # ------------------------------------------------------------------ decode
    def _decode_step(self) -> None:
        cfg = self.cfg
        # what the merge of flash-decoding's splits zeroes (below): the accumulators read by then,
        # gate|up too when down_proj reads it; in layer 0 the logits, which sit before them, too
        last = self.step_accumulators.numel() if self.fused_swiglu else self.gu_acc.storage_offset()
        clears = (self.step_accumulators[:last], self.step_accumulators[self.logits.numel():last])
        for i, lw in enumerate(self.layers):
            if i == 0:  # h = embed[token] and its RMSNorm, one launch
                embed_rmsnorm(self.embed, self.token, lw.input_norm, cfg.rms_norm_eps, rows=self.h, out=self.xn)
            if self.defer_attention_norm:  # flash-decoding applies the norm's scale
                lw.qkv[0].accumulate_deferred_norm(self.h, lw.input_norm, self.qkv_acc, self.input_norms[i],
                                                   bias_to_reader=True)
            else:
                if i > 0:
                    rmsnorm(self.h, lw.input_norm, cfg.rms_norm_eps, out=self.xn)
                self._accumulate_split(lw.qkv, self.xn, self.qkv_acc)
            # RoPE of q and the new k, the cache write and the attention in one launch; the merge
            # of its splits (by o_proj, or by flash-decoding's second launch) zeroes `clear`
            clear = clears[0 if i == 0 else 1]
            warps = DECODE_ATTENTION_WARPS_INT8 if self.k_cache[i].dtype == torch.int8 else DECODE_ATTENTION_WARPS
            attention = dict(rope=self.rope_inputs[i], num_splits=self.num_splits, block_s=DECODE_ATTENTION_BLOCK,
                             num_warps=warps, num_stages=DECODE_ATTENTION_STAGES, head_dim=cfg.head_dim,
                             workspace=self.workspace, **self._scales(i))
            if self.fused_merge:
                splits = flash_decode_splits(None, self.k_cache[i], self.v_cache[i], self.seq_len, **attention)
                lw.o.accumulate_attention(splits, self.h, clear)
            else:
                flash_decode(None, self.k_cache[i], self.v_cache[i], self.seq_len, self.attn[0], clear=clear, **attention)
                lw.o.accumulate(self.attn, self.h)
            if self.defer_mlp_norm:  # down_proj applies the norm's scale
                lw.gate_up[0].accumulate_deferred_norm(self.h, lw.post_norm, self.gu_acc, self.post_norms[i])
                lw.down.accumulate_swiglu(self.gu_acc, self.h, self.post_norms[i])
            else:
                rmsnorm(self.h, lw.post_norm, cfg.rms_norm_eps, out=self.xn)
                self._accumulate_split(lw.gate_up, self.xn, self.gu_acc)
                if self.fused_swiglu:
                    lw.down.accumulate_swiglu(self.gu_acc, self.h)
                else:
                    swiglu(self.gu_acc, out=self.act, zero_input=True)
                    lw.down.accumulate(self.act, self.h)
        rmsnorm(self.h, self.final_norm, cfg.rms_norm_eps, out=self.xn)
        self.lm_head.accumulate(self.xn, self.logits)  # zeroed in layer 0

    @staticmethod
    def _accumulate_split(lins: list[RunnerLinear], x: torch.Tensor, out: torch.Tensor) -> None:
        col = 0
        for lin in lins:
            lin.accumulate(x, out[:, col:col + lin.out_features] if len(lins) > 1 else out)
            col += lin.out_features

    def _advance(self) -> None:
        # token = argmax(logits) (first index, like torch.argmax), pos += 1, seq_len += 1: one launch
        greedy_advance(self.logits, self.token, self.pos, self.seq_len, self.greedy_ws)

    def step(self) -> None:
        """One greedy decode step: the CUDA graph's replay, or the same work eagerly on a CPU."""
        if not self.use_graph:
            self._decode_step()
            self._advance()
            return
        if self.graph is None:
            self.capture()
        self.graph.replay()

    def capture(self) -> None:
        """Captures one greedy decode step (step + argmax + position update) in a CUDA graph.

        The warm-up runs the real next step (token/pos already set), so the cache position it
        writes is the one the first replay rewrites with the same values."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        saved = (self.token.clone(), self.pos.clone(), self.seq_len.clone())
        with torch.cuda.stream(stream):  # warm-up compiles every kernel outside the capture
            self._decode_step()
            self._advance()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._decode_step()
            self._advance()
        # the warm-up and capture wrote one cache position; the next real step rewrites it
        self.token.copy_(saved[0]); self.pos.copy_(saved[1]); self.seq_len.copy_(saved[2])

    # ------------------------------------------------------------------ sampling
    def _start_sampling(self, seed: int, seen_ids: torch.Tensor | None) -> None:
        """Draws from step 0 of Philox `seed`; the seen mask holds `seen_ids` (a penalty's prompt)."""
        vocab = self.cfg.vocab_size
        if self.sampling is None:
            self.sampling = sampling_workspace(vocab, self.device)
            self.seen = torch.zeros(vocab, device=self.device, dtype=torch.bool)
        reseed(self.sampling, seed)
        if seen_ids is not None:
            self.seen.zero_()
            self.seen[seen_ids] = True

    def _draw(self, plan: SamplingPlan, eager: bool = False) -> None:
        """self.token = a draw from self.logits under `plan` (marked in self.seen for a penalty):
        the plan's CUDA graph, captured at its first replay, or eagerly (first token, CPU)."""
        seen = self.seen if plan.penalized else None
        if eager or not self.use_graph:
            sample_token(self.logits[0], self.token, self.sampling, plan, seen)
            return
        graph = self.draw_graphs.get(plan)
        if graph is None:  # the eager first draw compiled every kernel of the chain
            graph = self.draw_graphs[plan] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                sample_token(self.logits[0], self.token, self.sampling, plan, seen)
        graph.replay()

    # ------------------------------------------------------------------ prefill
    def prefill(self, ids: torch.Tensor, start: int = 0, all_logits: bool = False) -> torch.Tensor:
        """Runs tokens `ids` [M] at positions start..; returns logits [M or 1, vocab] (fp32).
        A prompt longer than prefill_chunk runs in pieces of that many tokens, each attending to
        the cache the pieces before it wrote, so that the activations (what memory.WORKSPACE_BYTES
        reserves room for) are one piece's whatever the prompt's length."""
        m = ids.numel()
        if m == 0:
            raise ValueError("prefill: no tokens")
        if start + m > self.max_seq_len:
            raise ValueError(f"prefill: {start + m} positions exceed the cache ({self.max_seq_len})")
        step = self.prefill_chunk
        pieces = [self._prefill_piece(ids[i:i + step], start + i,
                                      "all" if all_logits else "last" if i + step >= m else None)
                  for i in range(0, m, step)]
        return torch.cat(pieces) if all_logits and len(pieces) > 1 else pieces[-1]

    def _prefill_piece(self, ids: torch.Tensor, start: int, logit_rows: str | None) -> torch.Tensor | None:
        """prefill's work on one piece; returns the logits of its rows ("all"), of its last row
        ("last"), or None (no lm_head: a piece before the prompt's last)."""
        cfg = self.cfg
        m = ids.numel()
        positions = torch.arange(start, start + m, device=self.device, dtype=torch.int32)
        h = self.embed.index_select(0, ids).float()
        q = torch.empty((m, cfg.num_heads, self.head_dim), device=self.device, dtype=self.dtype)
        for i, lw in enumerate(self.layers):
            xn = rmsnorm(h, lw.input_norm, cfg.rms_norm_eps, out_dtype=self.dtype)
            qkv = torch.cat([lin.matmul(xn) for lin in lw.qkv], dim=1) if len(lw.qkv) > 1 else lw.qkv[0].matmul(xn)
            self._qkv_to_cache(i, qkv, positions, q)
            attn = prefill_attention(q, self.k_cache[i], self.v_cache[i], start, head_dim=cfg.head_dim, **self._scales(i))
            lw.o.matmul(attn, residual=h, out=h)
            xn = rmsnorm(h, lw.post_norm, cfg.rms_norm_eps, out_dtype=self.dtype)
            gu = torch.cat([lin.matmul(xn) for lin in lw.gate_up], dim=1) if len(lw.gate_up) > 1 else lw.gate_up[0].matmul(xn)
            act = swiglu(gu)
            lw.down.matmul(act, residual=h, out=h)
        if logit_rows is None:
            return None
        rows = h if logit_rows == "all" else h[-1:]
        xn = rmsnorm(rows.contiguous(), self.final_norm, cfg.rms_norm_eps, out_dtype=self.dtype)
        return self.lm_head.matmul(xn, out=torch.empty((xn.shape[0], cfg.vocab_size), device=self.device, dtype=torch.float32))

    # ---------------------------------------------------------------- generate
    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampler=None, eos_ids: set[int] = frozenset(),
                 sync_every: int = 8) -> Iterator[int]:
        """Yields new tokens, replaying the graph without a host sync per token: tokens are read back
        every `sync_every` steps (EOS is checked then; work past an EOS is discarded). Plain greedy
        decoding (sampler None, or greedy without a repetition penalty) takes the step's own argmax;
        otherwise kernels.sampling draws from the step's logits after each replay (a second graph),
        keyed by the sampler's seed, so that one seed gives the same tokens every time."""
        ids = torch.tensor(prompt_ids, device=self.device, dtype=torch.long)
        logits = self.prefill(ids)[0]
        plan = None if sampler is None else SamplingPlan.from_params(sampler.params, logits.numel())
        if plan is not None and not (plan.noise or plan.penalized):
            plan = None  # plain greedy: the step's own argmax
        if plan is not None:
            self._start_sampling(sampler.generator.initial_seed(), ids if plan.penalized else None)
            self.logits[0].copy_(logits)  # the buffer the graphs read (the next step zeroes it)
            self._draw(plan, eager=True)  # also compiles the draw's kernels before any capture
            first = int(self.token)
        else:
            first = int(torch.argmax(logits))
        yield first
        if first in eos_ids or max_new_tokens == 1:
            return
        self.token.fill_(first)
        self.pos.fill_(len(prompt_ids))
        self.seq_len.fill_(len(prompt_ids) + 1)
        produced = 1
        buffer = torch.empty(sync_every, device=self.device, dtype=torch.long)
        while produced < max_new_tokens:
            n = min(sync_every, max_new_tokens - produced)
            for j in range(n):
                self.step()  # decode, argmax into self.token, advance
                if plan is not None:  # the argmax replaced by the drawn token, before the next step reads it
                    self._draw(plan)
                buffer[j:j + 1].copy_(self.token)
            for token in buffer[:n].tolist():
                produced += 1
                yield token
                if token in eos_ids:
                    return
