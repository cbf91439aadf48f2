"""A/B of versions of kernels.sampling in one process: us per draw in a CUDA graph at a 128256-word
vocabulary, over logits of several shapes, each version after the first (the baseline) checked
against kernels.reference on the CPU (tokens and thresholds of 5 draws; whether its candidates served
them, where it has them).

The other versions are copies of the module staged beside it, e.g. the last commit's:

    bash benchmarks/stage_package.sh $PWD/benchmarks/zz_pkg
    git show HEAD:kernels/sampling.py > benchmarks/zz_pkg/qruntime/kernels/sampling_old.py
    cd benchmarks && PYTHONPATH=zz_pkg:. python3 ab_sampling.py qruntime.kernels.sampling_old qruntime.kernels.sampling
"""
from __future__ import annotations

import argparse
import importlib
import math

import torch

from gpu_common import environment, us_per_call
from qruntime.engine.sampler import SamplingParams
from qruntime.kernels import reference as R

V = 128256
PLANS = {"T0.6 top-p 0.9 (Llama 3)": SamplingParams(temperature=0.6, top_p=0.9),
         "T0.7 top-k 20 top-p 0.8 (Qwen2.5)": SamplingParams(temperature=0.7, top_k=20, top_p=0.8),
         "T0.7 top-k 50 top-p 0.95 rep 1.1": SamplingParams(temperature=0.7, top_k=50, top_p=0.95,
                                                            repetition_penalty=1.1),
         "T1.0 top-k 40": SamplingParams(temperature=1.0, top_k=40),
         "T1.0 top-p 0.95": SamplingParams(temperature=1.0, top_p=0.95)}


def logits_of(kind: str, dev) -> torch.Tensor:
    """Random logits: "flat" (random-weight models: all tokens within a few units), "peaked" (a
    clear top token over a flat rest), "zipf" (log-linear in rank, as trained LMs' heads roughly
    are), "wide-head" (800 tokens within 2 of the max over a flat rest)."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(V, generator=g)
    if kind == "flat":
        x = noise * 1.0
    elif kind == "peaked":
        x = noise * 1.5
        x[torch.randperm(V, generator=g)[:3]] = torch.tensor([18.0, 15.0, 14.0])
    elif kind == "zipf":
        rank = torch.randperm(V, generator=g).double() + 1
        x = (-2.2 * rank.log() + 0.3 * noise.double()).float() + 25
    elif kind == "wide-head":
        x = noise * 1.0
        x[torch.randperm(V, generator=g)[:800]] = 12.0 + 2.0 * torch.rand(800, generator=g)
    else:
        raise ValueError(kind)
    return x.to(dev)


def graph_us(mod, logits, plan, seen) -> float:
    ws = mod.sampling_workspace(V, logits.device, seed=1)
    token = torch.zeros(1, dtype=torch.long, device=logits.device)
    work = seen.clone() if plan.penalized else None
    mod.sample_token(logits, token, ws, plan, work)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        mod.sample_token(logits, token, ws, plan, work)
    return us_per_call(g.replay)


def check(mod, logits, plan, seen) -> str:
    ws = mod.sampling_workspace(V, logits.device, seed=99)
    token = torch.zeros(1, dtype=torch.long, device=logits.device)
    tokens = thresholds = served = 0
    scaled = R.sampling_scaled_logits(logits.cpu(), plan, seen.cpu())
    threshold = R.sampling_threshold(scaled, plan)
    for step in range(5):
        sample_token_seen = seen.clone()
        mod.sample_token(logits, token, ws, plan, sample_token_seen if plan.penalized else None)
        tokens += int(token) == R.sample_token(logits.cpu(), plan, 99, step, seen.cpu())
        thresholds += ws.threshold == threshold
        served += bool(getattr(ws, "drew_from_candidates", False))
    kept = int((scaled >= threshold).sum())
    return f"tokens {tokens}/5, thresholds {thresholds}/5, candidates served {served}/5, kept {kept}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("modules", nargs="+", help="module paths of the versions; the first is the baseline")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    mods = [importlib.import_module(m) for m in args.modules]
    names = [m.rsplit(".", 1)[-1] for m in args.modules]
    print(environment(), flush=True)
    dev = torch.device("cuda")
    seen = torch.zeros(V, dtype=torch.bool, device=dev)
    seen[torch.randint(0, V, (300,), generator=torch.Generator().manual_seed(1)).to(dev)] = True
    print("\nus per draw (best of the rounds' medians), and each version's time over the baseline's\n")
    print("| logits | plan | " + " | ".join(f"{n} us" for n in names) + " | " + " | ".join(f"{n}/{names[0]}" for n in names[1:])
          + " | checked against the reference |")
    print("|---" * (2 + 2 * len(names)) + "|")
    ratios = [[] for _ in names[1:]]
    for kind in ("flat", "peaked", "zipf", "wide-head"):
        logits = logits_of(kind, dev)
        for name, params in PLANS.items():
            plan = mods[0].SamplingPlan.from_params(params, V)
            times = [[] for _ in mods]
            for _ in range(args.rounds):  # alternated, so drift hits all alike
                for t, mod in zip(times, mods):
                    t.append(graph_us(mod, logits, plan, seen))
            best = [min(t) for t in times]
            for r, b in zip(ratios, best[1:]):
                r.append(b / best[0])
            checks = "; ".join(f"{n}: {check(mod, logits, plan, seen)}" for n, mod in zip(names[1:], mods[1:]))
            print(f"| {kind} | {name} | " + " | ".join(f"{b:.1f}" for b in best) + " | "
                  + " | ".join(f"{b / best[0]:.2f}" for b in best[1:]) + f" | {checks} |", flush=True)
    for n, r in zip(names[1:], ratios):
        print(f"\ngeometric mean {n}/{names[0]}: {math.exp(sum(map(math.log, r)) / len(r)):.3f}")


if __name__ == "__main__":
    main()
