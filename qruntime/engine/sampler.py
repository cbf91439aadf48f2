"""Token sampling with transformers' semantics and order:
repetition penalty -> temperature -> top-k -> top-p -> draw (or argmax when greedy)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qruntime.errors import InvalidOptionError
from qruntime.kernels.reference import repetition_penalty


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy. top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise InvalidOptionError(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise InvalidOptionError(f"top_k={self.top_k} must be >= 0 (0 disables it)")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidOptionError(f"top_p={self.top_p} must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise InvalidOptionError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1.0 disables it)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Draws tokens on the logits' device with torch ops (the torch backend's sampler, and the
    reference semantics); `draw` returns a device tensor without waiting for the device, `__call__`
    the int. The triton backend draws with kernels.sampling instead (same filters, no sort), keyed
    by this sampler's seed (`generator.initial_seed()`)."""

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor) -> int:
        """logits: [vocab] float32; seen: [n] ids of the prompt and generated tokens so far."""
        penalized = self.params.repetition_penalty != 1.0  # else draw does not read the mask
        return int(self.draw(logits, self.seen_mask(seen, logits.numel()) if penalized else None))

    @staticmethod
    def seen_mask(seen: torch.Tensor, vocab: int) -> torch.Tensor:
        """[vocab] bool, True at the ids in `seen` (what the repetition penalty reads)."""
        mask = torch.zeros(vocab, dtype=torch.bool, device=seen.device)
        mask[seen] = True
        return mask

    def draw(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """The next token, a [1] long tensor on the logits' device. logits: [vocab] float32; seen:
        seen_mask's [vocab] mask (None when the penalty is off: it is not read then)."""
        p = self.params
        logits = logits.float()  # the race below needs E's fp32 range (fp16 would round small E to 0)
        if p.repetition_penalty != 1.0:
            logits = repetition_penalty(logits, seen, p.repetition_penalty)
        if p.greedy:
            return torch.argmax(logits).view(1)
        logits = logits / p.temperature
        if p.top_k > 0:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=False)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            remove = cum <= 1 - p.top_p
            remove[-1] = False  # always keep the most likely token
            logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
        probs = logits.softmax(-1)
        # the exponential race: argmax(p_i / E_i), E_i ~ Exp(1), is token i with probability p_i
        # (torch.multinomial draws the same distribution, but on a GPU it synchronizes with the host:
        # vLLM's sampler and gpt-fast draw this way for that reason). E is kept off 0 so that a
        # removed token (p = 0) never ties a kept one.
        race = torch.empty_like(probs).exponential_(generator=self.generator).clamp_min_(1e-20)
        return torch.argmax(probs / race).view(1)
