"""The generation loop (prefill, then one token at a time) and streaming text decoding."""

from __future__ import annotations

from typing import Iterator

import torch

from qruntime.engine.kv_cache import KVCache
from qruntime.engine.sampler import Sampler
from qruntime.model import Transformer


def generate_tokens(
    model: Transformer,
    cache: KVCache,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampler: Sampler,
    eos_ids: set[int],
) -> Iterator[int]:
    """Yields new token ids; stops after an EOS id (which is yielded) or max_new_tokens."""
    device = cache.k.device
    seen = torch.tensor(prompt_ids, device=device, dtype=torch.long)
    logits = model(seen[None], cache, start=0, last_only=True)[0, -1]
    pos = len(prompt_ids)
    for i in range(max_new_tokens):
        token = sampler(logits, seen)
        yield token
        if token in eos_ids or i == max_new_tokens - 1:
            return
        seen = torch.cat([seen, seen.new_tensor([token])])
        logits = model(seen[None, -1:], cache, start=pos)[0, -1]
        pos += 1


class TextDeltas:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.ids, self.emitted = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta, self.emitted = text[len(self.emitted):], text
        return delta
