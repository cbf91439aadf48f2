"""GPU check and timing of kernels.sampling (the triton backend's draw) at a 128256-word vocabulary:
its tokens and thresholds against kernels.reference on the CPU, its distribution against
transformers' filters (4000 draws replayed in a graph), and microseconds per draw against the
torch Sampler.draw it replaced.    cd benchmarks && PYTHONPATH=PKG:. python3 bench_sampling.py
"""
import os
import sys

import torch
from gpu_common import environment, us_per_call
from qruntime.engine.sampler import Sampler, SamplingParams
from qruntime.kernels import reference as R
from qruntime.kernels.sampling import SamplingPlan, sample_token, sampling_workspace
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from hf_sampling import hf_filtered  # noqa: E402  (transformers' filters, the tests' oracle)

print(environment(), flush=True)
dev = torch.device("cuda")
V = 128256

PLANS = {"T0.6 top-p 0.9 (Llama 3)": SamplingParams(temperature=0.6, top_p=0.9),
         "T0.7 top-k 50 top-p 0.95 rep 1.1": SamplingParams(temperature=0.7, top_k=50, top_p=0.95, repetition_penalty=1.1),
         "T1.0": SamplingParams(temperature=1.0),
         "T1.0 top-k 40": SamplingParams(temperature=1.0, top_k=40),
         "T1.5 top-p 0.99": SamplingParams(temperature=1.5, top_p=0.99),
         "greedy rep 1.3": SamplingParams(repetition_penalty=1.3)}
logits = torch.randn(V, device=dev) * 2.5
seen = torch.zeros(V, dtype=torch.bool, device=dev); seen[torch.randint(0, V, (300,), device=dev)] = True
token = torch.zeros(1, dtype=torch.long, device=dev)
print("\n## correctness: GPU chain vs CPU reference (5 draws each)")
for name, p in PLANS.items():
    plan = SamplingPlan.from_params(p, V)
    ws = sampling_workspace(V, dev, seed=99)
    same_tok = same_thr = 0
    for step in range(5):
        mask = seen.clone()
        sample_token(logits, token, ws, plan, mask if plan.penalized else None)
        ref = R.sample_token(logits.cpu(), plan, 99, step, seen.cpu())
        same_tok += int(token) == ref
        if plan.top_k or plan.top_p < 1:
            thr = R.sampling_threshold(R.sampling_scaled_logits(logits.cpu(), plan, seen.cpu()), plan)
            same_thr += ws.threshold == thr
        else:
            same_thr += 1
    kept = (R.sampling_scaled_logits(logits.cpu(), plan, seen.cpu()).double() >= R.sampling_threshold(R.sampling_scaled_logits(logits.cpu(), plan, seen.cpu()), plan)).sum().item() if (plan.top_k or plan.top_p < 1) else V
    print(f"- {name}: tokens equal {same_tok}/5, thresholds equal {same_thr}/5, kept tokens {kept}", flush=True)

print("\n## distribution on the GPU (V=50, 4000 draws in a graph) vs transformers")
for t, k, pp, r in [(0.7, 10, 0.9, 1.3), (1.3, 0, 0.5, 1.0), (1.0, 3, 1.0, 0.8), (2.0, 20, 0.95, 1.2)]:
    l50 = torch.randn(50, generator=torch.Generator().manual_seed(0))
    sids = torch.tensor([1, 5, 7, 7]); m50 = torch.zeros(50, dtype=torch.bool); m50[sids] = True
    ref = hf_filtered(l50, t, k, pp, r, sids).softmax(-1)
    plan = SamplingPlan.from_params(SamplingParams(t, k, pp, r), 50)
    ws = sampling_workspace(50, dev, seed=1); lg = l50.to(dev); mg = m50.to(dev)
    work = mg.clone()
    sample_token(lg, token, ws, plan, work)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        sample_token(lg, token, ws, plan, work)
    toks = torch.empty(4000, dtype=torch.long, device=dev)
    for i in range(4000):
        work.copy_(mg); g.replay(); toks[i:i+1].copy_(token)
    counts = torch.bincount(toks.cpu(), minlength=50).float()
    print(f"- T{t} k{k} p{pp} r{r}: kept {int((ref > 0).sum())}, removed drawn {int(counts[ref == 0].sum())}, max |freq - p| {(counts / 4000 - ref).abs().max():.4f}", flush=True)

print("\n## time per draw at V=128256 (us, median of 5 x 300)\n\n| plan | torch Sampler.draw, eager | kernels.sampling, eager | kernels.sampling, CUDA graph |\n|---|---|---|---|")
for name, p in PLANS.items():
    plan = SamplingPlan.from_params(p, V)
    s = Sampler(p, dev); sm = seen if plan.penalized else None
    t_old = us_per_call(lambda: token.copy_(s.draw(logits, sm)))
    ws = sampling_workspace(V, dev, seed=1); work = seen.clone()
    wm = work if plan.penalized else None
    t_eager = us_per_call(lambda: sample_token(logits, token, ws, plan, wm))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        sample_token(logits, token, ws, plan, wm)
    t_graph = us_per_call(g.replay)
    print(f"| {name} | {t_old:.1f} | {t_eager:.1f} | {t_graph:.1f} |", flush=True)
