"""ms/token of Model.generate_ids, greedy and sampled, on random 1B / 8B w4 models (triton backend),
128-token prompt, 256 new tokens, the first token's time taken off. For an A/B of two versions of
the sampling path, run it under a staged package of each (stage_package.sh, then the other
version's files copied in), alternating processes:

    cd benchmarks && PYTHONPATH=PKG:. python3 time_sampling.py TAG [--lm-head-scale 8]

A random model's logits are flat (every token within a few units of the max), which no trained
model's are at most steps; --lm-head-scale multiplies lm_head's scales (its logits), so that a few
tokens stand out, as in a trained model's confident steps.
"""
import argparse
import statistics
import time

import torch

from gpu_common import synthetic_model
from qruntime.engine.sampler import SamplingParams

CASES = [("greedy", SamplingParams()),
         ("T0.6 top-p 0.9 (Llama 3 default)", SamplingParams(temperature=0.6, top_p=0.9, seed=0)),
         ("T0.7 top-k 50 top-p 0.95 rep 1.1", SamplingParams(temperature=0.7, top_k=50, top_p=0.95,
                                                             repetition_penalty=1.1, seed=0))]


def ms_per_token(model, params, prompt_len=128, new=256, repeats=3):
    ids = torch.randint(0, model.config.vocab_size, (prompt_len,)).tolist()
    model.eos_ids = set()

    def run(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = list(model.generate_ids(ids, n, params))
        torch.cuda.synchronize()
        assert len(out) == n
        return time.perf_counter() - t

    run(new)
    full = statistics.median(run(new) for _ in range(repeats))
    one = statistics.median(run(1) for _ in range(repeats))
    return (full - one) / (new - 1) * 1e3


ap = argparse.ArgumentParser()
ap.add_argument("tag", nargs="?", default="run")
ap.add_argument("--lm-head-scale", type=float, default=1.0)
args = ap.parse_args()
for spec in ("synthetic:llama3.2-1b", "synthetic:llama3.1-8b"):
    model = synthetic_model(spec, 4, max_seq_len=512, lm_head_scale=args.lm_head_scale)
    for name, params in CASES:
        print(f"{args.tag} {spec} w4 lm_head x{args.lm_head_scale:g} {name}: {ms_per_token(model, params):.4f} ms/token",
              flush=True)
    del model
    torch.cuda.empty_cache()
