"""Block-size sweep of the decode GEMV (kernels.qmatmul.qmatmul_accumulate) on the GPU; writes the
best config per shape in the form of kernels/tuned/<card>.json (merge with merge_tuned.py).

    PYTHONPATH=$(bash benchmarks/stage_package.sh) python3 benchmarks/bench_gemv.py --out DIR [--bits 4]

Achieved bandwidth = bytes the kernel must read (words + scales + zeros + x) / median time of many
launches in one CUDA graph over rotating buffers (> 300 MB, beyond L2), against the streaming
read bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import multiprocessing
import sys

import torch

from gpu_common import dump, environment, gemv_workload, measure_read_bandwidth, time_graph
from qruntime.kernels.layout import prepare
from qruntime.kernels.qmatmul import qmatmul, qmatmul_accumulate
from qruntime.kernels.tuning import weights_key
from qruntime.kernels.reference import linear as ref_linear
from qruntime.kernels.frag_gemm import FRAG_PATH
from qruntime.kernels.tma_frag_gemm import (STAGED_SCALES, TMA_FRAG_PATH, TMA_STREAM_PATH, WARP_SPECIALIZED,
                                           loader_register_cap, tma_frag_serves)
from qruntime.kernels.slot_gemm import SLOT_PATHS
from qruntime.quantizers.rtn import quantize_rtn

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 128256), (4096, 6144), (4096, 28672),
          (2048, 2048), (2048, 3072), (2048, 16384), (8192, 2048), (2048, 128256)]  # (K, N); fused qkv / gate_up too


def configs(m: int, bits: int, quick: bool = False, narrow: bool = False, slots: bool = False):
    """(BLOCK_N, BLOCK_K, K_ITERS, num_warps, path) candidates. M = 1: the packed path (it won
    every shape of the earlier sweeps but the smallest int8 one, so the FMA path stays as one
    candidate in the full sweep): a program takes one K slice of BLOCK_K across K_ITERS column
    tiles of BLOCK_N (the next requested while the current is multiplied), kept to 16-64 words per
    thread for one tile, 8-32 when a second is in flight (more spills or caps occupancy, fewer
    leaves too little work per load; --quick: at most 4 tiles). M > 1: the fragment kernel
    (kernels.frag_gemm: BLOCK_K is its K slice, K_ITERS its blocks loaded together); with --quick only
    those, else also tensor-core tiles of 16 words along K (each word read once, one dot per code
    slot: the group of 128 caps BLOCK_K), K_ITERS tiles per program, and the slot kernel
    (kernels.slot_gemm), whose K_ITERS are column tiles. --slots adds the slot kernel's tiles at
    M = 1 too."""
    if m == 1:
        epw = 32 // bits
        found = []
        for bn, bk, nw, tiles in itertools.product((32, 64, 128, 256), (64, 128, 256), (1, 2, 4), (1, 2, 4, 8)):
            if bn == 32 and nw > 1:  # a warp already spans 32 columns
                continue
            words = bn * bk // epw // (32 * nw)
            fits = 8 <= words <= 32 if tiles > 1 else 16 <= words <= 64
            if fits and not (quick and tiles > 4) and not (narrow and (nw > 1 or bn > 64)):
                found.append((bn, bk, tiles, nw, "packed"))
        found += slot_configs(bits) if slots else []
        return found if quick else found + [(64, 64, 1, 2, False)]
    if quick:
        return frag_configs() + tma_frag_configs() + tma_stream_configs() + tma_ws_configs()
    return frag_configs() + tma_frag_configs() + tma_stream_configs() + tma_ws_configs() + slot_configs(bits) + [(64, 128, 1, 4, True), (128, 128, 1, 4, True), (64, 128, 2, 4, True),
                                                  (64, 64, 2, 4, True)]


def frag_configs():
    """The few-row fragment kernel (kernels.frag_gemm): 2 or 4 warps of one or two 32-column tiles
    (one-warp programs won 12 of the 22 M = 16 shapes on the H200 by 0.1-1.8 points,
    gemv_sweep_m16_one_warp.log, but give wrong sums on the GPU wherever a slice spans groups,
    frag_one_warp.log; kernels.frag_gemm refuses them),
    K slices of 256-2048, the loads of one or two blocks of 128 columns of K requested together
    (four lost on every shape, ab_frag_super.log)."""
    return [(32 * nw * tiles, ks, sup, nw, FRAG_PATH) for nw in (2, 4) for tiles in (1, 2)
            for ks in (256, 512, 1024, 2048) for sup in (1, 2)]


def tma_frag_configs():
    """The fragment kernel with TMA-staged operands (kernels.tma_frag_gemm): 2 or 4 warps of one or
    two 32-column tiles, K slices of 128-2048 through rings of 2 or 3 stages (the probe's winners,
    tma_frag_probe.log; deeper rings lost: fewer programs fit an SM), the scales loaded a block ahead
    or staged by TMA ("+scales")."""
    return [(32 * nw * tiles, ks, stages, nw, TMA_FRAG_PATH + staged) for staged in ("", STAGED_SCALES)
            for nw in (2, 4) for tiles in (1, 2)
            for ks in (128, 256, 512, 1024, 2048) for stages in ((1,) if ks == 128 else (2, 3))]


def tma_stream_configs():
    """The TMA kernel in one wave of programs sharing the units equally ("tma-stream"): the same
    tiles, rings and scales, 4-12 programs an SM."""
    return [(32 * nw * tiles, per_sm, stages, nw, TMA_STREAM_PATH + staged) for staged in ("", STAGED_SCALES)
            for nw in (2, 4) for tiles in (1, 2) for per_sm in (4, 6, 8, 12) for stages in (2, 3)]


def tma_ws_configs():
    """The TMA kernel warp-specialized ("ws-": a loader warp issues the copies): 4 or 8 multiplying
    warps of one or two tiles, both grids (1-4 programs an SM where the register cap lets them fit,
    loader_register_cap; K slices of 256-2048), rings of 2 or 3 stages, both ways to the scales (a
    box of scales is at most 256 wide)."""
    out = []
    for staged, nw, tiles, stages in itertools.product(("", STAGED_SCALES), (4, 8), (1, 2), (2, 3)):
        bn = 32 * nw * tiles
        if staged and bn > 256:
            continue
        out += [(bn, per_sm, stages, nw, WARP_SPECIALIZED + TMA_STREAM_PATH + staged) for per_sm in (1, 2, 3, 4)
                if loader_register_cap(nw, tiles, per_sm) and (nw, per_sm) != (4, 1)]
        if loader_register_cap(nw, tiles, None) <= 80:  # more leaves too few programs an SM
            out += [(bn, ks, stages, nw, WARP_SPECIALIZED + TMA_FRAG_PATH + staged) for ks in (256, 512, 1024, 2048)
                    if ks >= 512 or nw == 4]
    return out


def check_tma_frag(bits: int) -> None:
    """The TMA kernel's products against the reference where it serves (K a multiple of 128; N a
    multiple of 32 but not of the tile; 3 and 16 rows; one and two tiles a warp; g128 and
    per-channel, integer and symmetric zero points), on both grids: split-K with a partial last K
    slice, and the stream grid with runs that cross from tile to tile (units >> programs); the
    scales loaded a block ahead and staged by TMA; warp-specialized or not."""
    grids = [(TMA_FRAG_PATH, (800, 1152), [(64, 512, 2, 2), (128, 256, 3, 2), (256, 1024, 2, 4), (64, 128, 1, 1)]),
             (TMA_STREAM_PATH, (4000, 2304), [(64, 1, 2, 2), (128, 2, 3, 2), (256, 1, 2, 4), (128, 12, 2, 4)]),
             (WARP_SPECIALIZED + TMA_FRAG_PATH, (800, 1152), [(128, 512, 2, 4), (256, 256, 3, 4), (128, 128, 1, 4)]),
             (WARP_SPECIALIZED + TMA_STREAM_PATH, (4000, 2304), [(128, 2, 2, 4), (256, 3, 3, 4), (128, 4, 2, 4)])]
    for (grid, (n, k), cfgs), staged in itertools.product(grids, ("", STAGED_SCALES)):
        path = grid + staged
        for group, sym, m, cfg in itertools.product((128, -1), (True, False), (3, 16), cfgs):
            packed = quantize_rtn(torch.randn(n, k, device="cuda"), bits, group, sym)
            lin = prepare(packed, torch.device("cuda"), torch.float16)
            assert tma_frag_serves(lin, m, torch.device("cuda"))
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            check_product(x, packed, lin, cfg + (path,), f"w{bits} g{group} sym={sym} path={path} M={m} config={cfg}")


def check_product(x: torch.Tensor, packed, lin, cfg: tuple, label: str) -> None:
    """qmatmul_accumulate(x, lin) with `cfg` into zeros against kernels.reference.linear on the packed
    weight: prints the relative error and fails above 3e-3."""
    out = torch.zeros(x.shape[0], lin.out_features, device="cuda")
    qmatmul_accumulate(x, lin, out, config=cfg)
    ref = ref_linear(x.float(), packed)
    err = ((out - ref).norm() / ref.norm()).item()
    print(f"# check {label}: rel err {err:.1e}", flush=True)
    assert err < 3e-3, err


def slot_configs(bits: int):
    """The few-row kernel (kernels.slot_gemm): K slices of 16 word rows (int8 also 32), 1-4 column
    tiles per program, pipelined or unrolled (for one tile the two are the same kernel in effect)."""
    return [(bn, bk, tiles, nw, path) for bn in (64, 128, 256) for bk in ((128,) if bits == 4 else (64, 128))
            for tiles in (1, 2, 4) for nw in (2, 4, 8) for path in SLOT_PATHS if tiles > 1 or path == "slots"]


def gemm_configs():
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) candidates for the prefill kernel."""
    return [(bm, bn, bk, nw, ns) for bm in (64, 128) for bn in (64, 128) for bk in (64, 128) for nw in (4, 8)
            for ns in (3,)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prefill", type=int, default=0, help="also sweep the prefill GEMM at this M")
    ap.add_argument("--shapes", default="all", help="'all', 'issue' (the four shapes of the acceptance) or KxN,KxN,...")
    ap.add_argument("--quick", action="store_true",
                    help="M = 1: only the tiles that won the full sweeps; M = 16: only the fragment kernels' (with and without TMA)")
    ap.add_argument("--jobs", type=int, default=12, help="processes compiling the configs before the timing")
    ap.add_argument("--narrow", action="store_true",
                    help="M = 1: only one-warp tiles of at most 64 columns, against the card's current table entry")
    ap.add_argument("--slots", action="store_true", help="M = 1: also the slot kernel's tiles")
    ap.add_argument("--group", type=int, default=128, help="group size of the timed weights (-1: per channel)")
    ap.add_argument("--zeros", default="int", choices=("int", "symmetric", "float"),
                    help="the timed weights' zero points: integer, none (GGUF's Q8_0, Q4_0) or float offsets (its K types)")
    ap.add_argument("--only", default="", metavar="PREFIX",
                    help="check and time only the configs whose path starts with PREFIX, against the card's current table entry")
    args = ap.parse_args()
    env = environment()
    bw = measure_read_bandwidth()
    print(f"# {env}\n# read bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    rows, tuned = [], {}
    for bits in args.bits:
        # correctness of every path (of --only's) on awkward sizes first
        w = torch.randn(777, 1000, device="cuda")
        paths = [False, True, "packed", *SLOT_PATHS, FRAG_PATH]
        for group, sym, path, m, bk, iters in itertools.product((32, 128, -1), (True, False), paths,
                                                                (1, 16), (64, 128, 512), (2, 8)):
            slot = path in SLOT_PATHS
            if m not in args.m or (m > 1 and path is not True and not slot and path != FRAG_PATH) \
                    or (iters == 8 and path != "packed" and not slot) \
                    or not path_starts((None,) * 4 + (path,), args.only):  # check what is timed
                continue
            lin = quantize_rtn(w, bits, group, sym)
            x = torch.randn(m, 1000, device="cuda", dtype=torch.float16)
            # the fragment kernel: one or two 32-column tiles a warp, programs of 2 warps, K slices of whole
            # blocks of 128, one block or two loaded together. (One-warp programs are refused: wrong sums on
            # the H200 at g32 and g128, int4 and int8, right per-channel; frag_one_warp.log.)
            cfg = {64: (64, 256, 1, 2), 128: (128, 256, 2, 2), 512: (128, 512, 2, 2)}[bk] + (path,) \
                if path == FRAG_PATH else (64, bk, iters, 4, path)
            check_product(x, lin, prepare(lin, torch.device("cuda"), torch.float16), cfg,
                          f"w{bits} g{group} sym={sym} path={path} M={m} BLOCK_K={bk} K_ITERS={iters}")
        if any(m > 1 for m in args.m):
            check_tma_frag(bits)
        shapes = {"all": SHAPES, "issue": SHAPES[:4]}.get(args.shapes) or [
            tuple(int(d) for d in shape.split("x")) for shape in args.shapes.split(",")]
        weights = f"g{args.group} {args.zeros}"
        compile_ahead(bits, args.m, shapes, args.quick, args.narrow, args.slots, args.jobs, args.only)
        for (k, n), m in itertools.product(shapes, args.m):
            lins, xs, outs, need = gemv_workload(k, n, m, bits, group=args.group, zero_mode=args.zeros)
            count = len(lins)
            timed = []
            candidates = configs(m, bits, args.quick, args.narrow, args.slots)
            candidates = [c for c in candidates if path_starts(c, args.only)]
            # what the lookup gives these weights now, alone and in the decode step (its "step/" entries first)
            looked_up = {"table's": tuple(lins[0].splitk_config(m)),
                         "step's": tuple(dataclasses.replace(lins[0], in_decode_step=True).splitk_config(m))}
            if args.narrow or args.only or (args.group, args.zeros) != (128, "int"):
                candidates = list(dict.fromkeys(candidates + list(looked_up.values())))
            for cfg in candidates:
                try:
                    t = time_graph([lambda i=i: qmatmul_accumulate(xs[i], lins[i], outs[i], config=cfg) for i in range(count)])
                except Exception as e:  # a config that does not compile
                    print(f"  skip {cfg}: {type(e).__name__}", file=sys.stderr)
                    continue
                timed.append((t, cfg))
            timed.sort(key=lambda tc: tc[0])
            for s, c in timed:  # the lookup's own choices, where they were among the candidates
                for whose in [whose for whose, cfg in looked_up.items() if cfg == c]:
                    print(f"  the {whose} {c} {s * 1e6:.2f} us {100 * need / s / bw:.1f}%", flush=True)
            t, cfg = timed[0]
            print("  runners-up: " + ", ".join(f"{c} {100 * need / s / bw:.1f}%" for s, c in timed[1:4]), flush=True)
            best_of = {}  # each kernel's best in this process, for the comparison between them
            for s, c in timed:
                best_of.setdefault(str(c[4]), (s, c))
            print("  best per path: " + ", ".join(f"{p} {c} {s * 1e6:.2f} us {100 * need / s / bw:.1f}%"
                                                 for p, (s, c) in best_of.items()), flush=True)
            rows.append(dict(bits=bits, group=args.group, zeros=args.zeros, k=k, n=n, m=m, us=t * 1e6, bytes=need, tbps=need / t / 1e12,
                             frac_of_read_bw=need / t / bw, config=list(cfg)))
            tuned[f"splitk/{weights_key(bits, args.group, args.zeros, k)}/m{m}/n{n}/k{k}"] = list(cfg)
            print(f"w{bits} {weights} M={m:2d} K={k:6d} N={n:6d}: {t * 1e6:8.2f} us  {need / t / 1e12:.3f} TB/s  "
                  f"{100 * need / t / bw:5.1f}% of read BW  cfg={cfg}", flush=True)
            del lins, xs, outs
            torch.cuda.empty_cache()
            dump(f"{args.out}/gemv_sweep.json", dict(env=env, read_bw=bw, results=rows, tuned=tuned))  # so far
        if args.prefill:
            sweep_prefill(bits, args.prefill, shapes, rows, tuned)
    dump(f"{args.out}/gemv_sweep.json", dict(env=env, read_bw=bw, results=rows, tuned=tuned))


def path_starts(cfg: tuple, prefix: str) -> bool:
    """Whether config cfg's path (its last field, a name or a bool) starts with prefix (--only; "": every config)."""
    return not prefix or (isinstance(cfg[4], str) and cfg[4].startswith(prefix))


def compile_ahead(bits: int, ms: list[int], shapes, quick: bool, narrow: bool, slots: bool, jobs: int,
                  only: str = "") -> None:
    """Compiles every (config, shape) kernel variant in `jobs` processes first, into Triton's disk
    cache: one after another, the compiles would take most of a sweep's time on the device."""
    chosen = {m: [c for c in configs(m, bits, quick, narrow, slots) if path_starts(c, only)] for m in ms}
    work = [(bits, m, shapes, chosen[m][j::jobs]) for m in ms for j in range(jobs)]
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        pool.map(_compile_configs, work)
    print(f"# compiled w{bits} variants in {jobs} processes", flush=True)


def _compile_configs(job) -> None:
    bits, m, shapes, cfgs = job
    for k, n in shapes:
        n = 512 + n % 512  # the same kernel variants (N % BLOCK_N, divisibility) at a fraction of the memory
        lin = prepare(quantize_rtn(torch.randn(n, k, device="cuda") * 0.02, bits, 128, False), torch.device("cuda"),
                      torch.float16)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        out = torch.zeros(m, n, device="cuda")
        for cfg in cfgs:
            try:
                qmatmul_accumulate(x, lin, out, config=cfg)
            except Exception:  # reported by the timing loop
                pass
    torch.cuda.synchronize()


def sweep_prefill(bits: int, m: int, shapes, rows: list, tuned: dict) -> None:
    """Best whole-K GEMM config per shape at M rows (TFLOP/s; prefill is compute-bound)."""
    for k, n in shapes:
        lin = prepare(quantize_rtn(torch.randn(n, k, device="cuda") * 0.02, bits, 128, False), torch.device("cuda"),
                      torch.float16)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        out = torch.empty(m, n, device="cuda", dtype=torch.float16)
        best = None
        for cfg in gemm_configs():
            try:
                t = time_graph([lambda: qmatmul(x, lin, out=out, config=cfg)] * 8)
            except Exception as e:
                print(f"  skip gemm {cfg}: {type(e).__name__}", file=sys.stderr)
                continue
            if best is None or t < best[0]:
                best = (t, cfg)
        t, cfg = best
        rows.append(dict(kind="gemm", bits=bits, k=k, n=n, m=m, us=t * 1e6, tflops=2 * m * n * k / t / 1e12, config=list(cfg)))
        tuned[f"gemm/w{bits}/m{min(m, 128)}/n{n}/k{k}"] = list(cfg)
        print(f"gemm w{bits} g128 M={m} K={k:6d} N={n:6d}: {t * 1e6:8.1f} us {2 * m * n * k / t / 1e12:6.1f} TFLOP/s cfg={cfg}",
              flush=True)


if __name__ == "__main__":
    main()
