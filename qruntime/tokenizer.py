"""Loads a transformers tokenizer from the tokenizer files a checkpoint carries."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from qruntime.errors import CorruptFileError


def load_tokenizer(files: dict[str, bytes], source: str, model_type: str | None = None):
    """A transformers tokenizer (with its chat template) built from `files`, or None if empty.

    `model_type` (the family: llama, qwen2, qwen3) stands in for the model's config.json, which the
    tokenizer files do not include: AutoTokenizer picks the tokenizer class from it when
    tokenizer_config.json names only a generic one, and that class may impose its own
    pre-tokenizer (Qwen2Tokenizer does), so without it the ids could differ from what
    `AutoTokenizer.from_pretrained(<the original directory>)` gives."""
    if not files:
        return None
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer exists

    with tempfile.TemporaryDirectory(prefix="qruntime-tok-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        if model_type and "config.json" not in files:
            (Path(tmp) / "config.json").write_text(json.dumps({"model_type": model_type}))
        try:
            return AutoTokenizer.from_pretrained(tmp)
        except Exception as e:
            raise CorruptFileError(f"{source}: tokenizer files cannot be loaded ({type(e).__name__}: {e})") from None
