"""Ceiling probe for flash-decoding over an int8 cache (32 q / 8 kv heads, head_dim 128): how fast
can a kernel with the split kernel's grid and K/V blocks (Triton's cp.async pipeline through shared
memory, as the real kernel gets) only READ the cache, when the attention math is replaced by two
int8 tensor-core dots against ones (no int8 -> fp16 conversion, no softmax)? Its time bounds what
any split kernel of that structure can reach, and with the combine launch added, what flash_decode
can. Timed beside the real split kernel alone (flash_decode_splits), the real flash_decode (split
kernel + combine), and torch's own reduction (torch.sum) over the same bytes and over the fp16
cache's bytes, all one launch after another in a CUDA graph over rotating caches (> L2).

    PYTHONPATH=$(bash benchmarks/stage_package.sh):. python3 benchmarks/probe_fd.py --out DIR
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from gpu_common import dump, environment, kv_caches, measure_read_bandwidth, time_graph
from qruntime.kernels.flash_decode import flash_decode, flash_decode_splits

H, KV, HD = 32, 8, 128
COPIES = 3  # caches rotated so that none is served from L2
# (splits, positions a block, warps, pipeline stages): the committed best (128, 32, 1, 3) and neighbours
CONFIGS = [(128, 32, 1, 3), (128, 32, 1, 2), (128, 32, 1, 4), (256, 32, 1, 2), (256, 32, 1, 3), (64, 64, 2, 3),
           (32, 128, 4, 3)]


@triton.jit
def _read_cache(k_ptr, v_ptr, ks_ptr, vs_ptr, seqlen_ptr, out_ptr, stride_ckv, stride_cs, stride_skv,
                HD: tl.constexpr, BLOCK_S: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """The split kernel's chunking and loads (K, V blocks and both scales); the int8 dots against
    ones keep Triton's pipeline (it stages a dot's operands through shared memory) at ~210 sm_90
    instructions a 32-position block instead of ~750."""
    kvh = tl.program_id(0)
    split = tl.program_id(1)
    length = tl.load(seqlen_ptr)
    chunk = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_S) * BLOCK_S
    start = split * chunk
    end = tl.minimum(start + chunk, length)
    d = tl.arange(0, HD)
    ones = tl.full([HD, 16], 1, tl.int8)
    acc = tl.zeros([BLOCK_S, 16], tl.int32)
    scales = tl.zeros([BLOCK_S], tl.float32)
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < end
        offs = kvh * stride_ckv + s[:, None] * stride_cs + d[None, :]
        k = tl.load(k_ptr + offs, mask=s_ok[:, None], other=0)
        v = tl.load(v_ptr + offs, mask=s_ok[:, None], other=0)
        acc = tl.dot(k, ones, acc, out_dtype=tl.int32)
        acc = tl.dot(v, ones, acc, out_dtype=tl.int32)
        scales += (tl.load(ks_ptr + kvh * stride_skv + s, mask=s_ok, other=0.0)
                   + tl.load(vs_ptr + kvh * stride_skv + s, mask=s_ok, other=0.0))
    total = tl.sum(tl.sum(acc, axis=1), axis=0).to(tl.float32) + tl.sum(scales, axis=0)
    tl.store(out_ptr + kvh * NUM_SPLITS + split, total)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--configs", default="", metavar="SP,BS,W,ST;...",
                    help="(splits, positions a block, warps, stages) to time instead of CONFIGS")
    args = ap.parse_args()
    configs = [tuple(int(v) for v in c.split(",")) for c in args.configs.split(";")] if args.configs else CONFIGS
    env = environment()
    bw = measure_read_bandwidth()
    print(env, f"read bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    caches = kv_caches(KV, args.context, HD, int8=True, copies=COPIES)
    nbytes = sum(t.numel() * t.element_size() for t in caches[0].values())
    seq = torch.tensor([args.context], device="cuda", dtype=torch.int32)
    q = torch.randn(H, HD, device="cuda", dtype=torch.float16)
    rows = []

    def record(what, config, t, size=nbytes):
        rows.append(dict(what=what, config=config, us=t * 1e6, bytes=size, frac_of_read_bw=size / t / bw))
        print(f"  {what:34s} {str(config):18s} {t * 1e6:8.2f} us {100 * size / t / bw:5.1f}% of read bw", flush=True)

    for rnd in range(args.rounds):
        print(f"round {rnd}", flush=True)
        for sp, bs, w, st in configs:
            out = torch.empty(KV * sp, device="cuda")
            record("load-only probe", (sp, bs, w, st), time_graph([
                lambda c=c: _read_cache[(KV, sp)](c["k_cache"], c["v_cache"], c["k_scale"], c["v_scale"], seq, out,
                                                  c["k_cache"].stride(0), c["k_cache"].stride(1), c["k_scale"].stride(0),
                                                  HD=HD, BLOCK_S=bs, NUM_SPLITS=sp, num_warps=w, num_stages=st)
                for c in caches] * 4))
            ws = [(torch.empty(sp, H, HD, device="cuda"), torch.empty(sp, H, device="cuda")) for _ in range(COPIES)]
            kw = dict(seq_len=seq, num_splits=sp, block_s=bs, num_warps=w, num_stages=st)
            record("split kernel (flash_decode_splits)", (sp, bs, w, st), time_graph([
                lambda i=i: flash_decode_splits(q, workspace=ws[i], **kw, **caches[i]) for i in range(COPIES)] * 4))
            outs = [torch.empty(H * HD, device="cuda", dtype=torch.float16) for _ in range(COPIES)]
            record("flash_decode (+ combine)", (sp, bs, w, st), time_graph([
                lambda i=i: flash_decode(q, out=outs[i], workspace=ws[i], **kw, **caches[i]) for i in range(COPIES)] * 4))
        codes = caches[0]["k_cache"].numel() + caches[0]["v_cache"].numel()
        for size in (nbytes, 2 * codes):  # the int8 cache's bytes, and an fp16 cache's (2 bytes a code, no scales)
            xs = [torch.randn(size // 4, device="cuda") for _ in range(COPIES)]
            sums = [torch.empty((), device="cuda") for _ in range(COPIES)]
            record(f"torch.sum of {size / 1e6:.1f} MB", "-", time_graph([
                lambda i=i, xs=xs, sums=sums: torch.sum(xs[i], dim=0, out=sums[i]) for i in range(COPIES)] * 4), size)
            del xs
    dump(f"{args.out}/probe_fd.json", dict(env=env, read_bw=bw, context=args.context, heads=H, kv_heads=KV, head_dim=HD,
                                           rows=rows))


if __name__ == "__main__":
    main()
