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


def reference_logits(path: Path, ckpt, ids: torch.Tensor) -> torch.Tensor:
    """HF's model (fp32) with every linear replaced by the dequantization of our packed weight
    and every dense tensor by the checkpoint's (AWQ folds scales into the norms)."""
    from qruntime.kernels.reference import dequantize_original_order

    hf = hf_model(path)
    state = hf.state_dict()
    for name, lin in ckpt.linears.items():
        state[f"{name}.weight"] = dequantize_original_order(lin)
        if lin.bias is not None:
            state[f"{name}.bias"] = lin.bias.float()
    for name, t in ckpt.dense.items():
        state[name] = t.float()
    if "lm_head" in ckpt.linears and hf.config.tie_word_embeddings:
        hf.config.tie_word_embeddings = False  # the quantized lm_head is a separate copy
        hf.lm_head.weight = torch.nn.Parameter(hf.lm_head.weight.detach().clone())
    hf.load_state_dict(state, strict=False)
    with torch.no_grad():
        return hf(ids[None]).logits[0].float()
