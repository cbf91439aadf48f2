"""Tiny random checkpoints for the tests (built with transformers' own classes; see qruntime.demo)."""

from __future__ import annotations

from pathlib import Path

import torch

from qruntime.demo import TINY_VOCAB as VOCAB  # noqa: F401  (re-exported for the tests)
from qruntime.demo import build_tiny_model as build_model  # noqa: F401


def hf_model(path: Path, dtype=torch.float32):
    """The same checkpoint loaded by HF transformers, our oracle."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
