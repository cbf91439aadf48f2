"""`qruntime eval`: perplexity with llama.cpp's protocol and KL divergence against a base model.

Protocol (llama.cpp `examples/perplexity/perplexity.cpp`, `perplexity()`): tokenize the whole text
once; cut it into non-overlapping chunks of n_ctx tokens (the incomplete tail is dropped); the
first token of each chunk is replaced by BOS when the tokenizer adds one; each chunk is evaluated
alone, and only its second half is scored: with first = n_ctx / 2, the logits at positions
j = first .. n_ctx - 2 predict tokens j + 1. So every scored token has at least n_ctx / 2 tokens of
context, and numbers are comparable with llama.cpp's for the same n_ctx.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from qruntime.errors import InvalidOptionError


def _tokens(model, text_or_ids) -> list[int]:
    if isinstance(text_or_ids, str):
        if model.tokenizer is None:
            raise InvalidOptionError("this model has no tokenizer; pass token ids instead of text")
        return model.tokenizer.encode(text_or_ids, add_special_tokens=True)
    return list(text_or_ids)


def _chunks(model, ids: list[int], ctx: int, max_chunks: int | None) -> list[list[int]]:
    if ctx < 4 or ctx % 2:
        raise InvalidOptionError(f"ctx={ctx}: use an even chunk length >= 4 (llama.cpp uses 512)")
    n = len(ids) // ctx
    if n == 0:
        raise InvalidOptionError(f"the text has {len(ids)} tokens; perplexity with ctx={ctx} needs at least {ctx}")
    if max_chunks:
        n = min(n, max_chunks)
    # llama.cpp puts BOS first only when the vocabulary adds one (add_bos): Llama does, Qwen does not.
    # A tokenizer adds it if its own encoding of the text already starts with it.
    bos = getattr(model.tokenizer, "bos_token_id", None) if model.tokenizer is not None else None
    if bos is not None and (not ids or ids[0] != bos):
        bos = None
    out = []
    for c in range(n):
        chunk = ids[c * ctx:(c + 1) * ctx]
        if bos is not None:
            chunk = [bos] + chunk[1:]
        out.append(chunk)
    return out


def _scored(logits: torch.Tensor, chunk: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """log-probabilities [n_scored, vocab] and targets [n_scored] of a chunk's second half."""
    first = len(chunk) // 2
    logp = torch.log_softmax(logits[first:len(chunk) - 1].float(), dim=-1)
    target = torch.tensor(chunk[first + 1:], device=logp.device)
    return logp, target


def _iterate(chunks: list[list[int]], progress: bool) -> Iterator[list[int]]:
    return iter(tqdm(chunks, desc="chunks", unit="chunk", disable=not progress))


def perplexity(model, text_or_ids, ctx: int = 512, max_chunks: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Perplexity of `model` on a text (llama.cpp protocol, see module doc)."""
    chunks = _chunks(model, _tokens(model, text_or_ids), ctx, max_chunks)
    nll = []
    for chunk in _iterate(chunks, progress):
        logp, target = _scored(model.logits(chunk), chunk)
        nll.append(-logp.gather(1, target[:, None])[:, 0].double().cpu())
    nll_all = torch.cat(nll)
    mean = nll_all.mean().item()
    stderr = (nll_all.std(unbiased=True) / math.sqrt(nll_all.numel())).item() if nll_all.numel() > 1 else 0.0
    return {"ppl": math.exp(mean), "nll_mean": mean, "nll_stderr": stderr, "ppl_stderr": math.exp(mean) * stderr,
            "ctx": ctx, "chunks": len(chunks), "tokens_scored": nll_all.numel()}


def kl_divergence(model, base_model, text_or_ids, ctx: int = 512, max_chunks: int | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """KL(base || model) per scored position (mean, median, 99th percentile), top-1 agreement and
    both perplexities, on the same chunks as `perplexity`."""
    if model.config.vocab_size != base_model.config.vocab_size:
        raise InvalidOptionError(f"vocabularies differ ({model.config.vocab_size} vs {base_model.config.vocab_size}): "
                                 "KL divergence needs the same tokenizer")
    ids = _tokens(base_model if base_model.tokenizer is not None else model, text_or_ids)
    chunks = _chunks(base_model, ids, ctx, max_chunks)
    kls, agree, nll, nll_base = [], [], [], []
    for chunk in _iterate(chunks, progress):
        logp, target = _scored(model.logits(chunk), chunk)
        logq, _ = _scored(base_model.logits(chunk), chunk)
        logq = logq.to(logp.device)
        kls.append((logq.exp() * (logq - logp)).sum(-1).double().cpu())
        agree.append((logp.argmax(-1) == logq.argmax(-1)).cpu())
        nll.append(-logp.gather(1, target[:, None])[:, 0].double().cpu())
        nll_base.append(-logq.gather(1, target[:, None])[:, 0].double().cpu())
    kl = torch.cat(kls)
    return {"kl_mean": kl.mean().item(), "kl_median": kl.median().item(), "kl_p99": torch.quantile(kl, 0.99).item(),
            "top1_agreement": torch.cat(agree).float().mean().item(),
            "ppl": math.exp(torch.cat(nll).mean().item()), "ppl_base": math.exp(torch.cat(nll_base).mean().item()),
            "ctx": ctx, "chunks": len(chunks), "tokens_scored": kl.numel()}
