"""What each of the decode step's launches costs where it runs: ms/token of the captured step with
one kind of launch left out (or replaced), all variants in one process, in rounds, so that run
noise cancels. The outputs of an ablated step are meaningless; only its time is read. A launch's
cost in place (with PDL, beside its neighbours) is what removing it saves, not its time alone.

    PYTHONPATH=$(bash benchmarks/stage_package.sh):. python3 benchmarks/ablate_step.py [--spec SPEC] [--rounds 3]
"""
import argparse

import torch

import qruntime.engine.triton_runner as runner_mod
from bench_decode import time_decode
from gpu_common import environment, measure_read_bandwidth, synthetic_model


def _noop(*args, **kwargs):
    return None


# each part a variant can leave out that is a method of one of a layer's linears: (the linear, the method)
_METHODS = {"qkv": (lambda lw: lw.qkv[0], "accumulate_deferred_norm"),
            "oproj": (lambda lw: lw.o, "accumulate_attention"),
            "gateup": (lambda lw: lw.gate_up[0], "accumulate_deferred_norm"),
            "down": (lambda lw: lw.down, "accumulate_swiglu")}


def apply(r, variant: str, real: dict) -> None:
    """Restores the real step, then leaves out what `variant` names (a '+'-joined list)."""
    runner_mod.flash_decode_splits = real["fd"]
    for lw in r.layers:  # the instance attributes set below shadow the class's methods: drop them
        for linear, name in _METHODS.values():
            vars(linear(lw)).pop(name, None)
    parts = set(variant.split("+")) - {"base"}
    if "fd" in parts:  # o_proj merges whatever the workspace holds
        runner_mod.flash_decode_splits = lambda *a, workspace, **k: workspace
    for lw in r.layers:
        for part in parts & _METHODS.keys():
            linear, name = _METHODS[part]
            setattr(linear(lw), name, _noop)
        if "oproj_plain" in parts:  # a plain GEMV of a static input instead: the merge's share
            lw.o.accumulate_attention = (lambda o: lambda splits, out, *rest: o.accumulate(real["x"], out))(lw.o)
    r.graph = None


ap = argparse.ArgumentParser()
ap.add_argument("--spec", default="synthetic:llama3.1-8b")
ap.add_argument("--bits", type=int, default=4)
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--variants", default="base,fd,oproj,fd+oproj,oproj_plain,qkv,gateup,down")
args = ap.parse_args()

print(environment(), flush=True)
bandwidth = measure_read_bandwidth()
print(f"read bandwidth (x.sum() of 2 GiB): {bandwidth / 1e12:.3f} TB/s", flush=True)
model = synthetic_model(args.spec, args.bits, max_seq_len=512)
r = model.runner
if not (r.fused_merge and r.defer_attention_norm and r.defer_mlp_norm and r.fused_swiglu):
    raise SystemExit("ablate_step: expects the default fused step (merge in o_proj, deferred norms, fused SwiGLU)")
real = dict(fd=runner_mod.flash_decode_splits,
            x=torch.randn(1, r.cfg.num_heads * r.cfg.head_dim, device="cuda", dtype=torch.float16))
variants = args.variants.split(",")
results = {v: [] for v in variants}
for _ in range(args.rounds):
    for v in variants:
        apply(r, v, real)
        results[v].append(time_decode(model, repeats=3))
        print(f"{args.spec} w{args.bits} without {v}: {results[v][-1]:.4f} ms/token", flush=True)
apply(r, "base", real)
base = sorted(results["base"])[len(results["base"]) // 2] if "base" in results else None
layers = r.cfg.num_layers
# each GEMV's floor: the bytes it reads (words, scales, zeros) over the measured bandwidth
floors = dict(qkv=[l for lw in r.layers for l in lw.qkv], oproj=[lw.o for lw in r.layers],
              gateup=[l for lw in r.layers for l in lw.gate_up], down=[lw.down for lw in r.layers])
for v, ms in results.items():
    med = sorted(ms)[len(ms) // 2]
    saved = f"; saves {(base - med) * 1e3:.1f} us/token, {(base - med) * 1e3 / layers:.2f} us/layer" if base else ""
    if v in floors:
        saved += f" (floor {sum(l.nbytes() for l in floors[v]) / bandwidth * 1e6 / layers:.2f} us/layer)"
    print(f"{args.spec} w{args.bits} without {v}: median {med:.4f} ms/token{saved}")
