"""HF config mapping (transformers v4 and v5 layouts) and sharded checkpoints."""

import json

import pytest
import torch

import qruntime
import tiny_models
from qruntime.config import from_hf
from qruntime.errors import UnsupportedArchitectureError


def test_v4_style_llama3_config_maps_rope_scaling():
    cfg = from_hf({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "eos_token_id": [128001, 128008, 128009],
        "torch_dtype": "bfloat16",
    })
    assert cfg.family == "llama" and cfg.head_dim == 128 and cfg.rope_theta == 500000.0
    assert cfg.rope_scaling.type == "llama3" and cfg.rope_scaling.original_max_position_embeddings == 8192
    assert cfg.eos_token_ids == [128001, 128008, 128009] and cfg.torch_dtype == "bfloat16"


def test_qwen2_flags():
    cfg = from_hf({"architectures": ["Qwen2ForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                   "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1})
    assert cfg.qkv_bias and not cfg.o_bias and not cfg.qk_norm


def test_sliding_window_refused():
    with pytest.raises(UnsupportedArchitectureError, match="sliding"):
        from_hf({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "vocab_size": 10, "hidden_size": 8,
                 "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2})


def test_v4_config_file_and_sharded_checkpoint_load(tiny_model_dir, tmp_path):
    """A sharded checkpoint with an index json, and a config.json written in the v4 style."""
    src = tiny_model_dir("llama")
    hf = tiny_models.hf_model(src)
    out = tmp_path / "sharded"
    hf.save_pretrained(out, max_shard_size="60KB")
    assert (out / "model.safetensors.index.json").is_file()
    cfg = json.loads((out / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    (out / "config.json").write_text(json.dumps(cfg))
    ids = list(range(5, 40))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (qruntime.load(out).logits(ids) - ref).abs().max() < 1e-4
