"""Session fixtures for the GGUF tests: tiny models written to GGUF and quantized by llama.cpp, once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import gguf_fixtures  # noqa: E402

from qruntime.demo import build_tiny_model  # noqa: E402

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
        return self._once(("hf", model), lambda: build_tiny_model(self.root / f"hf-{model}", variant, **sizes))

    def _write_options(self, model: str) -> dict:
        _, _, pre, add_bos = GGUF_MODELS[model]
        return dict(pre=pre, add_bos=add_bos)

    def file(self, model: str, ftype: str) -> Path:
        def make() -> Path:
            out = self.root / f"tiny-{model}-{ftype}.gguf"
            if ftype in ("F32", "F16"):
                return gguf_fixtures.write_gguf(self.hf(model), out, ftype, **self._write_options(model))
            return gguf_fixtures.quantize(self.file(model, "F32"), out, ftype)
        return self._once(("file", model, ftype), make)

    def dequantized(self, model: str, ftype: str) -> Path:
        return self._once(("deq", model, ftype), lambda: gguf_fixtures.dequantized_copy(
            self.file(model, ftype), self.hf(model), self.root / f"deq-{model}-{ftype}.gguf",
            **self._write_options(model)))


@pytest.fixture(scope="session")
def gguf_zoo(tmp_path_factory) -> GGUFZoo:
    return GGUFZoo(tmp_path_factory.mktemp("gguf"))
