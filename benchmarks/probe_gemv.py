"""Ceiling probe for the decode GEMV: how fast can a kernel with the GEMV's grid and tile shape
only READ the packed words (no dequant, no math but an integer sum)? Its achieved bandwidth is the
most any GEMV of that structure can reach, so it separates a memory-structure limit from an
instruction limit. Also a looped variant (TILES tiles per program, Triton's pipeliner at STAGES).

    PYTHONPATH=$(bash benchmarks/stage_package.sh):. python3 benchmarks/probe_gemv.py --out DIR
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch
import triton
import triton.language as tl

from gpu_common import dump, environment, measure_read_bandwidth, time_graph
from qruntime.kernels.pdl import pdl_launch, release_dependents, wait_for_producer


@triton.jit
def _read_words(w_ptr, out_ptr, stride, PDL: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
                TILES: tl.constexpr, STAGES: tl.constexpr):
    release_dependents(PDL)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r0 = tl.program_id(1) * ROWS * TILES
    acc = tl.zeros([BLOCK_N], dtype=tl.int32)
    for t in tl.range(0, TILES, num_stages=STAGES):
        r = r0 + t * ROWS + tl.arange(0, ROWS)
        acc += tl.sum(tl.load(w_ptr + r[:, None] * stride + n[None, :]), axis=0)
    wait_for_producer(PDL)
    tl.atomic_add(out_ptr + n, acc.to(tl.float32), sem="relaxed")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    env = environment()
    bw = measure_read_bandwidth()
    print(f"# {env}\n# read bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    rows = []
    for k, n in [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 28672)]:
        kw = k // 8  # int4 word rows
        count = max(2, math.ceil(300e6 / (kw * n * 4)))
        ws = [torch.randint(-2**31, 2**31 - 1, (kw, n), device="cuda", dtype=torch.int32) for _ in range(count)]
        outs = [torch.zeros(n, device="cuda") for _ in range(count)]
        timed = []
        for bn, rws, tiles, stages, nw in itertools.product((128, 256), (16, 32), (1, 4, 16), (1, 3), (2, 4)):
            if (tiles == 1 and stages > 1) or kw % (rws * tiles):
                continue
            grid = (n // bn, kw // (rws * tiles))
            t = time_graph([lambda i=i: _read_words[grid](ws[i], outs[i], n, BLOCK_N=bn, ROWS=rws, TILES=tiles,
                                                          STAGES=stages, num_warps=nw, **pdl_launch(ws[i]))
                            for i in range(count)])
            timed.append((t, (bn, rws, tiles, stages, nw)))
        timed.sort(key=lambda tc: tc[0])
        need = kw * n * 4
        for t, cfg in timed[:4]:
            rows.append(dict(k=k, n=n, us=t * 1e6, frac_of_read_bw=need / t / bw, config=cfg))
        print(f"read-only K={k} N={n}: " + ", ".join(f"{c} {t * 1e6:.2f} us {100 * need / t / bw:.1f}%"
                                                      for t, c in timed[:4]), flush=True)
        one_shot = [tc for tc in timed if tc[1][2] == 1][:2]
        print("   best one tile per program: " + ", ".join(f"{c} {100 * need / t / bw:.1f}%" for t, c in one_shot), flush=True)
        del ws, outs
        torch.cuda.empty_cache()
    dump(f"{args.out}/probe_gemv.json", dict(env=env, read_bw=bw, results=rows))


if __name__ == "__main__":
    main()
