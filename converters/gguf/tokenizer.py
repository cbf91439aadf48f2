"""The tokenizer a GGUF describes, rebuilt as a Hugging Face fast tokenizer.

GGUF keeps the vocabulary in metadata (`tokenizer.ggml.{model, pre, tokens, token_type, merges,
scores, bos_token_id, eos_token_id, ...}`, `tokenizer.chat_template`). transformers already turns
those into a `tokenizers` backend (`transformers_gguf_tokenizer`, transformers >= 5.18); we
add what llama.cpp decides outside the vocabulary: whether BOS/EOS are added (llama.cpp
`src/llama-vocab.cpp`: the `add_bos_token` key, else its per-model default), BPE's
`ignore_merges` for the llama3 pre-tokenizer, and the end-of-generation ids.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from qruntime.errors import CorruptFileError, MissingDependencyError, UnsupportedFormatError

from .reader import GGUFFile

TOKEN_CONTROL = 3  # llama.cpp token_type values: 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte
# Pre-tokenizers for which llama.cpp sets `ignore_merges` (a word already in the vocabulary is one token).
IGNORE_MERGES_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "smaug-bpe")
# Control tokens llama.cpp treats as end of generation even when no id key names them
# (llama-vocab.cpp, the EOG auto-detection list).
EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>",
             "_<EOT>", "<|end_of_text|>", "<｜end▁of▁sentence｜>")


def _strings(f: GGUFFile, key: str) -> list[str] | None:
    """A string-array key, or None; any other type is a corrupt file (not a crash later)."""
    value = f.get(key)
    if value is not None and not isinstance(value, list):
        raise CorruptFileError(f"{f.source}: {key} is {f.metadata_types.get(key)}, expected array[string]")
    return value


def _numbers(f: GGUFFile, key: str, n: int) -> list | None:
    """A numeric-array key of length n (per-token types or scores), or None."""
    value = f.get(key)
    if value is None:
        return None
    if not isinstance(value, np.ndarray) or len(value) != n:
        raise CorruptFileError(f"{f.source}: {key} must be a numeric array of {n} values, found "
                               f"{f.metadata_types.get(key)} of {len(value) if hasattr(value, '__len__') else 1}")
    return value.tolist()


def _token_id(f: GGUFFile, key: str, n_vocab: int) -> int | None:
    value = f.get(f"tokenizer.ggml.{key}")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n_vocab:
        raise CorruptFileError(f"{f.source}: tokenizer.ggml.{key} = {value!r} is not a token id below {n_vocab}")
    return value


def special_ids(f: GGUFFile) -> tuple[int | None, list[int]]:
    """(BOS id, end-of-generation ids) as llama.cpp derives them."""
    tokens = _strings(f, "tokenizer.ggml.tokens") or []
    n = len(tokens)
    bos = _token_id(f, "bos_token_id", n)
    eos = [i for i in (_token_id(f, k, n) for k in ("eos_token_id", "eot_token_id", "eom_token_id")) if i is not None]
    types = _numbers(f, "tokenizer.ggml.token_type", n)
    if types is not None:
        eos += [i for i, t in enumerate(tokens) if t in EOG_TEXTS and types[i] == TOKEN_CONTROL]
    return bos, list(dict.fromkeys(eos))


def _adds_bos(f: GGUFFile, model: str) -> bool:
    flag = f.get("tokenizer.ggml.add_bos_token")
    if isinstance(flag, bool):
        return flag
    # llama.cpp's defaults when the key is absent: sentencepiece adds BOS, so do llama3-style BPE vocabularies
    return model == "llama" or f.get("tokenizer.ggml.pre") in IGNORE_MERGES_PRE


def _tokenizer_dict(f: GGUFFile, model: str) -> dict[str, Any]:
    """The field names transformers' GGUF tokenizer builders read."""
    tokens = _strings(f, "tokenizer.ggml.tokens") or []
    d: dict[str, Any] = {"tokenizer_type": model, "tokens": tokens}
    if isinstance(f.get("tokenizer.ggml.pre"), str):
        d["pre_tokenizer_type"] = f.get("tokenizer.ggml.pre")
    if isinstance(f.get("tokenizer.ggml.add_space_prefix"), bool):
        d["add_prefix_space"] = f.get("tokenizer.ggml.add_space_prefix")
    if _strings(f, "tokenizer.ggml.merges") is not None:
        d["merges"] = f.get("tokenizer.ggml.merges")
    for key in ("scores", "token_type"):
        if (values := _numbers(f, f"tokenizer.ggml.{key}", len(tokens))) is not None:
            d[key] = values
    return d


# transformers' GGUF tokenizer builder as this module uses it: in transformers.integrations.gguf from
# 5.18. Before (transformers.integrations.ggml, 4.45-5.17) it builds byte-level BPE tokenizers that
# split some texts differently from llama.cpp (tests/converters/test_gguf_logits.py
# test_tokenizer_matches_llama_cpp fails under 5.17, passes under 5.18 and 5.24).
MIN_TRANSFORMERS = "5.18"


def transformers_gguf_tokenizer():
    """transformers' builder of a `tokenizers` backend from GGUF vocabulary fields: (architecture,
    fields) -> (Tokenizer, extra kwargs). An older transformers is refused, not worked around
    (converters.gguf.convert builds the tokenizer before converting any tensor)."""
    try:
        from transformers.integrations.gguf import convert_gguf_tokenizer
    except ImportError:
        import transformers

        raise MissingDependencyError(
            f"rebuilding a GGUF file's tokenizer needs transformers >= {MIN_TRANSFORMERS} (installed: "
            f"{transformers.__version__}, whose tokenizers disagree with llama.cpp's); "
            f"pip install 'transformers>={MIN_TRANSFORMERS}'") from None
    return convert_gguf_tokenizer


def build_tokenizer_files(f: GGUFFile, arch: str) -> dict[str, bytes]:
    """tokenizer.json + tokenizer_config.json (+ chat template) files, or {} when the GGUF has no
    vocabulary."""
    model = f.get("tokenizer.ggml.model")
    if model is None:
        return {}
    if not isinstance(model, str) or not _strings(f, "tokenizer.ggml.tokens"):
        raise CorruptFileError(f"{f.source}: tokenizer.ggml.model is {model!r} but tokenizer.ggml.tokens is missing")
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    convert_gguf_tokenizer = transformers_gguf_tokenizer()
    tokens = f.get("tokenizer.ggml.tokens")
    bos, eos = special_ids(f)
    try:
        backend, _ = convert_gguf_tokenizer(arch, _tokenizer_dict(f, model))
    except ValueError as e:
        raise UnsupportedFormatError(f"{f.source}: tokenizer {model!r} cannot be rebuilt ({e})") from None
    except Exception as e:  # malformed vocab/merges surface as assorted library errors
        raise CorruptFileError(f"{f.source}: tokenizer metadata is malformed ({type(e).__name__}: {e})") from None
    if f.get("tokenizer.ggml.pre") in IGNORE_MERGES_PRE and hasattr(backend.model, "ignore_merges"):
        backend.model.ignore_merges = True
    # llama.cpp adds BOS/EOS around every encoded text per these flags; so does our post-processor
    pieces, specials = ["$A"], []
    if _adds_bos(f, model) and bos is not None:
        pieces.insert(0, tokens[bos])
        specials.append((tokens[bos], bos))
    if f.get("tokenizer.ggml.add_eos_token") is True and eos:
        pieces.append(tokens[eos[0]])
        specials.append((tokens[eos[0]], eos[0]))
    backend.post_processor = processors.TemplateProcessing(single=pieces, special_tokens=specials)
    unk = _token_id(f, "unknown_token_id", len(tokens))
    pad = _token_id(f, "padding_token_id", len(tokens))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tokens[bos] if bos is not None else None,
        eos_token=tokens[eos[0]] if eos else None,
        unk_token=tokens[unk] if unk is not None else None,
        pad_token=tokens[pad] if pad is not None else None,
    )
    template = f.get("tokenizer.chat_template")
    if isinstance(template, str):
        fast.chat_template = template
    with tempfile.TemporaryDirectory(prefix="qruntime-gguf-tok-") as tmp:
        fast.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def generation_config(f: GGUFFile) -> dict[str, Any] | None:
    """generation_config.json content: the BOS and end-of-generation ids."""
    bos, eos = special_ids(f)
    if bos is None and not eos:
        return None
    return {"bos_token_id": bos, "eos_token_id": eos}
