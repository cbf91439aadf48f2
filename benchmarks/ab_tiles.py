"""Two tile configs of one decode GEMV shape alternated in one process (A, B, A, B, ...): whether a
sweep's winner beats the table's entry by more than the run-to-run drift, before it goes into a
card's table. A sweep picks the least of some 40-150 noisy timings, so its margin over the
entry it replaces is biased in the winner's favour.

    PYTHONPATH=$(bash benchmarks/stage_package.sh):. python3 benchmarks/ab_tiles.py [--m 16] [--rounds 5] \
        --pair BITS K N "(64, 6, 3, 2, 'tma-stream+scales')" "(128, 2, 2, 4, 'ws-tma-stream+scales')" [--pair ...]

Timing as bench_gemv.py (one graph of PDL launches over rotating buffers beyond L2; g128, integer
zero points unless --group / --zeros say otherwise); prints each config's median and every round.
"""
import argparse
import ast
import statistics

import torch

from gpu_common import gemv_workload, measure_read_bandwidth, time_graph
from qruntime.kernels.qmatmul import qmatmul_accumulate

ap = argparse.ArgumentParser()
ap.add_argument("--pair", nargs=5, action="append", required=True, metavar=("BITS", "K", "N", "CFG_A", "CFG_B"))
ap.add_argument("--m", type=int, default=1)
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--group", type=int, default=128)
ap.add_argument("--zeros", default="int", choices=("int", "symmetric", "float"))
args = ap.parse_args()

bw = measure_read_bandwidth()
print(f"# read bandwidth {bw / 1e12:.3f} TB/s", flush=True)
for bits, k, n, cfg_a, cfg_b in args.pair:
    bits, k, n = int(bits), int(k), int(n)
    pair = [tuple(ast.literal_eval(cfg_a)), tuple(ast.literal_eval(cfg_b))]
    lins, xs, outs, need = gemv_workload(k, n, args.m, bits, group=args.group, zero_mode=args.zeros)
    times = {cfg: [] for cfg in pair}
    for _ in range(args.rounds):
        for cfg in pair:
            times[cfg].append(time_graph([lambda i=i: qmatmul_accumulate(xs[i], lins[i], outs[i], config=cfg)
                                          for i in range(len(lins))]))
    for tag, cfg in zip("AB", pair):
        t = statistics.median(times[cfg])
        print(f"w{bits} g{args.group} {args.zeros} M={args.m} K={k:6d} N={n:6d} {tag} {str(cfg):42s} median "
              f"{t * 1e6:7.2f} us {100 * need / t / bw:5.1f}%  (rounds: {' '.join(f'{x * 1e6:.2f}' for x in times[cfg])})",
              flush=True)
    del lins, xs, outs
    torch.cuda.empty_cache()
