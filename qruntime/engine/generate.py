"""The generation loop (prefill, then one token at a time) and streaming text decoding."""

from __future__ import annotations

import time
from dataclasses import dataclass
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


@dataclass
class GenerationStats:
    """Wall-clock timing of one generation, as llama.cpp prints it: the prompt's prefill (until the
    first new token) and the decode after it. Filled by `count` as the tokens are drawn from it."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    start: float | None = None   # the first request for a token: the prefill starts
    first: float | None = None   # the first new token is out
    end: float | None = None     # the last new token is out

    def count(self, tokens: Iterator[int]) -> Iterator[int]:
        # generators are lazy: this runs at the first next(), when the prefill starts
        self.start, self.first, self.end, self.new_tokens = time.perf_counter(), None, None, 0
        for token in tokens:
            now = time.perf_counter()
            if self.first is None:
                self.first = now
            self.new_tokens += 1
            self.end = now
            yield token

    def summary(self) -> str:
        """One line: prefill speed and time to the first token; decode speed over the tokens after it
        (the triton backend reads tokens back in groups of 8, so it is measured over the whole run)."""
        if self.first is None:
            return "no tokens generated"
        prefill = self.first - self.start
        line = (f"prompt: {self.prompt_tokens} tokens, first token after {1e3 * prefill:.1f} ms "
                f"({self.prompt_tokens / prefill:.1f} tokens/s)")
        decode = self.end - self.first
        if self.new_tokens > 1 and decode > 0:
            line += (f"; generation: {self.new_tokens} tokens, {1e3 * decode / (self.new_tokens - 1):.2f} ms/token "
                     f"({(self.new_tokens - 1) / decode:.1f} tokens/s) after the first")
        return line
