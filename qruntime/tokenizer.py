"""Loads a transformers tokenizer from the tokenizer files a checkpoint carries."""

from __future__ import annotations

import tempfile
from pathlib import Path

from qruntime.errors import CorruptFileError


def load_tokenizer(files: dict[str, bytes], source: str):
    """A transformers tokenizer (with its chat template) built from `files`, or None if empty."""
    if not files:
        return None
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer exists

    with tempfile.TemporaryDirectory(prefix="qruntime-tok-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        try:
            return AutoTokenizer.from_pretrained(tmp)
        except Exception as e:
            raise CorruptFileError(f"{source}: tokenizer files cannot be loaded ({type(e).__name__}: {e})") from None
