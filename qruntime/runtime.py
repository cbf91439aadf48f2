"""`qruntime.load` and `Model`: the public face of the engine."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from qruntime import format as packed_format
from qruntime.backends import get_backend
from qruntime.checkpoint import QuantizedCheckpoint
from qruntime.config import ModelConfig
from qruntime.converters import base as converters
from qruntime.engine.generate import GenerationStats, TextDeltas, generate_tokens
from qruntime.engine.kv_cache import KVCache
from qruntime.engine.sampler import Sampler, SamplingParams
from qruntime.errors import InvalidOptionError, ModelNotFoundError, QRuntimeError, UnsupportedArchitectureError
from qruntime.memory import context_for_budget, format_size, parse_size
from qruntime.model import build_model
from qruntime.quantizers.base import QuantPolicy
from qruntime.tokenizer import load_tokenizer

DEFAULT_MAX_SEQ_LEN = 4096
_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float32": torch.float32, "fp32": torch.float32}


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, cfg: ModelConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        if dtype not in _DTYPES:
            raise InvalidOptionError(f"dtype={dtype!r}; choose one of {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32  # CPU half-precision matmuls are slow and less accurate
    return torch.bfloat16 if cfg.torch_dtype == "bfloat16" else torch.float16


def read_checkpoint(path: str | Path, bits: int | None = None, group_size: int = 128,
                    symmetric: bool = False, progress: bool = False, **options) -> QuantizedCheckpoint:
    """Any supported path -> QuantizedCheckpoint; foreign checkpoints are converted in memory,
    quantized with RTN when `bits` is 4 or 8."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such file or directory")
    if packed_format.is_packed_dir(path):
        if bits not in (None, 16):
            raise InvalidOptionError(
                f"{path} is already a packed qruntime model; load it without bits= (re-quantizing packed "
                "weights is not supported: convert from the original checkpoint instead)"
            )
        return packed_format.load(path)
    if bits not in (None, 4, 8, 16):
        raise InvalidOptionError(f"bits={bits}; choose 4, 8 or 16 (None keeps the source precision)")
    policy = None if bits in (None, 16) else QuantPolicy(bits=bits, group_size=group_size, symmetric=symmetric)
    return converters.convert(path, policy=policy, progress=progress, **options)


class Model:
    """A loaded model: config, tokenizer, the decoder on its backend, and a static KV cache."""

    def __init__(self, ckpt: QuantizedCheckpoint, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, backend: str | None = None,
                 max_seq_len: int | None = None, kv_cache: str = "auto", consume: bool = False,
                 memory_budget: str | int | None = None) -> None:
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.config = ckpt.config
        self.dtype = _resolve_dtype(dtype, self.device, ckpt.config)
        self.backend_name = backend or _default_backend(self.device, ckpt.config)
        if self.backend_name not in ("torch", "triton"):
            raise InvalidOptionError(f"backend={self.backend_name!r}; choose torch or triton")
        if max_seq_len is not None and max_seq_len <= 0:
            raise InvalidOptionError(f"max_seq_len={max_seq_len} must be positive")
        if kv_cache not in ("auto", "int8"):
            raise InvalidOptionError(f"kv_cache={kv_cache!r}; choose auto (the compute dtype) or int8")
        self.memory_budget = None if memory_budget is None else parse_size(memory_budget)
        self.budget_max_seq_len: int | None = None  # the positions the budget has room for (not capped)
        self.max_seq_len = self._cache_length(ckpt, max_seq_len, kv_cache == "int8")
        self.source = ckpt.source
        self.tokenizer = load_tokenizer(ckpt.tokenizer_files, source=str(ckpt.source.get("path", "checkpoint")),
                                        model_type=ckpt.config.family)
        self.generation_config = ckpt.generation_config or {}
        self.runner = self.module = self.cache = None
        if self.backend_name == "triton":
            if not _triton_available():
                raise InvalidOptionError("backend='triton' needs the triton package (pip install triton)")
            if self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                raise InvalidOptionError("backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 for tests)")
            from qruntime.engine.triton_runner import TritonRunner, unsupported_reason

            if reason := unsupported_reason(ckpt.config, self.device):
                raise UnsupportedArchitectureError(f"backend='triton' cannot run this model: {reason}; "
                                                   "load it with backend='torch'")
            self.runner = TritonRunner(ckpt, self.device, self.dtype, self.max_seq_len, kv_cache_dtype=kv_cache,
                                       consume=consume)
        else:
            if kv_cache != "auto":
                raise InvalidOptionError("kv_cache='int8' needs the triton backend")
            self.backend = get_backend(self.backend_name)
            self.module = build_model(ckpt, self.backend, self.device, self.dtype, self.max_seq_len)
            self.cache = KVCache(ckpt.config, self.max_seq_len, 1, self.device, self.dtype)
        self.eos_ids = self._eos_ids()

    def _cache_length(self, ckpt: QuantizedCheckpoint, requested: int | None, int8: bool) -> int:
        """The static cache's positions: `requested`, else the longest that fits the memory budget
        beside the weights (qruntime.memory), else min(model max, DEFAULT_MAX_SEQ_LEN)."""
        limit = ckpt.config.max_position_embeddings
        if self.memory_budget is None:
            return requested or min(limit, DEFAULT_MAX_SEQ_LEN)
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            if self.memory_budget > total:
                raise InvalidOptionError(f"memory budget {format_size(self.memory_budget)} exceeds the "
                                         f"{format_size(total)} of {self.device}")
        fits = self.budget_max_seq_len = context_for_budget(self.memory_budget, ckpt, self.dtype, int8)
        if requested and requested > fits:
            raise InvalidOptionError(f"max_seq_len={requested} does not fit the memory budget of "
                                     f"{format_size(self.memory_budget)}: at most {fits} positions do")
        return requested or min(fits, limit)

    # ------------------------------------------------------------------ scoring
    def logits(self, input_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [T, vocab] (float32) for one sequence of token ids."""
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device).reshape(-1)
        self._check_length(ids.numel())
        if self.runner is not None:
            return self.runner.prefill(ids, all_logits=True)
        return self.module(ids[None], self.cache, start=0)[0]

    # --------------------------------------------------------------- generation
    def generate(
        self,
        prompt_or_messages: str | list[dict[str, Any]],
        max_new_tokens: int = 128,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stream: bool = False,
        stats: GenerationStats | None = None,
    ) -> str | Iterator[str]:
        """Generates text for a prompt string or a list of chat messages ({"role", "content"}).

        Sampling options left as None take generation_config.json's values (greedy if it has
        none). Returns the new text, or an iterator of text deltas when stream=True. A
        GenerationStats passed as `stats` is filled with the prompt's and the new tokens' counts and
        times (its summary() is the line `qruntime generate` prints).
        """
        tok = self._require_tokenizer()
        ids = self.encode(prompt_or_messages)
        params = self.sampling_params(temperature, top_p, top_k, repetition_penalty, seed)
        tokens = self.generate_ids(ids, max_new_tokens, params)
        if stats is not None:
            stats.prompt_tokens = len(ids)
            tokens = stats.count(tokens)
        if stream:
            return self._stream(tokens)
        return tok.decode(list(tokens), skip_special_tokens=True)

    def _stream(self, tokens: Iterator[int]) -> Iterator[str]:
        deltas = TextDeltas(self.tokenizer)
        for token in tokens:
            if delta := deltas.push(token):
                yield delta
        if tail := deltas.flush():
            yield tail

    def generate_ids(self, prompt_ids: Sequence[int], max_new_tokens: int = 128,
                     params: SamplingParams | None = None) -> Iterator[int]:
        """Yields new token ids (an EOS id, if reached, is the last one)."""
        if max_new_tokens < 1:
            raise InvalidOptionError(f"max_new_tokens={max_new_tokens} must be >= 1")
        if not prompt_ids:
            raise InvalidOptionError("the prompt is empty")
        self._check_length(len(prompt_ids) + max_new_tokens)
        sampler = Sampler(params or SamplingParams(), self.device)
        if self.runner is not None:
            return self.runner.generate(list(prompt_ids), max_new_tokens, sampler, self.eos_ids)
        return generate_tokens(self.module, self.cache, list(prompt_ids), max_new_tokens, sampler, self.eos_ids)

    def encode(self, prompt_or_messages: str | list[dict[str, Any]]) -> list[int]:
        tok = self._require_tokenizer()
        if isinstance(prompt_or_messages, str):
            return tok.encode(prompt_or_messages, add_special_tokens=True)
        if not getattr(tok, "chat_template", None):
            raise InvalidOptionError("chat messages given, but this model's tokenizer has no chat template; pass a string prompt")
        out = tok.apply_chat_template(prompt_or_messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "input_ids"):  # transformers v5 returns a BatchEncoding
            out = out["input_ids"]
        return list(out)

    def sampling_params(self, temperature=None, top_p=None, top_k=None, repetition_penalty=None, seed=None) -> SamplingParams:
        gc = self.generation_config
        sampling_default = bool(gc.get("do_sample", False))
        if temperature is None:
            temperature = float(gc.get("temperature", 1.0)) if sampling_default else 0.0
        return SamplingParams(
            temperature=temperature,
            top_k=top_k if top_k is not None else (int(gc.get("top_k", 0) or 0) if sampling_default else 0),
            top_p=top_p if top_p is not None else (float(gc.get("top_p", 1.0) or 1.0) if sampling_default else 1.0),
            repetition_penalty=repetition_penalty if repetition_penalty is not None else float(gc.get("repetition_penalty", 1.0) or 1.0),
            seed=seed,
        )

    # ------------------------------------------------------------------ reports
    def memory_report(self) -> dict[str, Any]:
        """Bytes held by weights (by bit width), the KV cache, and in total; the memory budget the
        cache was sized from and the positions it had room for (None when it was not sized so)."""
        if self.runner is not None:
            r = self.runner
            weights = r.weight_nbytes() + sum(t.numel() * t.element_size() for t in (r.embed, r.final_norm))
            kv = r.cache_nbytes()
            return {"device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""), "backend": "triton",
                    "weights_bytes": weights, "linear_bytes": r.weight_nbytes(), "kv_cache_bytes": kv,
                    "kv_bytes_per_token": kv // self.max_seq_len, "max_seq_len": self.max_seq_len,
                    "memory_budget": self.memory_budget, "budget_max_seq_len": self.budget_max_seq_len,
                    "total_bytes": weights + kv}
        seen: set[int] = set()
        by_bits: dict[str, int] = {}
        for module in self.module.modules():
            tensors = []
            if hasattr(module, "packed"):
                tensors = list(module.packed.tensors().values())
                key = f"linear_w{module.bits}"
            elif isinstance(module, (torch.nn.Embedding,)) or hasattr(module, "eps"):
                tensors = [module.weight]
                key = "embedding" if isinstance(module, torch.nn.Embedding) else "norms"
            for t in tensors:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in seen:
                    seen.add(ptr)
                    by_bits[key] = by_bits.get(key, 0) + t.numel() * t.element_size()
        weights = sum(by_bits.values())
        kv = self.cache.nbytes()
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "backend": "torch",
            "weights_bytes": weights,
            "weights_by_kind": by_bits,
            "kv_cache_bytes": kv,
            "kv_bytes_per_token": KVCache.bytes_per_token(self.config, self.dtype),
            "max_seq_len": self.max_seq_len,
            "memory_budget": self.memory_budget,
            "budget_max_seq_len": self.budget_max_seq_len,
            "total_bytes": weights + kv,
        }

    # ------------------------------------------------------------------ helpers
    def _eos_ids(self) -> set[int]:
        ids = set(self.config.eos_token_ids)
        eos = self.generation_config.get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise QRuntimeError("this model has no tokenizer files; pass token ids to generate_ids()/logits() instead")
        return self.tokenizer

    def _check_length(self, n: int) -> None:
        if n > self.max_seq_len:
            raise InvalidOptionError(
                f"{n} tokens exceed the KV cache of {self.max_seq_len} positions; load with a larger max_seq_len "
                f"(the model supports {self.config.max_position_embeddings})"
            )


def load(path: str | Path, bits: int | None = None, group_size: int = 128, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, symmetric: bool = False, backend: str | None = None,
         max_seq_len: int | None = None, kv_cache: str = "auto", memory_budget: str | int | None = None) -> Model:
    """Loads a packed-format directory, or an HF model directory (quantized on the fly with RTN
    when `bits` is 4 or 8), and returns a ready Model.

    backend: "triton" (default on a CUDA device: fused kernels, decode in a CUDA graph; for a
    model it cannot run, the torch backend with a warning) or "torch" (the plain
    PyTorch reference; the default on a CPU). kv_cache: "auto" (compute
    dtype) or "int8" (triton backend; per-token, per-head scales).

    The KV cache is static, allocated here: max_seq_len positions; else, given memory_budget
    (bytes, or a size like "20GB"), the most positions that fit that much device memory beside the
    weights and a 1 GiB workspace (qruntime.memory), at most the model's max_position_embeddings;
    else min(model max, 4096)."""
    ckpt = read_checkpoint(path, bits=bits, group_size=group_size, symmetric=symmetric)
    return Model(ckpt, device=device, dtype=dtype, backend=backend, max_seq_len=max_seq_len, kv_cache=kv_cache,
                 memory_budget=memory_budget)


def _default_backend(device: torch.device, cfg: ModelConfig) -> str:
    """triton on a CUDA device, unless the model is one it cannot run: then torch, with a warning
    that says why (the model still runs, more slowly); torch elsewhere."""
    if device.type != "cuda" or not _triton_available():
        return "torch"
    from qruntime.engine.triton_runner import unsupported_reason

    if reason := unsupported_reason(cfg, device):
        warnings.warn(f"the triton backend cannot run this model ({reason}): using the torch backend, "
                      "which is slower", stacklevel=3)
        return "torch"
    return "triton"


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
