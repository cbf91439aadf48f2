"""Hugging Face fp16/bf16/fp32 safetensors checkpoints (single file or sharded with an index).

Every linear is read lazily, one at a time, and either kept at 16 bits or handed to a quantizer,
so peak memory is the output plus one source tensor.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from qruntime.checkpoint import (
    PackedLinear, QuantizedCheckpoint, expected_dense_shapes, expected_linear_shapes, expects_bias,
)
from qruntime.config import ModelConfig, from_hf
from qruntime.errors import CorruptFileError, InvalidOptionError, MissingTensorError, NotAModelError
from qruntime.format import open_safetensors, read_json, sha256_file
from qruntime.quantizers.base import QuantPolicy
from qruntime.quantizers.rtn import quantize_rtn

from .base import Converter, refuse_pickles, register

INDEX = "model.safetensors.index.json"
# Side files that mark a quantized checkpoint even when config.json has no quantization_config.
QUANT_CONFIG_FILES = ("quantize_config.json", "quant_config.json")
# Files that make up a tokenizer, copied verbatim into the packed directory.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.json", "chat_template.jinja",
)

# A quantizer turns (name, fp weight, bias, bits, group_size, symmetric) into a PackedLinear.
LinearQuantizer = Callable[..., PackedLinear]


def detect(path: Path) -> bool:
    """A float HF checkpoint: quantized ones (a `quantization_config`, or AutoGPTQ's separate
    `quantize_config.json` / AutoAWQ's `quant_config.json`) belong to their own converters."""
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors")) \
        and not (path / "quantization.json").exists() and "quantization_config" not in peek_config(path) \
        and not any((path / f).exists() for f in QUANT_CONFIG_FILES)


def peek_config(path: Path) -> dict[str, Any]:
    try:
        return read_json(path / "config.json")
    except Exception:
        return {}


class HFWeights:
    """Name -> tensor over all shards of an HF checkpoint, opened lazily."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if (path / INDEX).is_file():
            index = read_json(path / INDEX)
            if not isinstance(index.get("weight_map"), dict):
                raise CorruptFileError(f"{path / INDEX}: no weight_map")
            self.weight_map: dict[str, str] = index["weight_map"]
            for shard in set(self.weight_map.values()):
                if not (path / shard).is_file():
                    raise CorruptFileError(f"{path / shard}: listed in {INDEX} but missing; re-download it")
        else:
            shards = sorted(path.glob("*.safetensors"))
            self.weight_map = {}
            for shard in shards:
                with open_safetensors(shard) as f:
                    self.weight_map.update({k: shard.name for k in f.keys()})
        self._stack = contextlib.ExitStack()
        self._open: dict[str, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise MissingTensorError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        shard = self.weight_map[name]
        if shard not in self._open:
            self._open[shard] = self._stack.enter_context(open_safetensors(self.path / shard))
        return self._open[shard].get_tensor(name)

    def close(self) -> None:
        self._stack.close()

    def shard_files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))


def stores_tensor(path: Path, name: str) -> bool:
    """Whether the checkpoint at `path` holds tensor `name` (reads only the headers)."""
    weights = HFWeights(path)
    try:
        return name in weights
    finally:
        weights.close()


def read_config(path: Path) -> ModelConfig:
    return from_hf(read_json(path / "config.json"), source=str(path / "config.json"))


def read_tokenizer_files(path: Path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in TOKENIZER_FILES if (path / name).is_file()}


def read_generation_config(path: Path) -> dict[str, Any] | None:
    p = path / "generation_config.json"
    return read_json(p) if p.is_file() else None


def rtn_quantizer(name: str, weight: torch.Tensor, bias: torch.Tensor | None, bits: int,
                  group_size: int, symmetric: bool) -> PackedLinear:
    return quantize_rtn(weight, bits, group_size, symmetric, bias=bias)


# A reader of already-quantized linears (GPTQ, AWQ, compressed-tensors): returns the linear
# `name` if the checkpoint stores it quantized, None if it stores a float `name.weight`.
QuantizedReader = Callable[[HFWeights, str], "PackedLinear | None"]


def float_linear(weights: HFWeights, config: ModelConfig, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [N, K], bias [N] or None) of a float linear; a tied lm_head reads the embedding."""
    if name != "lm_head":
        src = f"{name}.weight"
    elif config.tie_word_embeddings:
        # A tied lm_head is the embedding matrix; it gets its own copy only if quantized.
        src = "model.embed_tokens.weight"
    else:
        src = "lm_head.weight"
    weight = weights.get(src)
    # get() raises MissingTensorError for a bias the config promises; an extra one is an error too
    bias = weights.get(f"{name}.bias") if expects_bias(config, name) or f"{name}.bias" in weights else None
    return weight, bias


def convert(
    path: Path,
    policy: QuantPolicy | None = None,
    quantizer: LinearQuantizer = rtn_quantizer,
    hash_sources: bool = False,
    progress: bool = True,
) -> QuantizedCheckpoint:
    """Reads an HF directory; quantizes every linear per `policy` (None keeps all at 16 bits).
    `policy.method` "gptq"/"awq" runs the calibration-based quantizer layer by layer."""
    return build_checkpoint(Path(path), "hf", policy=policy, quantizer=quantizer,
                            hash_sources=hash_sources, progress=progress)


def build_checkpoint(
    path: Path,
    source_format: str,
    policy: QuantPolicy | None = None,
    quantizer: LinearQuantizer = rtn_quantizer,
    read_quantized: QuantizedReader | None = None,
    lm_head_quantized: bool = False,
    hash_sources: bool = False,
    progress: bool = True,
) -> QuantizedCheckpoint:
    """The HF directory reader every safetensors-based converter shares.

    Linears that `read_quantized` returns keep their codes; float linears are kept at 16 bits
    (policy None) or quantized per `policy` (RTN through `quantizer`, or GPTQ/AWQ layer by layer).
    `lm_head_quantized`: the source stores lm_head quantized (so it is read even when tied).
    """
    if not (path / "config.json").is_file():
        raise NotAModelError(f"{path}: no config.json; not a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        refuse_pickles(path)
        raise NotAModelError(f"{path}: no *.safetensors weight files")
    config = read_config(path)
    method = "none" if policy is None else policy.method
    if method in ("gptq", "awq") and read_quantized is not None:
        raise InvalidOptionError(
            f"--method {method} quantizes float weights with calibration data; {path} is already a "
            f"{source_format} checkpoint (convert it without --method, or start from the fp16 model)"
        )
    weights = HFWeights(path)
    try:
        linears: dict[str, PackedLinear] = {}
        dense = {name: weights.get(name) for name, _ in expected_dense_shapes(config)}
        if method in ("gptq", "awq"):
            from qruntime.quantizers.layerwise import quantize_layers  # heavy; only for calibration methods

            layer_linears, new_dense = quantize_layers(path, config, weights, dense, policy, progress=progress)
            linears.update(layer_linears)
            dense.update(new_dense)  # AWQ folds its scales into the norms
        quantize_lm_head = lm_head_quantized or (policy is not None and policy.for_linear("lm_head")[0] != 16)
        names = [n for n, _ in expected_linear_shapes(config, has_lm_head=quantize_lm_head) if n not in linears]
        for name in tqdm(names, desc="linears", unit="layer", disable=not progress):
            packed = read_quantized(weights, name) if read_quantized is not None else None
            if packed is not None:
                linears[name] = packed
                continue
            weight, bias = float_linear(weights, config, name)
            bits, group_size = policy.for_linear(name) if policy else (16, -1)
            if bits == 16:
                linears[name] = PackedLinear(weight.shape[1], weight.shape[0], 16, -1, weight, bias=bias)
            else:
                linears[name] = quantizer(name, weight, bias, bits, group_size, policy.symmetric)
        files = weights.shard_files()
    finally:
        weights.close()
    if method == "rtn" and quantizer is not rtn_quantizer:
        method = getattr(quantizer, "method", "custom")
    source = {"format": source_format, "method": method, "path": str(path)}
    if hash_sources:
        source["files"] = {f: sha256_file(path / f) for f in files}
    ckpt = QuantizedCheckpoint(
        config=config,
        linears=linears,
        dense=dense,
        tokenizer_files=read_tokenizer_files(path),
        generation_config=read_generation_config(path),
        source=source,
    )
    ckpt.validate()
    return ckpt


register(Converter(name="hf", detect=detect, convert=convert))
