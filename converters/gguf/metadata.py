"""GGUF metadata -> ModelConfig, tensor names -> HF names, and the required-tensor check.

Keys read (`{arch}` is `general.architecture`; llama.cpp `src/llama-arch.cpp`):
    {arch}.context_length, .embedding_length, .block_count, .feed_forward_length,
    .attention.head_count, .attention.head_count_kv, .attention.layer_norm_rms_epsilon,
    .attention.key_length / .value_length (head_dim), .rope.freq_base, .rope.dimension_count,
    .rope.scaling.type / .rope.scaling.factor.
Llama-3 rope scaling is not in the keys: llama.cpp's converter bakes it into an F32
`rope_freqs.weight` tensor of per-frequency divisors, which we carry as-is (RopeScaling type
"frequency_factors"), so the engine rotates exactly as llama.cpp does.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from qruntime.checkpoint import expected_dense_shapes, expected_linear_shapes, expects_bias
from qruntime.config import ModelConfig, RopeScaling
from qruntime.errors import CorruptFileError, MissingTensorError, ShapeMismatchError, UnsupportedArchitectureError

from .reader import GGUFFile

ARCHITECTURES = ("llama", "qwen2", "qwen3")
# llama.cpp permutes the rows of llama-arch attn_q / attn_k for its interleaved RoPE; qwen2/3 use
# NEOX RoPE (HF's rotate_half) and are stored unpermuted.
PERMUTED_ARCHS = ("llama",)

# HF name suffix (qruntime's canonical names) <-> GGUF per-layer tensor name
LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
}
GLOBAL_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
ROPE_FREQS = "rope_freqs.weight"


def gguf_name(hf_name: str) -> str:
    """`model.layers.3.mlp.up_proj.weight` -> `blk.3.ffn_up.weight` (and `.bias`)."""
    base, _, suffix = hf_name.rpartition(".")
    if base.startswith("model.layers."):
        _, _, i, short = base.split(".", 3)
        return f"blk.{i}.{LAYER_TENSORS[short]}.{suffix}"
    return f"{GLOBAL_TENSORS[base]}.{suffix}"


def _key(f: GGUFFile, key: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    value = f.get(key, default)
    if value is None:
        raise CorruptFileError(f"{f.source}: metadata key {key!r} is missing; the file is not a complete "
                               "llama.cpp model")
    if isinstance(value, np.ndarray) and value.size and int in kinds:  # per-layer arrays (all equal only)
        if (value != value.flat[0]).any():
            raise UnsupportedArchitectureError(f"{f.source}: {key} differs between layers ({value.tolist()[:8]}...); "
                                               "per-layer head counts are not supported")
        value = value.flat[0].item()
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
        raise CorruptFileError(f"{f.source}: metadata {key!r} has type {f.metadata_types.get(key)}, "
                               f"expected {'/'.join(k.__name__ for k in kinds)}")
    return value


def _count(f: GGUFFile, key: str, default: int | None = None, upper: int = 1 << 24) -> int:
    value = _key(f, key, (int,), default)
    if not 1 <= value <= upper:
        raise CorruptFileError(f"{f.source}: metadata {key} = {value} is outside 1..{upper}")
    return int(value)


def _real(f: GGUFFile, key: str, default: float) -> float:
    value = float(_key(f, key, (int, float), default))
    if not math.isfinite(value) or value <= 0:
        raise CorruptFileError(f"{f.source}: metadata {key} = {value} must be a positive finite number")
    return value


def architecture(f: GGUFFile) -> str:
    arch = f.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitectureError(f"{f.source}: architecture {arch!r} is not supported; supported: "
                                           f"{', '.join(ARCHITECTURES)}")
    return arch


def _rope_scaling(f: GGUFFile, arch: str, head_dim: int) -> RopeScaling | None:
    kind = f.get(f"{arch}.rope.scaling.type", "none")
    factor = float(_key(f, f"{arch}.rope.scaling.factor", (int, float), 1.0))
    if kind not in ("none", "linear"):
        raise UnsupportedArchitectureError(f"{f.source}: rope scaling {kind!r} is not supported (none, linear, "
                                           "and llama3 via rope_freqs are)")
    freqs = f.tensors.get(ROPE_FREQS)
    if freqs is None:
        return RopeScaling("linear", factor=factor) if kind == "linear" and factor != 1.0 else None
    if arch not in PERMUTED_ARCHS or kind == "linear":
        raise UnsupportedArchitectureError(f"{f.source}: rope_freqs.weight on a {arch} model"
                                           f"{' with linear scaling' if kind == 'linear' else ''} is not supported")
    if freqs.shape != (head_dim // 2,) or freqs.type_name != "F32":
        raise ShapeMismatchError(f"{f.source}: {ROPE_FREQS} is {freqs.type_name} {list(freqs.shape)}, expected "
                                 f"F32 [{head_dim // 2}] (head_dim / 2)")
    factors = f.tensor_bytes(ROPE_FREQS).view("<f4").astype(float).tolist()
    if not all(math.isfinite(x) and x > 0 for x in factors):
        raise CorruptFileError(f"{f.source}: {ROPE_FREQS} holds non-positive or non-finite factors")
    return RopeScaling("frequency_factors", factors=factors)


def model_config(f: GGUFFile, bos_token_id: int | None = None, eos_token_ids: list[int] | None = None) -> ModelConfig:
    """The normalized config of a llama/qwen2/qwen3 GGUF (shapes are checked by `check_tensors`)."""
    arch = architecture(f)
    a = arch + "."
    hidden = _count(f, a + "embedding_length")
    heads = _count(f, a + "attention.head_count")
    kv_heads = _count(f, a + "attention.head_count_kv", heads)
    if heads % kv_heads:
        raise CorruptFileError(f"{f.source}: head_count {heads} is not a multiple of head_count_kv {kv_heads}")
    head_dim = _count(f, a + "attention.key_length", hidden // heads or None)
    if _count(f, a + "attention.value_length", head_dim) != head_dim:
        raise UnsupportedArchitectureError(f"{f.source}: attention.value_length differs from key_length")
    if _count(f, a + "rope.dimension_count", head_dim) != head_dim:
        raise UnsupportedArchitectureError(f"{f.source}: partial rotary (rope.dimension_count < head_dim) "
                                           "is not supported")
    n_layers = _count(f, a + "block_count", upper=max(len(f.tensors), 1))
    embd = f.tensors.get("token_embd.weight")
    if embd is None or len(embd.shape) != 2:
        raise MissingTensorError(f"{f.source}: token_embd.weight is missing or not 2-D")
    vocab = embd.shape[1]
    tokens = f.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) != vocab:
        raise ShapeMismatchError(f"{f.source}: {len(tokens)} tokenizer tokens but token_embd has {vocab} rows")
    has = f.tensors.__contains__
    return ModelConfig(
        family=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_count(f, a + "feed_forward_length"),
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_real(f, a + "attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=_real(f, a + "rope.freq_base", 10000.0),
        max_position_embeddings=_count(f, a + "context_length", upper=1 << 31),
        rope_scaling=_rope_scaling(f, arch, head_dim),
        qkv_bias=has("blk.0.attn_q.bias"),
        o_bias=has("blk.0.attn_output.bias"),
        mlp_bias=has("blk.0.ffn_up.bias"),
        qk_norm=has("blk.0.attn_q_norm.weight"),
        tie_word_embeddings=not has("output.weight"),
        torch_dtype="bfloat16" if embd.type_name == "BF16" else "float16",
        bos_token_id=bos_token_id,
        eos_token_ids=list(eos_token_ids or []),
    )


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF name -> (HF name, GGUF shape ne0-first) of every tensor the config implies."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for hf, (n, k) in expected_linear_shapes(cfg, has_lm_head=not cfg.tie_word_embeddings):
        out[gguf_name(hf + ".weight")] = (hf + ".weight", (k, n))
        if expects_bias(cfg, hf):
            out[gguf_name(hf + ".bias")] = (hf + ".bias", (n,))
    for hf, shape in expected_dense_shapes(cfg):
        out[gguf_name(hf)] = (hf, tuple(reversed(shape)))
    return out


def check_tensors(f: GGUFFile, cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every required tensor present with its shape, and no tensor we would silently ignore."""
    expected = expected_tensors(cfg)
    for name, (_, shape) in expected.items():
        info = f.tensors.get(name)
        if info is None:
            raise MissingTensorError(f"{f.source}: tensor {name!r} is missing (the metadata describes "
                                     f"{cfg.num_layers} {cfg.family} layers)")
        if info.shape != shape:
            raise ShapeMismatchError(f"{f.source}: tensor {name!r} has ne {list(info.shape)}, the metadata "
                                     f"implies {list(shape)}")
    unknown = sorted(set(f.tensors) - set(expected) - {ROPE_FREQS})
    if unknown:
        raise UnsupportedArchitectureError(
            f"{f.source}: tensors {unknown[:6]}{'...' if len(unknown) > 6 else ''} are not part of a "
            f"{cfg.family} model with this metadata; refusing to ignore them"
        )
    return expected


def unpermute_rows(arch: str, hf_name: str, cfg: ModelConfig) -> np.ndarray | None:
    """Row order that undoes llama.cpp's Q/K permutation, or None when the tensor is not permuted.

    llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`) stores
    `w.reshape(n_head, 2, hd/2, ...).swapaxes(1, 2)`: within each head, GGUF row 2i + j holds HF
    row j*hd/2 + i (the two rotation halves interleaved). So HF row j*hd/2 + i = GGUF row 2i + j.
    """
    if arch not in PERMUTED_ARCHS:
        return None
    if ".self_attn.q_proj." in hf_name:
        n_head = cfg.num_heads
    elif ".self_attn.k_proj." in hf_name:
        n_head = cfg.num_kv_heads
    else:
        return None
    half = cfg.head_dim // 2
    gguf_row = np.arange(n_head * cfg.head_dim).reshape(n_head, half, 2)  # [head, i, j] -> 2i + j
    return gguf_row.transpose(0, 2, 1).reshape(-1)  # HF order [head, j, i]
