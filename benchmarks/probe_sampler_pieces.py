"""What the pieces of a candidate-based sampled draw would cost, each in a CUDA graph (us per replay,
median of 5 x 200): launches that exit at once (the bisection passes a fast path would leave
unused), one program's tl.sort of the candidates' packed (value key, index) words, one program's
64 x 6 search over candidates held in registers, and a 126-program compaction of the tokens over a
cut. Not a kernel of the package: a measurement for kernels/sampling.py's next step
(results/h200/probe_sampler_pieces.log).

    cd benchmarks && PYTHONPATH=$(bash stage_package.sh):. python3 probe_sampler_pieces.py
"""
import torch
import triton
import triton.language as tl

from gpu_common import us_per_call
from qruntime.kernels.argmax import order_key
from qruntime.kernels.sampling import BLOCK

dev = torch.device("cuda")
V = 128256
P = triton.cdiv(V, BLOCK)  # kernels.sampling's programs at Llama 3's vocabulary

def us_per_replay(fn):
    """us per replay of a graph of fn (called once eagerly first, to compile)."""
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return us_per_call(g.replay, n=200, warmup=10)

@triton.jit
def _empty(flag_ptr, out_ptr):
    if tl.load(flag_ptr) != 0:
        return
    tl.store(out_ptr + tl.program_id(0), 1)

@triton.jit
def _sort_one(src_ptr, dst_ptr, n_ptr, CAP: tl.constexpr):
    i = tl.arange(0, CAP)
    n = tl.load(n_ptr)
    k = tl.load(src_ptr + i, mask=i < n, other=-9223372036854775808)
    k = tl.sort(k, descending=True)
    tl.store(dst_ptr + i, k)

@triton.jit
def _search_one(src_ptr, out_ptr, n_ptr, CAP: tl.constexpr, BINS: tl.constexpr, PASSES: tl.constexpr):
    i = tl.arange(0, CAP)
    n = tl.load(n_ptr)
    x = tl.load(src_ptr + i, mask=i < n, other=float("-inf"))
    key = order_key(x)
    w = tl.where(i < n, tl.exp(x - tl.max(x, axis=0)), 0.0)
    target = 0.9 * tl.sum(w, axis=0)
    lo = tl.full([], -2147483648, tl.int64); hi = tl.full([], 2147483647, tl.int64)
    bins = tl.arange(0, BINS)
    for _ in tl.static_range(PASSES):
        step = (hi - lo + BINS) // BINS
        splits = lo + bins.to(tl.int64) * step
        s32 = tl.minimum(splits, 2147483647).to(tl.int32)
        f = tl.sum(tl.where(key[:, None] >= s32[None, :], w[:, None], 0.0), axis=0)
        best = tl.max(tl.where((f >= target) & (splits <= hi), bins, 0), axis=0)
        lo = lo + best.to(tl.int64) * step
        hi = tl.minimum(lo + step - 1, hi)
    tl.store(out_ptr, lo)

@triton.jit
def _gather(x_ptr, cand_ptr, count_ptr, V, cut, CAP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < V
    x = tl.load(x_ptr + offs, mask=ok, other=float("-inf"))
    take = ok & (x >= cut)
    c = tl.sum(take.to(tl.int32), axis=0)
    base = tl.atomic_add(count_ptr, c)
    slot = base + tl.cumsum(take.to(tl.int32), axis=0) - 1
    packed = (order_key(x).to(tl.int64) << 32) | (0xFFFFFFFF - offs.to(tl.int64))
    tl.store(cand_ptr + slot, packed, mask=take & (slot < CAP))

print("| probe | us |\n|---|---|")
flag = torch.ones(1, dtype=torch.int32, device=dev); out = torch.zeros(P, dtype=torch.int32, device=dev)
for n in (1, 6, 12):
    t = us_per_replay(lambda: [_empty[(P,)](flag, out, num_warps=4) for _ in range(n)])
    print(f"| {n} early-exit launches of {P} programs, graph | {t:.1f} ({t / n:.2f} each) |", flush=True)
for cap in (512, 1024, 2048, 4096):
    src = torch.randint(-2**62, 2**62, (cap,), device=dev); dst = torch.empty_like(src)
    nn = torch.tensor([cap], dtype=torch.int32, device=dev)
    for w in (4, 8, 16):
        t = us_per_replay(lambda: _sort_one[(1,)](src, dst, nn, CAP=cap, num_warps=w))
        ok = torch.equal(dst, torch.sort(src, descending=True).values)
        print(f"| tl.sort one program, {cap} int64, {w} warps (correct {ok}) | {t:.1f} |", flush=True)
for cap in (512, 1024, 2048):
    xs = torch.randn(cap, device=dev) * 3; o = torch.zeros(1, dtype=torch.int64, device=dev)
    nn = torch.tensor([cap], dtype=torch.int32, device=dev)
    for w in (4, 8, 16):
        t = us_per_replay(lambda: _search_one[(1,)](xs, o, nn, CAP=cap, BINS=64, PASSES=6, num_warps=w))
        print(f"| 64 x 6 search in one program over {cap} candidates, {w} warps | {t:.1f} |", flush=True)
x = torch.randn(V, device=dev) * 2.5; cand = torch.empty(2048, dtype=torch.int64, device=dev)
cnt = torch.zeros(1, dtype=torch.int32, device=dev)
cut = float(torch.topk(x, 500).values[-1])
def gather():
    cnt.zero_(); _gather[(P,)](x, cand, cnt, V, cut, CAP=2048, BLOCK=BLOCK, num_warps=4)
t = us_per_replay(gather)
print(f"| gather (memset + compaction of {int(cnt)} candidates over {P} programs) | {t:.1f} |", flush=True)
t = us_per_replay(lambda: cnt.zero_())
print(f"| the memset alone | {t:.1f} |", flush=True)
