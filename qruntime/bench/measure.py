"""Timing of one model configuration: TTFT, per-token decode latency at chosen context lengths,
and the longest context that fits a memory budget.

A decode step at context n (the new token attends over n positions, THEORY.md's latency(n)) is
timed by setting the step's position in device memory and replaying the step: on a GPU the CUDA
graph of the triton backend, timed with CUDA events over `burst` consecutive steps; on a CPU the
torch backend's step, timed with the host clock. The cache's contents do not change the time.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from qruntime.runtime import Model


@dataclass
class Stat:
    mean: float
    std: float
    samples: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, xs: list[float]) -> "Stat":
        return cls(statistics.fmean(xs), statistics.pstdev(xs) if len(xs) > 1 else 0.0, list(xs))


def parse_context_range(spec: str) -> list[int]:
    """"0:8192:512" -> [1, 512, 1024, ..., 8192] (start:stop:step, stop included; 0 means 1)."""
    try:
        start, stop, step = (int(p) for p in spec.split(":"))
    except ValueError:
        raise ValueError(f"--context {spec!r}: expected START:STOP:STEP, e.g. 0:8192:512") from None
    if step <= 0 or stop < start or start < 0:
        raise ValueError(f"--context {spec!r}: need 0 <= START <= STOP and STEP > 0")
    return sorted({max(1, n) for n in range(start, stop + 1, step)})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    """Milliseconds of fn(), with CUDA events on a GPU and the host clock on a CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def decode_latency(model: Model, n: int, repeats: int, burst: int = 8) -> Stat:
    """ms per decode step with about n positions in the cache (median-free: every repeat kept)."""
    if n + burst > model.max_seq_len:
        raise ValueError(f"context {n} + {burst} exceeds the KV cache ({model.max_seq_len})")
    device = model.device
    samples = []
    if model.runner is not None:
        r = model.runner
        r.token.fill_(1)
        r.pos.fill_(n - 1)
        r.seq_len.fill_(n)
        if r.use_graph and r.graph is None:
            r.capture()

        def steps():
            for _ in range(burst):
                r.step()
    else:
        token = torch.ones((1, 1), dtype=torch.long, device=device)

        def steps():
            for i in range(burst):
                model.module(token, model.cache, start=n - 1 + i)
    steps()  # warm-up at this length
    for _ in range(repeats):
        if model.runner is not None:
            model.runner.pos.fill_(n - 1)
            model.runner.seq_len.fill_(n)
        samples.append(_timed(steps, device) / burst)
    return Stat.of(samples)


def time_to_first_token(model: Model, prompt_len: int, repeats: int) -> Stat:
    """ms to prefill `prompt_len` tokens and produce the first token's logits."""
    ids = torch.randint(0, model.config.vocab_size, (prompt_len,), device=model.device)

    def prefill():
        if model.runner is not None:
            model.runner.prefill(ids).argmax()
        else:
            model.module(ids[None], model.cache, start=0, last_only=True).argmax()

    prefill()
    _sync(model.device)
    return Stat.of([_timed(prefill, model.device) for _ in range(repeats)])


def generate_ms_per_token(model, ids: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """ms per decoded token of a Hugging Face model's greedy `generate` (the peer): the median time of
    `repeats` runs of `new_tokens` less the median of `repeats` runs of one token (the prompt's prefill
    and first token), over the remaining tokens; after one full warm-up run. (With a 2-token warm-up
    the first figure of a process was 1.8x the next, 23.2 against 13.1 ms on the H200 for 1B bf16; with
    the full one, three in a row read 14.3 / 12.6 / 15.7 ms: HF's host-bound generate varies that much.)"""
    device = ids.device

    def run(n: int) -> float:
        _sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        _sync(device)
        return time.perf_counter() - t

    run(new_tokens)
    full = statistics.median(run(new_tokens) for _ in range(repeats))
    one = statistics.median(run(1) for _ in range(repeats))
    return (full - one) / (new_tokens - 1) * 1e3


def measure_read_bandwidth(device: torch.device, gib: float = 2.0, repeats: int = 10) -> float:
    """Bytes/s of a large streaming read (x.sum()) on `device`: the card's real ceiling."""
    n = int(gib * 2**30) // 2
    x = torch.empty(n, dtype=torch.float16, device=device).uniform_()
    x.sum()
    _sync(device)
    times = [_timed(lambda: x.sum(), device) for _ in range(repeats)]
    del x
    return n * 2 / (statistics.median(times) / 1e3)
