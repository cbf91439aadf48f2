"""GEMV/GEMM kernels on the GPU: correctness vs the reference, then achieved bandwidth.

Achieved bandwidth = bytes the kernel must read (packed words + scales + zeros + x) / median time,
timed as many launches in one CUDA graph over rotating weight buffers (> 256 MB, beyond L2), and
compared with the card's streaming read bandwidth measured in the same run.

    python benchmarks/bench_gemv.py [--sweep] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys

import torch

from gpu_common import dump, environment, measure_read_bandwidth, time_graph
from qruntime.kernels.gemm import gemm
from qruntime.kernels.gemv import gemv
from qruntime.kernels.gemv_splitk import gemv_splitk_accumulate
from qruntime.kernels.layout import prepare, prepare_splitk
from qruntime.kernels.reference import linear as ref_linear
from qruntime.quantizers.rtn import quantize_rtn

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 128256)]  # (K, N) as in the issue


def make_linears(k, n, bits, group, sym, count, dtype):
    """`count` distinct packed weights (same values, distinct buffers) plus one fp32 original."""
    w = torch.randn(n, k, device="cuda") * 0.02
    packed = quantize_rtn(w, bits, group, sym)
    return [prepare(packed, torch.device("cuda"), dtype) for _ in range(count)], packed


def linear_bytes(t, m, k, dtype) -> int:
    extra = 0 if t.zeros_or_offsets is None else t.zeros_or_offsets.numel() * t.zeros_or_offsets.element_size()
    return t.words.numel() * 4 + t.scales.numel() * t.scales.element_size() + extra + m * k * torch.empty((), dtype=dtype).element_size()


def check(bits, group, sym, m, dtype):
    torch.manual_seed(m * 7 + bits)
    k, n = 1000, 777  # awkward sizes
    w = torch.randn(n, k, device="cuda")
    lin = quantize_rtn(w, bits, group, sym, bias=torch.randn(n, device="cuda"))
    t = prepare(lin, torch.device("cuda"), dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    ref = ref_linear(x.float(), lin)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
    (gemv if m == 1 else gemm)(x, t, out=out)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    return err


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--splitk", action="store_true", help="also sweep the split-K kernel")
    ap.add_argument("--skip-gemv", action="store_true")
    ap.add_argument("--out", default=".")
    ap.add_argument("--dtype", default="float16")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    env = environment()
    bw = measure_read_bandwidth()
    print(f"# {env}\n# read bandwidth {bw / 1e12:.3f} TB/s", flush=True)

    errs = {}
    for bits, group, sym, m in itertools.product((4, 8), (32, 128, -1), (True, False), (1, 3, 16)):
        errs[f"w{bits}g{group}{'s' if sym else 'a'}m{m}"] = check(bits, group, sym, m, dtype)
    worst = max(errs.values())
    print(f"# correctness: worst relative error {worst:.2e} over {len(errs)} cases", flush=True)
    if not worst < 2e-3:
        print(json.dumps(errs, indent=1))

    configs = [(bn, bk, nw) for bn in (4, 8, 16) for bk in (128, 256, 512) for nw in (4, 8)] if args.sweep else [None]
    rows, tuned = [], {}
    for bits in (() if args.skip_gemv else (4, 8)):
        for (k, n), m in itertools.product(SHAPES, (1, 16)):
            nbytes_one = n * k * bits // 8
            count = max(2, math.ceil(300e6 / nbytes_one))
            lins, _ = make_linears(k, n, bits, 128, False, count, dtype)
            xs = [torch.randn(m, k, device="cuda", dtype=dtype) for _ in range(count)]
            outs = [torch.empty(m, n, device="cuda", dtype=dtype) for _ in range(count)]
            need = linear_bytes(lins[0], m, k, dtype)
            best = None
            for cfg in (configs if m == 1 else [None]):
                try:
                    if m == 1:
                        fns = [lambda i=i: gemv(xs[i], lins[i], out=outs[i], block_n=cfg and cfg[0], block_k=cfg and cfg[1], num_warps=cfg and cfg[2]) for i in range(count)]
                    else:
                        fns = [lambda i=i: gemm(xs[i], lins[i], out=outs[i]) for i in range(count)]
                    t = time_graph(fns)
                except Exception as e:  # a config that does not compile (e.g. too many registers)
                    print(f"  skip {cfg}: {type(e).__name__}", file=sys.stderr)
                    continue
                if best is None or t < best[0]:
                    best = (t, cfg)
            t, cfg = best
            frac = need / t / bw
            rows.append(dict(bits=bits, k=k, n=n, m=m, us=t * 1e6, bytes=need, tbps=need / t / 1e12, frac_of_read_bw=frac, config=cfg))
            print(f"w{bits} g128 M={m:2d} K={k:6d} N={n:6d}: {t * 1e6:8.2f} us  {need / t / 1e12:.3f} TB/s  {100 * frac:5.1f}% of read BW  cfg={cfg}", flush=True)
            if cfg:
                tuned[f"gemv/w{bits}/m{m}/n{n}/k{k}"] = list(cfg)
            del lins, xs, outs
            torch.cuda.empty_cache()
    if args.splitk:
        rows_sk = sweep_splitk(dtype, bw, tuned)
        rows += rows_sk
    dump(f"{args.out}/gemv.json", dict(env=env, read_bw=bw, correctness=errs, results=rows, tuned=tuned))


def sweep_splitk(dtype, bw, tuned):
    """The split-K kernel over its config space, M = 1 (decode)."""
    configs = [(bn, bk, it, nw, dot) for bn in (64, 128, 256) for bk in (64, 128) for it in (1, 2, 4)
               for nw in (4,) for dot in (False, True)]
    rows = []
    for bits in (4, 8):
        # correctness first, on awkward sizes
        torch.manual_seed(bits)
        w = torch.randn(777, 1000, device="cuda")
        for group, sym in ((32, True), (128, False), (-1, False)):
            lin = quantize_rtn(w, bits, group, sym)
            x = torch.randn(1000, device="cuda", dtype=dtype)
            ref = ref_linear(x.float()[None], lin)[0]
            out = torch.zeros(777, device="cuda")
            for dot in (False, True):
                out.zero_()
                gemv_splitk_accumulate(x, prepare_splitk(lin, torch.device("cuda")), out, config=(64, 64, 2, 4, dot))
                print(f"# splitk w{bits} g{group} dot={dot} rel err {((out - ref).norm() / ref.norm()).item():.2e}")
        for (k, n), m in itertools.product(SHAPES, (1, 16)):
            count = max(2, math.ceil(300e6 / (n * k * bits // 8)))
            packed = quantize_rtn(torch.randn(n, k, device="cuda") * 0.02, bits, 128, False)
            lins = [prepare_splitk(packed, torch.device("cuda")) for _ in range(count)]
            xs = [torch.randn(m, k, device="cuda", dtype=dtype) for _ in range(count)]
            outs = [torch.zeros(m, n, device="cuda") for _ in range(count)]
            t0 = lins[0]
            need = t0.words.numel() * 4 + t0.scales.numel() * 2 + t0.zeros_or_offsets.numel() + m * k * 2
            best = None
            for cfg in (configs if m == 1 else [c for c in configs if c[4]]):
                try:
                    t = time_graph([lambda i=i: gemv_splitk_accumulate(xs[i], lins[i], outs[i], config=cfg) for i in range(count)])
                except Exception as e:
                    print(f"  skip {cfg}: {type(e).__name__}: {e}"[:200], file=sys.stderr)
                    continue
                if best is None or t < best[0]:
                    best = (t, cfg)
            t, cfg = best
            frac = need / t / bw
            rows.append(dict(kernel="splitk", bits=bits, k=k, n=n, m=m, us=t * 1e6, bytes=need, tbps=need / t / 1e12, frac_of_read_bw=frac, config=cfg))
            tuned[f"splitk/w{bits}/m{m}/n{n}/k{k}"] = list(cfg)
            print(f"splitk w{bits} g128 M={m:2d} K={k:6d} N={n:6d}: {t * 1e6:8.2f} us  {need / t / 1e12:.3f} TB/s  {100 * frac:5.1f}% of read BW  cfg={cfg}", flush=True)
            del lins, xs, outs
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
