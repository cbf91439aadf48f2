"""GGUF test fixtures: tiny HF checkpoints written to F32/F16 GGUF with the `gguf` writer, then
quantized by llama.cpp itself (`llama_cpp.llama_model_quantize`).

The writer mirrors what llama.cpp's `convert_hf_to_gguf.py` does for these architectures (read
there, not copied): metadata keys, tensor names, the Q/K row permutation of llama-arch attention
(`LlamaModel.permute`), llama3 rope scaling baked into `rope_freqs.weight`
(`LlamaModel.generate_extra_tensors`), and the tokenizer as `tokenizer.ggml.*` keys.
"""

from __future__ import annotations

import ctypes
import json
import math
from pathlib import Path

import numpy as np
import pytest

# llama.cpp file types the acceptance list names (llama_ftype names)
QUANT_FILE_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K")

# HF tensor name suffix -> GGUF name (the converter's own table is what is under test; this one
# is written out independently from llama.cpp's tensor names)
_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
}


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp `convert_hf_to_gguf.py` `LlamaModel.permute`: interleave each head's two rotation
    halves (rows), for llama.cpp's pairwise RoPE. Works on weights [N, K] and biases [N]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg) -> np.ndarray:
    """Per-frequency divisors as `LlamaModel.generate_extra_tensors` writes them to rope_freqs
    (`cfg` a qruntime ModelConfig with llama3 rope scaling)."""
    rs, head_dim = cfg.rope_scaling, cfg.head_dim
    freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, lo, hi, old = rs.factor, rs.low_freq_factor, rs.high_freq_factor, rs.original_max_position_embeddings
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _gguf_name(hf: str) -> str:
    base, _, suffix = hf.rpartition(".")
    if base.startswith("model.layers."):
        _, _, i, short = base.split(".", 3)
        return f"blk.{i}.{_LAYER[short]}.{suffix}"
    return {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}[base] + "." + suffix


def _add_tokenizer(w, src: Path, pre: str, add_bos: bool) -> None:
    """The tiny byte-level BPE tokenizer of qruntime.demo as tokenizer.ggml.* keys."""
    import gguf

    tok = json.loads((src / "tokenizer.json").read_text())
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    specials = {}
    for added in tok["added_tokens"]:
        vocab[added["content"]] = added["id"]
        if added["special"]:
            specials[added["id"]] = added["content"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == len(vocab) == max(vocab.values()) + 1
    types = [gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<s>"])
    w.add_eos_token_id(vocab["</s>"])
    w.add_unk_token_id(vocab["<unk>"])
    w.add_add_bos_token(add_bos)
    w.add_chat_template(tok_cfg["chat_template"] if "chat_template" in tok_cfg else
                        (src / "chat_template.jinja").read_text())


def write_gguf(src: Path, out: Path, dtype: str = "F32", pre: str = "gpt-2", add_bos: bool = False,
               override: dict[str, np.ndarray] | None = None) -> Path:
    """HF checkpoint dir `src` (tiny llama/qwen2/qwen3) -> a GGUF file of F32, F16 or BF16 weights.
    `override`: GGUF name -> F32 array already in GGUF layout, written instead of the HF tensor."""
    import gguf
    from safetensors.numpy import load_file

    from qruntime.config import from_hf

    cfg = from_hf(json.loads((src / "config.json").read_text()))  # reads v4 and v5 HF layouts
    arch, heads, kv_heads, head_dim = cfg.family, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                     "BF16": gguf.LlamaFileType.MOSTLY_BF16}[dtype])
    _add_tokenizer(w, src, pre, add_bos)

    tensors = load_file(str(src / "model.safetensors"))
    if arch == "llama" and cfg.rope_scaling is not None and cfg.rope_scaling.type == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg))
    for name, t in tensors.items():
        t = t.astype(np.float32)
        if arch == "llama" and ".self_attn.q_proj." in name:
            t = llama_permute(t, heads)
        elif arch == "llama" and ".self_attn.k_proj." in name:
            t = llama_permute(t, kv_heads)
        if override is not None:
            t = override[_gguf_name(name)]
        # like llama.cpp's converter: 1-D tensors (norms, biases) stay F32
        if dtype == "BF16" and t.ndim == 2:  # gguf-py rounds to bf16 as ggml does; written as raw words
            bf16 = gguf.GGMLQuantizationType.BF16
            w.add_tensor(_gguf_name(name), gguf.quants.quantize(t, bf16), raw_dtype=bf16)
        else:
            w.add_tensor(_gguf_name(name), t.astype(np.float16) if dtype == "F16" and t.ndim == 2 else t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def quantize(src: Path, out: Path, file_type: str) -> Path:
    """llama.cpp's own quantizer (llama-quantize) on `src`. The output name must not start with a
    digit: llama-quantize would read it as a numeric file type."""
    import llama_cpp

    assert not out.name[0].isdigit(), out
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type}")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize({file_type}) failed with {rc}"
    return out


def dequantized_copy(quantized: Path, src: Path, out: Path, **write_options) -> Path:
    """`quantized` with every tensor dequantized to F32 by gguf-py (same metadata as `src`'s
    GGUF): llama.cpp runs it without quantizing activations, so comparing llama.cpp on both files
    measures llama.cpp's own activation-quantization noise."""
    import gguf

    reader = gguf.GGUFReader(str(quantized))
    weights = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
               for t in reader.tensors}
    return write_gguf(src, out, "F32", override=weights, **write_options)


# ------------------------------------------------------------------ the session fixture

_SIZES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
# name -> (demo variant, size overrides, tokenizer pre-type, add BOS).
#   llama:  k-quant-sized rows (256), llama3 rope scaling (rope_freqs), tied embeddings
#   llama2: no rope scaling, separate output.weight (transformers' GGUF loader ignores rope_freqs,
#           so the comparison with it uses this one)
#   qwen2:  hidden 320 (not a multiple of 256: llama.cpp falls back to Q5_0/Q5_1/Q8_0), qkv biases;
#           ffn 768 keeps k-quants on ffn_down
#   qwen3:  q/k norms, tied embeddings
GGUF_MODELS = {
    "llama": ("llama", _SIZES, "llama-bpe", True),
    "llama2": ("llama2", _SIZES, "llama-bpe", True),
    "qwen2": ("qwen2", dict(_SIZES, hidden_size=320, intermediate_size=768, num_attention_heads=5,
                            num_key_value_heads=1), "qwen2", False),
    "qwen3": ("qwen3", _SIZES, "qwen2", False),
}


def _build_tiny_model(*args, **kwargs):
    from qruntime.demo import build_tiny_model

    return build_tiny_model(*args, **kwargs)


class GGUFZoo:
    """Lazily built files: hf(model), file(model, type) with type F32, F16 or a llama.cpp file type,
    and dequantized(model, type) (every tensor dequantized to F32 by gguf-py)."""

    def __init__(self, root: Path) -> None:
        self.root, self._cache = root, {}

    def _once(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def hf(self, model: str) -> Path:
        variant, sizes, _, _ = GGUF_MODELS[model]
        return self._once(("hf", model), lambda: _build_tiny_model(self.root / f"hf-{model}", variant, **sizes))

    def _write_options(self, model: str) -> dict:
        _, _, pre, add_bos = GGUF_MODELS[model]
        return dict(pre=pre, add_bos=add_bos)

    def file(self, model: str, ftype: str) -> Path:
        def make() -> Path:
            out = self.root / f"tiny-{model}-{ftype}.gguf"
            if ftype in ("F32", "F16", "BF16"):
                return write_gguf(self.hf(model), out, ftype, **self._write_options(model))
            return quantize(self.file(model, "F32"), out, ftype)
        return self._once(("file", model, ftype), make)

    def dequantized(self, model: str, ftype: str) -> Path:
        return self._once(("deq", model, ftype), lambda: dequantized_copy(
            self.file(model, ftype), self.hf(model), self.root / f"deq-{model}-{ftype}.gguf",
            **self._write_options(model)))


@pytest.fixture(scope="session")
def gguf_zoo(tmp_path_factory) -> GGUFZoo:
    return GGUFZoo(tmp_path_factory.mktemp("gguf"))
