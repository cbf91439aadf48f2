"""Chooses the decode step's GEMV tiles by end-to-end decode ms/token instead of by each GEMV in
isolation: coordinate descent over a few candidate configs per shape of one model, the others at
their current best, in one process. Prints the "step/" entries to merge into kernels/tuned/<card>.json.

    PYTHONPATH=$(bash benchmarks/stage_package.sh):. python3 benchmarks/e2e_tune.py [--spec SPEC] [--bits 4]
        [--checkpoint DIR --weights w8g32s --candidates JSON]

--checkpoint tunes a packed checkpoint's step instead (e.g. one `qruntime convert` made from
llama.cpp's Q8_0 file), and --weights names the tables' key of the weights whose entries to choose
(kernels.tuning.weights_key: "w8g32s" for Q8_0's int8 g32 symmetric); the decode step asks for a
"step/<weights>/..." entry before any other of its weights.
"""
import argparse
import json
import time

import torch

from bench_decode import time_decode
from gpu_common import checkpoint_model, synthetic_model
from qruntime.kernels import tuning

# candidates per (N, K) of Llama-3.1-8B's decode GEMVs: the isolated sweep's winner first
CANDIDATES = {
    (6144, 4096): [[128, 128, 1, 1], [64, 128, 2, 1], [128, 256, 1, 2]],
    (4096, 4096): [[64, 128, 1, 1], [64, 128, 2, 1], [128, 256, 1, 2]],
    (28672, 4096): [[64, 128, 4, 1], [128, 128, 2, 2], [64, 256, 2, 2]],
    (4096, 14336): [[64, 128, 2, 1], [32, 256, 2, 1], [64, 256, 1, 1]],
}

ap = argparse.ArgumentParser()
ap.add_argument("--spec", default="synthetic:llama3.1-8b")
ap.add_argument("--bits", type=int, default=4)
ap.add_argument("--budget-s", type=float, default=400)
ap.add_argument("--candidates", help='JSON {"N,K": [[BLOCK_N, BLOCK_K, K_ITERS, warps], ...]} instead of CANDIDATES')
ap.add_argument("--set", help='JSON {table key: config} applied first (an earlier round\'s choice)')
ap.add_argument("--checkpoint", help="a packed checkpoint to tune instead of SPEC's random weights")
ap.add_argument("--weights", help='the weights key of the entries to choose (default "w<bits>")')
args = ap.parse_args()
t0 = time.time()
if args.checkpoint:
    model = checkpoint_model(args.checkpoint)
    what = args.checkpoint
else:
    model = synthetic_model(args.spec, args.bits)
    what = f"{args.spec} w{args.bits}"
weights = args.weights or f"w{args.bits}"
table = tuning._table_for(torch.device("cuda"))
table.update(json.loads(args.set) if args.set else {})
candidates = ({tuple(map(int, key.split(","))): v for key, v in json.loads(args.candidates).items()}
              if args.candidates else CANDIDATES)


def measure() -> float:
    model.runner.graph = None
    return time_decode(model, repeats=3)


before = best = measure()
print(f"{what} current table: {best:.4f} ms/token", flush=True)
chosen = {}
for (n, k), alternatives in candidates.items():
    key = f"step/{weights}/m1/n{n}/k{k}"  # the decode step's entry (kernels.tuning)
    current = table.get(key)  # None: the lookup's other entries stand
    for alt in alternatives:
        if time.time() - t0 > args.budget_s:
            break
        table[key] = alt + ["packed"]
        ms = measure()
        print(f"  {key} {alt}: {ms:.4f} ms/token (best so far {best:.4f} with {current})", flush=True)
        if ms < best * 0.997:  # a gain beyond run noise
            best, current = ms, table[key]
    if current is None:
        table.pop(key, None)
    else:
        table[key] = chosen[key] = current
after = measure()
print(f"{what} after: {after:.4f} ms/token ({100 * (after / before - 1):+.1f}%)")
print(json.dumps(chosen))
