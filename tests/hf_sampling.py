"""transformers' own sampling filters, the oracle for both samplers' distributions."""

import torch


def hf_filtered(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, penalty: float,
                seen: torch.Tensor) -> torch.Tensor:
    """logits [V] after RepetitionPenalty (on the ids `seen`), Temperature, TopK (0: off) and TopP
    logits processors, in generate's order; removed tokens are -inf."""
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    scores = logits[None].clone()
    ids = seen[None]
    procs = [RepetitionPenaltyLogitsProcessor(penalty), TemperatureLogitsWarper(temperature)]
    procs += [TopKLogitsWarper(top_k)] if top_k else []  # 0 disables top-k (HF refuses 0)
    procs += [TopPLogitsWarper(top_p)]
    for proc in procs:
        scores = proc(ids, scores)
    return scores[0]
