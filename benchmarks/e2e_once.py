"""One decode figure for a process-to-process comparison of two code versions (run alternately):
ms/token of a random-weight model's captured step.

    PYTHONPATH=$(bash benchmarks/stage_package.sh):. python3 benchmarks/e2e_once.py TAG [SPEC] [BITS]
"""
import sys

from bench_decode import time_decode
from gpu_common import synthetic_model

tag = sys.argv[1]
spec = sys.argv[2] if len(sys.argv) > 2 else "synthetic:llama3.1-8b"
bits = int(sys.argv[3]) if len(sys.argv) > 3 else 4
model = synthetic_model(spec, bits)
ms = [time_decode(model, repeats=3) for _ in range(3)]
print(f"{tag} {spec} w{bits}: median {sorted(ms)[1]:.4f} ms/token {['%.4f' % m for m in ms]}", flush=True)
