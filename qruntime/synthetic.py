"""Random-weight checkpoints with the exact shapes of real models, built directly on a device.

`synthetic:llama3.1-8b` and friends let benchmarks run offline: decode speed depends on the bytes
read, not on trained values. Quantized linears get random codes and realistic scales (no RTN pass,
so an 8B model is ready in seconds).
"""

from __future__ import annotations

import torch

from qruntime.checkpoint import PackedLinear, QuantizedCheckpoint, expected_dense_shapes, expected_linear_shapes, expects_bias
from qruntime.config import ModelConfig, RopeScaling
from qruntime.errors import InvalidOptionError
from qruntime.quantizers.packing import pack

_LLAMA3_ROPE = RopeScaling(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=8192)


def _model(family: dict, vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
           head_dim: int = 128, **rest) -> dict:
    return dict(family, vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_layers=layers,
                num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, **rest)


# what a family's releases share
_LLAMA3 = dict(family="llama", rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
               rope_scaling=_LLAMA3_ROPE, torch_dtype="bfloat16")
_LLAMA32 = dict(_LLAMA3, rope_scaling=RopeScaling(**{**_LLAMA3_ROPE.__dict__, "factor": 32.0}), tie_word_embeddings=True)
_LLAMA2 = dict(family="llama", rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096, torch_dtype="float16")
_QWEN25 = dict(family="qwen2", rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768, qkv_bias=True,
               torch_dtype="bfloat16")
_QWEN3 = dict(family="qwen3", rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960, qk_norm=True,
              torch_dtype="bfloat16")

# name: (family, vocabulary, hidden, intermediate, layers, query heads, KV heads[, head_dim], ...)
PRESETS: dict[str, dict] = {
    "llama3.1-8b": _model(_LLAMA3, 128256, 4096, 14336, 32, 32, 8),
    "llama3.2-1b": _model(_LLAMA32, 128256, 2048, 8192, 16, 32, 8, head_dim=64),
    "qwen2.5-7b": _model(_QWEN25, 152064, 3584, 18944, 28, 28, 4),
    # shapes the tuned tables never measured (kernels.tuning.splitk_config chooses their tiles)
    "llama3.2-3b": _model(_LLAMA32, 128256, 3072, 8192, 28, 24, 8),
    "llama2-7b": _model(_LLAMA2, 32000, 4096, 11008, 32, 32, 32),
    "qwen2.5-0.5b": _model(_QWEN25, 151936, 896, 4864, 24, 14, 2, head_dim=64, tie_word_embeddings=True),
    "qwen2.5-1.5b": _model(_QWEN25, 151936, 1536, 8960, 28, 12, 2, tie_word_embeddings=True),
    "qwen2.5-3b": _model(_QWEN25, 151936, 2048, 11008, 36, 16, 2, tie_word_embeddings=True),
    "qwen2.5-14b": _model(_QWEN25, 152064, 5120, 13824, 48, 40, 8, rms_norm_eps=1e-5),
    "qwen3-4b": _model(_QWEN3, 151936, 2560, 9728, 36, 32, 8, tie_word_embeddings=True),
    "qwen3-8b": _model(_QWEN3, 151936, 4096, 12288, 36, 32, 8),
    # head_dim 100: the triton backend pads its heads to 128 (triton_runner.pad_heads)
    "openllama-3b": _model(dict(_LLAMA2, rms_norm_eps=1e-6, max_position_embeddings=2048), 32000, 3200, 8640, 26, 32, 32,
                           head_dim=100),
}


def parse_spec(spec: str) -> str:
    name = spec.split(":", 1)[1] if spec.startswith("synthetic:") else spec
    if name not in PRESETS:
        raise InvalidOptionError(f"unknown synthetic model {spec!r}; known: {', '.join('synthetic:' + p for p in PRESETS)}")
    return name


def synthetic_config(spec: str, num_layers: int | None = None) -> ModelConfig:
    fields = dict(PRESETS[parse_spec(spec)])
    if num_layers is not None:
        fields["num_layers"] = num_layers
    return ModelConfig(**fields)


def _randn(shape, std: float, device, dtype, gen) -> torch.Tensor:
    """Normal values made in `dtype` and scaled in place: no fp32 temporaries (they would
    fragment a tight memory budget)."""
    return torch.randn(shape, device=device, dtype=dtype, generator=gen).mul_(std)


def _random_linear(name: str, n: int, k: int, bits: int, group_size: int, cfg: ModelConfig,
                   device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> PackedLinear:
    std = 0.02
    bias = _randn((n,), std, device, dtype, gen) if expects_bias(cfg, name) else None
    if bits == 16:
        return PackedLinear(k, n, 16, -1, _randn((n, k), std, device, dtype, gen), bias=bias)
    groups = -(-k // group_size)
    codes = torch.randint(0, 2**bits, (n, k), device=device, dtype=torch.uint8, generator=gen)
    # scale so that s * (q - z) has about the std of a trained weight
    scales = torch.full((n, groups), std / (2 ** bits / 3.46), device=device, dtype=torch.float16)
    zeros = torch.full((n, groups), 2 ** (bits - 1), device=device, dtype=torch.uint8)
    return PackedLinear(k, n, bits, group_size, pack(codes, bits), scales=scales, zeros=zeros, bias=bias)


def synthetic_checkpoint(spec: str, bits: int = 16, group_size: int = 128, device: str | torch.device = "cuda",
                         dtype: torch.dtype = torch.bfloat16, num_layers: int | None = None, lm_head_bits: int | None = None,
                         seed: int = 0) -> QuantizedCheckpoint:
    """A random model of `spec`'s exact shapes. bits 4/8 quantize the decoder linears (lm_head at
    `lm_head_bits`, default 8 as qruntime's policy); 16 keeps everything in `dtype`."""
    if bits not in (4, 8, 16):
        raise InvalidOptionError(f"bits={bits}; choose 4, 8 or 16")
    device = torch.device(device)
    cfg = synthetic_config(spec, num_layers)
    gen = torch.Generator(device=device).manual_seed(seed)
    head_bits = bits if bits == 16 else (lm_head_bits or 8)
    linears = {}
    for name, (n, k) in expected_linear_shapes(cfg, has_lm_head=head_bits != 16 or not cfg.tie_word_embeddings):
        b = head_bits if name == "lm_head" else bits
        linears[name] = _random_linear(name, n, k, b, group_size, cfg, device, dtype, gen)
    dense = {}
    for name, shape in expected_dense_shapes(cfg):
        if name.endswith("norm.weight"):
            dense[name] = torch.ones(shape, device=device, dtype=dtype)
        else:
            dense[name] = _randn(shape, 0.02, device, dtype, gen)
    ckpt = QuantizedCheckpoint(config=cfg, linears=linears, dense=dense, source={"format": "synthetic", "spec": spec})
    ckpt.validate()
    return ckpt
