"""The in-memory checkpoint every converter and quantizer produces and `qruntime.format` saves.

A `QuantizedCheckpoint` is the normalized config, one `PackedLinear` per linear layer, the dense
tensors (embeddings, norms), the tokenizer files and the generation config. The engine never
knows which format a weight came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from .config import ModelConfig
from .errors import MissingTensorError, ShapeMismatchError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def effective_group_size(group_size: int, in_features: int) -> int:
    """group_size -1 means one group per output row (per-channel)."""
    return in_features if group_size == -1 else group_size


def num_groups(group_size: int, in_features: int) -> int:
    g = effective_group_size(group_size, in_features)
    return -(-in_features // g)


@dataclass
class PackedLinear:
    """One linear layer's weight, y = x @ W.T + bias, with W [out_features, in_features].

    bits 16: `qweight` is W itself (fp16/bf16/fp32) and every quantization field is None.
    bits 4:  `qweight` int32 [N, ceil(K / 8)], packed along K, code of column k in bits
             4*(k % 8) .. 4*(k % 8)+3 of word k // 8 (low nibble first); padding codes are 0.
    bits 8:  `qweight` uint8 [N, K].
    Codes q are unsigned in [0, 2^bits). Group g covers columns [g*gs, (g+1)*gs) (the last
    group may be shorter). The dequantized weight, by zero mode:
      symmetric: W = scales * (q - 2^(bits-1))
      int:       W = scales * (q - zeros)       zeros uint8 [N, G], integer zero points
      float:     W = scales * q + offsets       offsets [N, G] (GGUF-style mins)
    `perm` int32 [K] (act-order): stored column j holds input feature perm[j], so
    y = W_stored @ x[perm].
    """

    in_features: int
    out_features: int
    bits: int
    group_size: int
    qweight: torch.Tensor
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    perm: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def zero_mode(self) -> str:
        if self.bits == 16:
            return "none"
        if self.zeros is not None:
            return "int"
        if self.offsets is not None:
            return "float"
        return "symmetric"

    @property
    def num_groups(self) -> int:
        return num_groups(self.group_size, self.in_features)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by suffix, as written to disk (`<name>.<suffix>`)."""
        out = {"weight" if self.bits == 16 else "qweight": self.qweight}
        for key in ("scales", "zeros", "offsets", "perm", "bias"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def validate(self, name: str) -> None:
        """Raises ShapeMismatchError naming the tensor when fields disagree with each other."""
        n, k = self.out_features, self.in_features

        def expect(field_name: str, tensor: torch.Tensor | None, shape: tuple[int, ...], dtypes) -> None:
            if tensor is None:
                raise MissingTensorError(f"{name}.{field_name}: required for bits={self.bits}, missing")
            if tuple(tensor.shape) != shape:
                raise ShapeMismatchError(
                    f"{name}.{field_name}: shape {tuple(tensor.shape)}, expected {shape} "
                    f"(in_features={k}, out_features={n}, bits={self.bits}, group_size={self.group_size})"
                )
            if tensor.dtype not in dtypes:
                raise ShapeMismatchError(f"{name}.{field_name}: dtype {tensor.dtype}, expected one of {dtypes}")

        if self.bits == 16:
            expect("weight", self.qweight, (n, k), FLOAT_DTYPES)
            for extra in ("scales", "zeros", "offsets", "perm"):
                if getattr(self, extra) is not None:
                    raise ShapeMismatchError(f"{name}.{extra}: present on a 16-bit weight")
        elif self.bits in (4, 8):
            if self.group_size != -1 and self.group_size <= 0:
                raise ShapeMismatchError(f"{name}: group_size={self.group_size} must be positive or -1")
            g = self.num_groups
            if self.bits == 4:
                expect("qweight", self.qweight, (n, -(-k // 8)), (torch.int32,))
            else:
                expect("qweight", self.qweight, (n, k), (torch.uint8,))
            expect("scales", self.scales, (n, g), FLOAT_DTYPES)
            if self.zeros is not None and self.offsets is not None:
                raise ShapeMismatchError(f"{name}: has both integer zeros and float offsets")
            if self.zeros is not None:
                expect("zeros", self.zeros, (n, g), (torch.uint8,))
            if self.offsets is not None:
                expect("offsets", self.offsets, (n, g), FLOAT_DTYPES)
            if self.perm is not None:
                expect("perm", self.perm, (k,), (torch.int32,))
        else:
            raise ShapeMismatchError(f"{name}: bits={self.bits}; supported: 4, 8, 16")
        if self.bias is not None:
            expect("bias", self.bias, (n,), FLOAT_DTYPES)


@dataclass
class QuantizedCheckpoint:
    """Everything a model directory holds, in memory."""

    config: ModelConfig
    linears: dict[str, PackedLinear]
    dense: dict[str, torch.Tensor]
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)
    generation_config: dict[str, Any] | None = None
    source: dict[str, Any] = field(default_factory=dict)  # {"format": ..., "method": ..., "files": {name: sha256}}

    def validate(self) -> None:
        """Checks every tensor the config requires is present with the right shape."""
        for name, shape in expected_linear_shapes(self.config, "lm_head" in self.linears):
            if name not in self.linears:
                raise MissingTensorError(f"linear {name!r} is missing from the checkpoint")
            lin = self.linears[name]
            if (lin.out_features, lin.in_features) != shape:
                raise ShapeMismatchError(
                    f"{name}: weight is [{lin.out_features}, {lin.in_features}], the config expects {list(shape)}"
                )
            lin.validate(name)
            if lin.bias is None and expects_bias(self.config, name):
                raise MissingTensorError(f"{name}.bias: missing, but the config says this layer has a bias")
            if lin.bias is not None and not expects_bias(self.config, name):
                raise ShapeMismatchError(f"{name}.bias: present, but the config says this layer has no bias")
        for name, shape in expected_dense_shapes(self.config):
            if name not in self.dense:
                raise MissingTensorError(f"tensor {name!r} is missing from the checkpoint")
            if tuple(self.dense[name].shape) != shape:
                raise ShapeMismatchError(
                    f"{name}: shape {list(self.dense[name].shape)}, the config expects {list(shape)}"
                )

    def weight_bytes(self) -> int:
        return sum(l.nbytes() for l in self.linears.values()) + sum(
            t.numel() * t.element_size() for t in self.dense.values()
        )


# --- the canonical tensor names, shared by converters (what to produce) and validation ---

LAYER_LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)


def _linear_shape(cfg: ModelConfig, short: str) -> tuple[int, int]:
    d, f = cfg.hidden_size, cfg.intermediate_size
    return {
        "self_attn.q_proj": (cfg.q_size, d),
        "self_attn.k_proj": (cfg.kv_size, d),
        "self_attn.v_proj": (cfg.kv_size, d),
        "self_attn.o_proj": (d, cfg.q_size),
        "mlp.gate_proj": (f, d),
        "mlp.up_proj": (f, d),
        "mlp.down_proj": (d, f),
    }[short]


def expects_bias(cfg: ModelConfig, name: str) -> bool:
    if name == "lm_head":
        return False
    short = name.split(".", 3)[3]
    if short in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return cfg.qkv_bias
    if short == "self_attn.o_proj":
        return cfg.o_bias
    return cfg.mlp_bias


def expected_linear_shapes(cfg: ModelConfig, has_lm_head: bool) -> Iterator[tuple[str, tuple[int, int]]]:
    """(name, (out_features, in_features)) of every linear. lm_head is required unless tied."""
    for i in range(cfg.num_layers):
        for short in LAYER_LINEARS:
            yield f"model.layers.{i}.{short}", _linear_shape(cfg, short)
    if has_lm_head or not cfg.tie_word_embeddings:
        yield "lm_head", (cfg.vocab_size, cfg.hidden_size)


def expected_dense_shapes(cfg: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    yield "model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size)
    yield "model.norm.weight", (cfg.hidden_size,)
    for i in range(cfg.num_layers):
        yield f"model.layers.{i}.input_layernorm.weight", (cfg.hidden_size,)
        yield f"model.layers.{i}.post_attention_layernorm.weight", (cfg.hidden_size,)
        if cfg.qk_norm:
            yield f"model.layers.{i}.self_attn.q_norm.weight", (cfg.head_dim,)
            yield f"model.layers.{i}.self_attn.k_norm.weight", (cfg.head_dim,)
