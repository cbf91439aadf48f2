"""GGUF metadata pieces on their own: the rope `frequency_factors` type, Q/K un-permutation, and
the packed round trip of a converted GGUF (config with factors survives save/load)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from gguf_fixtures import llama3_rope_factors, llama_permute

from qruntime import format as packed_format
from qruntime.config import ModelConfig, RopeScaling
from qruntime.converters.gguf import convert
from qruntime.converters.gguf.metadata import unpermute_rows
from qruntime.errors import UnsupportedArchitectureError
from qruntime.layers.rotary import inv_frequencies
from qruntime.runtime import Model

BASE = ModelConfig(family="llama", vocab_size=16, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                   num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=500000.0, max_position_embeddings=64)


def test_frequency_factors_reproduce_llama3_scaling():
    """llama.cpp's converter turns llama3 parameters into per-frequency divisors; dividing by them
    gives transformers' llama3 frequencies (to float32 rounding)."""
    llama3 = dataclasses.replace(BASE, rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0,
                                                                 high_freq_factor=4.0, original_max_position_embeddings=32))
    factors = llama3_rope_factors(llama3).tolist()
    as_factors = dataclasses.replace(BASE, rope_scaling=RopeScaling("frequency_factors", factors=factors))
    torch.testing.assert_close(inv_frequencies(as_factors), inv_frequencies(llama3), rtol=1e-6, atol=0)
    assert ModelConfig.from_dict(as_factors.to_dict()) == as_factors


@pytest.mark.parametrize("scaling", [RopeScaling("frequency_factors", factors=[1.0] * 7),
                                     RopeScaling("frequency_factors", factors=[1.0] * 7 + [0.0]),
                                     RopeScaling("frequency_factors"), RopeScaling("llama3", factors=[1.0] * 8)],
                         ids=["too-few", "zero", "missing", "on-llama3"])
def test_frequency_factors_are_validated(scaling):
    with pytest.raises(UnsupportedArchitectureError):
        dataclasses.replace(BASE, rope_scaling=scaling)


@pytest.mark.parametrize("heads,head_dim", [(1, 2), (4, 16), (2, 64)], ids=["tiny", "gqa", "wide"])
def test_unpermute_rows_inverts_llama_cpp_permutation(heads, head_dim):
    cfg = dataclasses.replace(BASE, num_heads=heads, num_kv_heads=1, head_dim=head_dim, hidden_size=heads * head_dim)
    w = np.arange(heads * head_dim * 3, dtype=np.float32).reshape(heads * head_dim, 3)
    rows = unpermute_rows("llama", "model.layers.0.self_attn.q_proj.weight", cfg)
    assert np.array_equal(llama_permute(w, heads)[rows], w)
    assert unpermute_rows("qwen2", "model.layers.0.self_attn.q_proj.weight", cfg) is None
    assert unpermute_rows("llama", "model.layers.0.self_attn.v_proj.weight", cfg) is None


def test_packed_round_trip_keeps_codes_and_rope_factors(gguf_zoo, tmp_path):
    ckpt = convert(gguf_zoo.file("llama", "Q4_K_M"), progress=False)
    assert ckpt.config.rope_scaling.type == "frequency_factors"
    (tmp_path / "packed").mkdir()
    packed_format.save(ckpt, tmp_path / "packed")
    loaded = packed_format.load(tmp_path / "packed")
    assert loaded.config == ckpt.config
    for name, lin in ckpt.linears.items():
        for key, t in lin.tensors().items():
            assert torch.equal(getattr(loaded.linears[name], "qweight" if key == "weight" else key), t), (name, key)
    ids = list(range(5, 21))
    torch.testing.assert_close(Model(loaded, device="cpu").logits(ids), Model(ckpt, device="cpu").logits(ids))


def test_tokenizer_builder_refuses_transformers_before_5_18(monkeypatch):
    """transformers up to 5.17 keeps its GGUF tokenizer builder in integrations.ggml, and the
    tokenizers it builds split some texts differently from llama.cpp: the GPU machine's 5.17 failed
    GGUF conversion with a bare ImportError. Now a typed error names the version needed."""
    import sys
    import types

    from qruntime.converters.gguf import tokenizer
    from qruntime.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "transformers.integrations.gguf",
                        types.ModuleType("transformers.integrations.gguf"))  # 5.17: no convert_gguf_tokenizer
    with pytest.raises(MissingDependencyError, match=r"transformers >= 5\.18"):
        tokenizer.transformers_gguf_tokenizer()
