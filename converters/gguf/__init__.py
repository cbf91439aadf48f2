"""GGUF (llama.cpp) files -> QuantizedCheckpoint, keeping llama.cpp's codes (docs/FORMAT.md, "GGUF").

    reader.py     validating header parser (hostile files raise QRuntimeError subclasses)
    types.py      block decoders and the type -> packed-format table
    tensors.py    tensor data -> PackedLinear / dense tensors, row-chunked
    metadata.py   metadata -> ModelConfig, GGUF <-> HF names, Q/K un-permutation
    tokenizer.py  vocabulary metadata -> HF fast tokenizer files
    select.py     which file: a path, a quant type in a directory, or a hub repository
    inspect.py    `qruntime inspect FILE.gguf`
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qruntime.checkpoint import PackedLinear, QuantizedCheckpoint, expected_dense_shapes, expected_linear_shapes
from qruntime.config import ModelConfig
from qruntime.errors import UnsupportedFormatError
from qruntime.format import sha256_file
from qruntime.quantizers.base import QuantPolicy
from qruntime.quantizers.rtn import quantize_rtn

from ..base import Converter, register
from . import metadata, tokenizer
from .reader import GGUFFile, peek_magic, read_gguf
from .select import local_file
from .tensors import any_float, dequantized, float_tensor, foreign_dequantized, quantized_linear
from .types import FLOAT_TYPES, QUANT_TYPES, SUPPORTED

log = logging.getLogger("qruntime")

# --requantize without --bits: int4, groups of 32 like most GGUF types, asymmetric like llama.cpp's K types
REQUANTIZE_DEFAULT = QuantPolicy(bits=4, group_size=32, symmetric=False)
# Quantized embeddings are dequantized (decode gathers one row per token; see FORMAT.md 4.3).
EMBEDDING_DTYPE = torch.float16


def detect(path: Path) -> bool:
    """A file with the GGUF magic, or a directory holding .gguf files (and no HF weights)."""
    if path.is_file():
        return peek_magic(path)
    return path.is_dir() and any(p.suffix.lower() == ".gguf" for p in path.iterdir()) \
        and not any(path.glob("*.safetensors"))


def _check_types(f: GGUFFile, names: list[str], requantize: bool) -> list[str]:
    """Names of the tensors that need --requantize; an error listing them when it is not given."""
    foreign = [n for n in names if f.tensors[n].ggml_type not in FLOAT_TYPES and f.tensors[n].ggml_type not in QUANT_TYPES]
    if foreign and not requantize:
        kinds = sorted({f.tensors[n].type_name for n in foreign})
        raise UnsupportedFormatError(
            f"{f.source}: {len(foreign)} tensors use {', '.join(kinds)} (e.g. {foreign[0]!r}), which the packed "
            f"format cannot hold as they are; supported types: {', '.join(SUPPORTED)}. Pass --requantize "
            "to dequantize them and re-quantize with RTN (lossy), or pick another file"
        )
    return foreign


class _Builder:
    """Builds each linear from its GGUF tensor per the source type and the policy."""

    def __init__(self, f: GGUFFile, cfg: ModelConfig, policy: QuantPolicy | None) -> None:
        self.f, self.cfg, self.policy = f, cfg, policy
        self.arch = cfg.family
        self.rtn_used = False  # any linear re-quantized or quantized from floats (source method "rtn")

    def linear(self, hf: str, gguf_weight: str) -> PackedLinear:
        info = self.f.tensors[gguf_weight]
        rows = metadata.unpermute_rows(self.arch, hf + ".weight", self.cfg)
        bias_name = gguf_weight[: -len("weight")] + "bias"
        bias = any_float(self.f, self.f.tensors[bias_name], rows) if bias_name in self.f.tensors else None
        if info.ggml_type in QUANT_TYPES:  # keep llama.cpp's codes
            lin = quantized_linear(self.f, info, rows)
            lin.bias = bias
            return lin
        if info.ggml_type in FLOAT_TYPES:
            w, policy = float_tensor(self.f, info, rows), self.policy
        else:  # --requantize
            w, policy = foreign_dequantized(self.f, info, rows), self.policy or REQUANTIZE_DEFAULT
        bits, group = policy.for_linear(hf) if policy else (16, -1)
        if bits == 16:
            return PackedLinear(w.shape[1], w.shape[0], 16, -1, w if info.ggml_type in FLOAT_TYPES else w.half(), bias=bias)
        self.rtn_used = True
        return quantize_rtn(w, bits, group, policy.symmetric, bias=bias)

    def lm_head_source(self) -> str | None:
        """The GGUF tensor lm_head comes from, or None (tied and kept 16-bit: shares the embedding)."""
        if not self.cfg.tie_word_embeddings:
            return "output.weight"
        embd = self.f.tensors["token_embd.weight"]
        quantize = embd.ggml_type not in FLOAT_TYPES or (self.policy and self.policy.for_linear("lm_head")[0] != 16)
        # llama.cpp multiplies by the quantized token_embd itself: keep those codes as lm_head
        return "token_embd.weight" if quantize else None


def read_checkpoint(f: GGUFFile, policy: QuantPolicy | None = None, requantize: bool = False,
                    progress: bool = False) -> QuantizedCheckpoint:
    """A parsed GGUF -> validated QuantizedCheckpoint without tokenizer files (see `convert`)."""
    metadata.architecture(f)  # refuses an architecture the engine cannot run, before anything else is read
    bos, eos = tokenizer.special_ids(f)
    cfg = metadata.model_config(f, bos, eos)
    expected = metadata.check_tensors(f, cfg)
    foreign = _check_types(f, list(expected), requantize)
    build = _Builder(f, cfg, policy)

    head = build.lm_head_source()
    names = [n for n, _ in expected_linear_shapes(cfg, has_lm_head=head is not None)]
    linears = {}
    for hf in tqdm(names, desc="linears", unit="layer", disable=not progress):
        linears[hf] = build.linear(hf, head if hf == "lm_head" else metadata.gguf_name(hf + ".weight"))
    dense = {}
    for hf, _ in expected_dense_shapes(cfg):
        info = f.tensors[metadata.gguf_name(hf)]
        if hf == "model.embed_tokens.weight" and info.ggml_type in QUANT_TYPES:
            dense[hf] = dequantized(f, info, EMBEDDING_DTYPE)
        elif hf == "model.embed_tokens.weight" and info.ggml_type not in FLOAT_TYPES:  # --requantize
            dense[hf] = foreign_dequantized(f, info).to(EMBEDDING_DTYPE)
        else:
            dense[hf] = any_float(f, info)

    file_type = f.get("general.file_type")
    source = {"format": "gguf", "method": "rtn" if build.rtn_used else "none", "path": f.source,
              "gguf_file_type": file_type if isinstance(file_type, int) else None}
    if foreign:
        source["requantized"] = {n: f.tensors[n].type_name for n in foreign}
        p = policy or REQUANTIZE_DEFAULT
        log.warning("qruntime: --requantize: %d tensors (%s) were dequantized and re-quantized with RTN (int%d, group "
                    "%d); their GGUF codes are not kept", len(foreign),
                    ", ".join(sorted(set(source["requantized"].values()))), p.bits, p.group_size)
    ckpt = QuantizedCheckpoint(config=cfg, linears=linears, dense=dense,
                               generation_config=tokenizer.generation_config(f), source=source)
    ckpt.validate()
    return ckpt


def convert(
    path: Path,
    policy: QuantPolicy | None = None,
    progress: bool = True,
    hash_sources: bool = False,
    quant_type: str | None = None,
    requantize: bool = False,
) -> QuantizedCheckpoint:
    """Reads a GGUF file (or the `quant_type` file of a directory). Quantized tensors keep their
    codes; float tensors follow `policy` (None: 16-bit); types the format cannot hold are an error
    unless `requantize`, which dequantizes them and re-quantizes with RTN (policy, else int4 g32)."""
    file = local_file(Path(path), quant_type)
    f = read_gguf(file)
    # the tokenizer first: what stops it (a transformers too old, malformed vocabulary) stops the
    # conversion before the tensors, not after them
    tokenizer_files = tokenizer.build_tokenizer_files(f, metadata.architecture(f))
    ckpt = read_checkpoint(f, policy, requantize, progress)
    ckpt.tokenizer_files = tokenizer_files
    if hash_sources:
        ckpt.source["files"] = {file.name: sha256_file(file)}
    return ckpt


register(Converter(name="gguf", detect=detect, convert=convert))
