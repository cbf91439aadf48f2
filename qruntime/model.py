"""The decoder, defined once for Llama, Qwen2 and Qwen3 (they differ only by ModelConfig flags).

    tokens -> embed -> N x [x + attn(norm(x)); x + mlp(norm(x))] -> norm -> lm_head -> logits

`build_model` assembles it from a QuantizedCheckpoint; every linear is a QuantLinear computed by
the backend chosen at load.
"""

from __future__ import annotations

import torch
from torch import nn

from qruntime.backends import Backend
from qruntime.checkpoint import PackedLinear, QuantizedCheckpoint
from qruntime.config import ModelConfig
from qruntime.engine.kv_cache import KVCache
from qruntime.layers import MLP, Attention, QuantLinear, RMSNorm, RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, self_attn: Attention, mlp: MLP, input_layernorm: RMSNorm, post_attention_layernorm: RMSNorm) -> None:
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm, self.post_attention_layernorm = input_layernorm, post_attention_layernorm

    def forward(self, x, cos, sin, k_cache, v_cache, start: int) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, start)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, embed_tokens: nn.Embedding, layers: list[DecoderLayer],
                 norm: RMSNorm, lm_head: QuantLinear, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens, self.layers, self.norm, self.lm_head = embed_tokens, nn.ModuleList(layers), norm, lm_head
        self.rotary = rotary

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, start: int, last_only: bool = False) -> torch.Tensor:
        # tokens: [B, T] at positions start..start+T-1 -> logits [B, T or 1, vocab] (float32)
        t = tokens.shape[1]
        cos, sin = self.rotary(torch.arange(start, start + t, device=tokens.device))
        x = self.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.k[i], cache.v[i], start)
        if last_only:  # prefill: only the last position's logits are needed
            x = x[:, -1:]
        return self.lm_head(self.norm(x)).float()


def build_model(ckpt: QuantizedCheckpoint, backend: Backend, device: torch.device, dtype: torch.dtype,
                max_seq_len: int) -> Transformer:
    cfg = ckpt.config
    ckpt.validate()

    def dense(name: str) -> torch.Tensor:
        return ckpt.dense[name].to(device=device, dtype=dtype)

    def linear(name: str) -> QuantLinear:
        return QuantLinear(ckpt.linears[name], backend, device, dtype)

    def norm(name: str) -> RMSNorm:
        return RMSNorm(dense(name), cfg.rms_norm_eps)

    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        attn = Attention(
            cfg,
            linear(f"{p}.self_attn.q_proj"), linear(f"{p}.self_attn.k_proj"),
            linear(f"{p}.self_attn.v_proj"), linear(f"{p}.self_attn.o_proj"),
            q_norm=norm(f"{p}.self_attn.q_norm.weight") if cfg.qk_norm else None,
            k_norm=norm(f"{p}.self_attn.k_norm.weight") if cfg.qk_norm else None,
        )
        mlp = MLP(linear(f"{p}.mlp.gate_proj"), linear(f"{p}.mlp.up_proj"), linear(f"{p}.mlp.down_proj"))
        layers.append(DecoderLayer(attn, mlp, norm(f"{p}.input_layernorm.weight"), norm(f"{p}.post_attention_layernorm.weight")))

    embed_weight = dense("model.embed_tokens.weight")
    embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=embed_weight, _freeze=True, device=device, dtype=dtype)
    if "lm_head" in ckpt.linears:
        lm_head = linear("lm_head")
    else:  # tied and unquantized: share the embedding tensor (no second copy)
        lm_head = QuantLinear(PackedLinear(cfg.hidden_size, cfg.vocab_size, 16, -1, embed_weight), backend, device, dtype)
    rotary = RotaryEmbedding(cfg, max_seq_len, device, dtype=torch.float32)
    return Transformer(cfg, embed, layers, norm("model.norm.weight"), lm_head, rotary)
