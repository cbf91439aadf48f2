"""ModelConfig: the normalized architecture every converter produces and the engine consumes.

Llama (2, 3, 3.1, 3.2), Qwen2/2.5 and Qwen3 differ only by the flags below; `from_hf` maps a
Hugging Face `config.json` (transformers v4 `rope_theta`/`rope_scaling` or v5 `rope_parameters`)
onto it and refuses what the engine cannot run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import UnsupportedArchitectureError

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3")
# rope types the engine implements; anything else is refused rather than silently ignored.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "frequency_factors")


@dataclass
class RopeScaling:
    """Frequency scaling of RoPE. `type` is one of SUPPORTED_ROPE_TYPES (never "default")."""

    type: str
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # frequency_factors only: inverse frequency i is divided by factors[i] (head_dim / 2 values).
    # GGUF stores llama3 scaling this way (`rope_freqs.weight`); keeping the file's numbers makes
    # the engine rotate exactly as llama.cpp does.
    factors: list[float] | None = None


@dataclass
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False   # Qwen2; Llama with attention_bias
    o_bias: bool = False     # Llama with attention_bias, Qwen3 with attention_bias
    mlp_bias: bool = False   # Llama with mlp_bias
    qk_norm: bool = False    # Qwen3: RMSNorm over each head of q and k before RoPE
    tie_word_embeddings: bool = False
    torch_dtype: str = "float16"  # the dtype the source weights were published in
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.family not in SUPPORTED_FAMILIES:
            raise UnsupportedArchitectureError(
                f"model family {self.family!r} is not supported; supported: {', '.join(SUPPORTED_FAMILIES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedArchitectureError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise UnsupportedArchitectureError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.rope_scaling is not None and self.rope_scaling.type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedArchitectureError(
                f"rope scaling type {self.rope_scaling.type!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        rs = self.rope_scaling
        if rs is not None and (rs.type == "frequency_factors") != (rs.factors is not None):
            raise UnsupportedArchitectureError("rope scaling: `factors` is required by, and only allowed with, "
                                               "type 'frequency_factors'")
        if rs is not None and rs.factors is not None and (
            len(rs.factors) != self.head_dim // 2 or not all(x > 0 for x in rs.factors)
        ):
            raise UnsupportedArchitectureError(
                f"rope scaling: {len(rs.factors)} frequency factors, expected head_dim / 2 = {self.head_dim // 2} "
                "positive values"
            )

    # -- (de)serialization of the normalized config (the packed format's config.json) --
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UnsupportedArchitectureError(
                f"normalized config has unknown fields {sorted(unknown)}; written by a newer qruntime?"
            )
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


_HF_FAMILY = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_MODEL_TYPE_FAMILY = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def _rope_from_hf(hf: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """Reads rope theta and scaling from either the v4 or the v5 transformers layout."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or None
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    spec = scaling if scaling else params
    rope_type = spec.get("rope_type", spec.get("type", "default")) if spec else "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"{source}: rope scaling type {rope_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    rs = RopeScaling(type=rope_type, factor=float(spec.get("factor", 1.0)))
    if rope_type == "llama3":
        rs.low_freq_factor = float(spec["low_freq_factor"])
        rs.high_freq_factor = float(spec["high_freq_factor"])
        rs.original_max_position_embeddings = int(spec["original_max_position_embeddings"])
    return float(theta), rs


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Maps a Hugging Face config dict to ModelConfig, refusing features the engine lacks."""
    archs = hf.get("architectures") or []
    family = next((_HF_FAMILY[a] for a in archs if a in _HF_FAMILY), None)
    if family is None:
        family = _MODEL_TYPE_FAMILY.get(hf.get("model_type", ""))
    if family is None:
        raise UnsupportedArchitectureError(
            f"{source}: architecture {archs or hf.get('model_type')!r} is not supported; "
            f"supported: {', '.join(_HF_FAMILY)}"
        )
    if hf.get("use_sliding_window"):
        raise UnsupportedArchitectureError(
            f"{source}: use_sliding_window=true is not supported (set it false: Qwen2 releases "
            "ship with it off)"
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedArchitectureError(f"{source}: hidden_act={act!r} is not supported (only silu)")
    theta, scaling = _rope_from_hf(hf, source)
    num_heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    attention_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        family=family,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(hf.get("head_dim") or hidden // num_heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        rope_scaling=scaling,
        # Qwen2 always has q/k/v bias and no o bias; Llama's attention_bias covers all four.
        qkv_bias=True if family == "qwen2" else attention_bias,
        o_bias=False if family == "qwen2" else attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=family == "qwen3",
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float16").replace("torch.", ""),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_as_id_list(hf.get("eos_token_id")),
    )
