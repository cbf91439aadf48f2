"""GPU check of the engine's static cache sized from a memory budget and of the chunked prefill
(qruntime.memory, TritonRunner.prefill's pieces). Run from benchmarks/ with the staged package:

    PYTHONPATH=zz_pkg:. python3 check_memory_budget.py

1. An 8B-shaped 2-layer w4 model: a 6000-token prompt prefilled in pieces of 2048 and at once,
   logits (last row) compared, and each's time to the first token (median of 3).
2. The full 8B w4 model loaded with memory_budget=8GB: the cache it gets, then a prefill of
   max_seq_len - 100 tokens and 64 decode steps; torch's peak allocated and reserved bytes
   against the budget (the 1 GiB workspace is meant to hold them).
"""
import statistics
import time

import torch

import qruntime
from gpu_common import environment
from qruntime.synthetic import synthetic_checkpoint


def ttft(runner, ids, chunk):
    runner.prefill_chunk = chunk
    times = []
    for _ in range(4):
        torch.cuda.synchronize(); t = time.perf_counter()
        out = runner.prefill(ids)
        torch.cuda.synchronize(); times.append(time.perf_counter() - t)
    return out, statistics.median(times[1:])


def main():
    print(environment(), flush=True)
    ckpt = synthetic_checkpoint("synthetic:llama3.1-8b", bits=4, num_layers=2, dtype=torch.bfloat16)
    model = qruntime.Model(ckpt, device="cuda", backend="triton", dtype=torch.bfloat16, max_seq_len=8192)
    ids = torch.randint(0, model.config.vocab_size, (6000,), device="cuda")
    whole, t_whole = ttft(model.runner, ids, 10**9)
    pieces, t_pieces = ttft(model.runner, ids, 2048)
    rel = ((whole - pieces).norm() / whole.norm()).item()
    print(f"2-layer 8B w4, 6000-token prompt: last-row logits rel diff pieces vs whole {rel:.2e}; "
          f"prefill {1e3 * t_whole:.1f} ms whole, {1e3 * t_pieces:.1f} ms in pieces of 2048", flush=True)
    del model, ckpt
    torch.cuda.empty_cache()

    budget = 8e9
    ckpt = synthetic_checkpoint("synthetic:llama3.1-8b", bits=4, dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()  # the checkpoint itself, on the GPU before the model takes it
    model = qruntime.Model(ckpt, device="cuda", backend="triton", dtype=torch.bfloat16, memory_budget=budget,
                           consume=True)
    del ckpt
    torch.cuda.empty_cache()
    report = model.memory_report()
    print(f"8B w4, budget {budget / 1e9:.1f} GB: max_seq_len {model.max_seq_len} (room for "
          f"{report['budget_max_seq_len']}), weights {report['weights_bytes'] / 1e9:.3f} GB, cache "
          f"{report['kv_cache_bytes'] / 1e9:.3f} GB, allocated {torch.cuda.memory_allocated() / 1e9:.3f} GB "
          f"(checkpoint before load {base / 1e9:.3f} GB)", flush=True)
    torch.cuda.reset_peak_memory_stats()
    prompt = torch.randint(0, model.config.vocab_size, (model.max_seq_len - 100,)).tolist()
    model.eos_ids = set()
    t = time.perf_counter()
    out = list(model.generate_ids(prompt, 64))
    torch.cuda.synchronize()
    print(f"prefill {len(prompt)} tokens + 64 steps in {time.perf_counter() - t:.1f} s ({len(out)} tokens); peak "
          f"allocated {torch.cuda.max_memory_allocated() / 1e9:.3f} GB, peak reserved "
          f"{torch.cuda.max_memory_reserved() / 1e9:.3f} GB, budget {budget / 1e9:.1f} GB", flush=True)


if __name__ == "__main__":
    main()
