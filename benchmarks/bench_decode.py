"""Issue-5 GPU benchmark: kernels' achieved bandwidth, GPU correctness, end-to-end decode vs the
bandwidth floor B and vs HF transformers, all in one run on one card.

    PYTHONPATH=$(bash benchmarks/stage_package.sh) python3 benchmarks/bench_decode.py --out DIR

Timing: CUDA graphs of many launches over rotating buffers (> L2) for kernels; graph replays of the
whole decode step for the engine; medians of repeats after warm-up. B = bytes of all linears
(codes + scales + zeros, lm_head included) / read bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys

import torch

from gpu_common import (dump, environment, gemv_workload, kv_caches, measure_read_bandwidth, prefill_and_capture,
                        time_graph, time_replays)
import qruntime
from qruntime.bench.measure import generate_ms_per_token
from qruntime.bench.run import hf_model
from qruntime.kernels import reference as R
from qruntime.kernels.flash_decode import flash_decode
from qruntime.kernels.qmatmul import qmatmul_accumulate
from qruntime.synthetic import synthetic_checkpoint, synthetic_config

@contextlib.contextmanager
def pdl(on: bool):
    """Programmatic dependent launch on or off (kernels.pdl reads QRUNTIME_PDL at each launch)."""
    old = os.environ.get("QRUNTIME_PDL")
    os.environ["QRUNTIME_PDL"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["QRUNTIME_PDL"]
        else:
            os.environ["QRUNTIME_PDL"] = old


GEMV_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 128256)]  # (K, N)


def bench_gemv(bw: float) -> list[dict]:
    rows = []
    for bits in (4, 8):
        for (k, n) in GEMV_SHAPES:
            for m in (1, 16):
                lins, xs, outs, need = gemv_workload(k, n, m, bits)
                t0 = lins[0]
                fns = [lambda i=i: qmatmul_accumulate(xs[i], lins[i], outs[i]) for i in range(len(lins))]
                with pdl(False):
                    t_plain = time_graph(fns)
                with pdl(True):
                    t = time_graph(fns)
                rows.append(dict(bits=bits, group=128, m=m, k=k, n=n, us=t * 1e6, bytes=need, tbps=need / t / 1e12,
                                 frac_of_read_bw=need / t / bw, us_no_pdl=t_plain * 1e6, frac_no_pdl=need / t_plain / bw,
                                 config=list(t0.splitk_config(m))))
                print(f"gemv w{bits} g128 M={m:2d} K={k:6d} N={n:6d}: {t * 1e6:8.2f} us {need / t / 1e12:.3f} TB/s "
                      f"{100 * need / t / bw:5.1f}% of read BW (no PDL: {t_plain * 1e6:8.2f} us, "
                      f"{100 * need / t_plain / bw:5.1f}%)", flush=True)
                del lins, xs, outs
                torch.cuda.empty_cache()
    return rows


def bench_flash_decode(bw: float, context: int = 32768, configs=None) -> list[dict]:
    configs = configs or FD_CONFIGS
    rows = []
    h, kv, hd = 32, 8, 128
    for int8 in (False, True):
        copies = 3  # rotate layers so the 134+ MB caches are not served from L2
        caches = kv_caches(kv, context, hd, int8, copies)
        q = torch.randn(h, hd, device="cuda", dtype=torch.float16)
        seq = torch.tensor([context], device="cuda", dtype=torch.int32)
        outs = [torch.empty(h * hd, device="cuda", dtype=torch.float16) for _ in range(copies)]
        c = caches[0]
        kd = c["k_cache"].float() * (c["k_scale"][..., None] if int8 else 1)
        vd = c["v_cache"].float() * (c["v_scale"][..., None] if int8 else 1)
        ref = R.attention_over_cache(q[None].float(), kd, vd, context - 1)[0]
        del kd, vd
        nbytes = sum(t.numel() * t.element_size() for t in caches[0].values()) + q.numel() * 2
        best = None
        for splits, block_s, warps, stages in configs:
            ws = [(torch.empty(splits, h, hd, device="cuda"), torch.empty(splits, h, device="cuda")) for _ in range(copies)]
            kw = dict(num_splits=splits, block_s=block_s, num_warps=warps, num_stages=stages, seq_len=seq)
            try:
                outs[0].fill_(float("nan"))
                flash_decode(q, out=outs[0], workspace=ws[0], **kw, **c)
                err = ((outs[0].float() - ref).norm() / ref.norm()).item()
                t = time_graph([lambda i=i: flash_decode(q, out=outs[i], workspace=ws[i], **kw, **caches[i])
                                for i in range(copies)] * 4)
            except Exception as e:  # a config that does not compile (shared memory)
                print(f"  skip fd {(splits, block_s, warps, stages)}: {type(e).__name__}", file=sys.stderr)
                continue
            print(f"  fd {'int8' if int8 else 'fp16'} splits={splits} block_s={block_s} warps={warps} stages={stages}: "
                  f"{t * 1e6:7.1f} us {100 * nbytes / t / bw:5.1f}% err {err:.1e}", flush=True)
            if err < 2e-2 and (best is None or t < best[0]):
                best = (t, err, (splits, block_s, warps, stages))
        if best is None:
            raise RuntimeError(f"flash-decode {'int8' if int8 else 'fp16'}: no config ran correctly")
        t, err, cfg = best
        rows.append(dict(cache="int8" if int8 else "fp16", context=context, heads=h, kv_heads=kv, head_dim=hd,
                         us=t * 1e6, bytes=nbytes, tbps=nbytes / t / 1e12, frac_of_read_bw=nbytes / t / bw, rel_err=err,
                         config=dict(num_splits=cfg[0], block_s=cfg[1], num_warps=cfg[2], num_stages=cfg[3])))
        print(f"flash-decode {'int8' if int8 else 'fp16'} ctx {context}: {t * 1e6:8.1f} us {nbytes / t / 1e12:.3f} TB/s "
              f"{100 * nbytes / t / bw:5.1f}% of read BW  rel err {err:.1e}  best {cfg}", flush=True)
        del caches
        torch.cuda.empty_cache()
    return rows


# (splits, positions per block, warps, pipeline stages: blocks in flight + 1); 256 positions and
# 5 stages exceed the shared memory. 2 stages: the int8 cache's best (3 stages of 128 positions)
# leaves room for 2 programs an SM only; fewer stages fit more of them.
FD_CONFIGS = [(sp, bs, w, st) for sp in (32, 64, 128) for bs in (64, 128, 256) for w in (4, 8) for st in (2, 3, 4, 5)
              if bs * st <= 512]
# --fd-sweep wide: also 1 and 2 warps (no cross-warp reductions per block), 32 positions and 256 splits
FD_CONFIGS_WIDE = FD_CONFIGS + [(sp, bs, w, st) for sp in (32, 64, 128, 256) for bs in (32, 64, 128) for w in (1, 2)
                                for st in (2, 3, 4) if bs * st <= 512]
# and the best few of that sweep in the default one (results/h200/decode_fd_wide.md: int8 128 splits of
# 32 positions, 1 warp, 60.0% against 56.1% for the default sweep's best; fp16 128 x 64, 2 warps, 84.0%)
FD_CONFIGS += [(128, 32, 1, 2), (128, 32, 1, 3), (64, 64, 2, 3), (128, 64, 2, 2), (32, 32, 1, 4)]


def check_correctness() -> dict:
    """Triton vs torch backend on a 2-layer 8B-shaped model; greedy tokens on the tiny models."""
    out = {}
    ckpt = synthetic_checkpoint("synthetic:llama3.1-8b", bits=4, num_layers=2, dtype=torch.bfloat16)
    # A fixed prompt: on random weights a few tokens give ill-conditioned rows, whose logits move by
    # 10-100% under bf16 rounding alone (the torch backend's own bf16 residual stream included), so
    # each row is also compared with the torch backend in fp32 (benchmarks/diag_prefill.py --trace
    # shows every kernel matching its reference on those rows).
    ids = torch.randint(0, 128256, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    a = qruntime.Model(ckpt, device="cuda", backend="torch", max_seq_len=128).logits(ids).float()
    a32 = qruntime.Model(ckpt, device="cuda", backend="torch", max_seq_len=128, dtype=torch.float32).logits(ids).float()
    b = qruntime.Model(ckpt, device="cuda", backend="triton", max_seq_len=128).logits(ids).float()
    out["8b_2layer_w4_rel_err"] = ((a - b).norm() / a.norm()).item()
    out["8b_2layer_w4_median_row_rel_err"] = ((a - b).norm(dim=-1) / a.norm(dim=-1)).median().item()
    out["8b_2layer_w4_top1_agree"] = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    out["8b_2layer_w4_triton_vs_fp32_rel_err"] = ((a32 - b).norm() / a32.norm()).item()
    out["8b_2layer_w4_torch_bf16_vs_fp32_rel_err"] = ((a32 - a).norm() / a32.norm()).item()
    print(f"8B-shaped 2-layer w4 bf16: triton vs torch logits rel err {out['8b_2layer_w4_rel_err']:.2e} "
          f"(median row {out['8b_2layer_w4_median_row_rel_err']:.2e}), top-1 agreement {out['8b_2layer_w4_top1_agree']:.3f}; "
          f"against torch fp32: triton {out['8b_2layer_w4_triton_vs_fp32_rel_err']:.2e}, "
          f"torch bf16 {out['8b_2layer_w4_torch_bf16_vs_fp32_rel_err']:.2e}", flush=True)
    # the int8 KV cache: prefill attention reads the codes it just wrote (the quantization's noise on top)
    b = qruntime.Model(ckpt, device="cuda", backend="triton", max_seq_len=128, kv_cache="int8").logits(ids).float()
    out["8b_2layer_w4_kv8_rel_err"] = ((a - b).norm() / a.norm()).item()
    out["8b_2layer_w4_kv8_top1_agree"] = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    print(f"8B-shaped 2-layer w4 bf16, int8 KV cache: triton vs torch logits rel err {out['8b_2layer_w4_kv8_rel_err']:.2e}, "
          f"top-1 agreement {out['8b_2layer_w4_kv8_top1_agree']:.3f}", flush=True)
    del ckpt
    out.update(check_decode_steps())
    out.update(check_large_activations())
    import tempfile
    from pathlib import Path

    from qruntime.demo import build_tiny_model
    from qruntime.runtime import read_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("llama", "qwen2", "qwen3"):
            path = build_tiny_model(Path(tmp) / variant, variant, with_tokenizer=False)
            for bits in (4, 16):
                ck = read_checkpoint(path, bits=None if bits == 16 else bits, group_size=32)
                ref = qruntime.Model(ck, device="cuda", backend="torch", dtype=torch.float32)
                fast = qruntime.Model(ck, device="cuda", backend="triton", dtype=torch.float32)
                ref.eos_ids = fast.eos_ids = set()
                prompt = list(range(5, 21))
                same = list(ref.generate_ids(prompt, 64)) == list(fast.generate_ids(prompt, 64))
                out[f"tiny_{variant}_w{bits}_greedy64_identical"] = same
                print(f"tiny {variant} w{bits}: greedy 64 tokens identical: {same}", flush=True)
    return out


def check_decode_steps(steps: int = 8, spec: str = "synthetic:llama3.1-8b") -> dict:
    """The decode step itself (CUDA graph, PDL, packed GEMVs with the decode step's tiles) on a
    2-layer model of `spec`'s shapes: each step's logits against the torch backend's on the same prefix."""
    out = {}
    short = spec.split(":")[-1].split("-")[-1]  # "8b", "7b", "1b": the result keys' prefix
    for bits, kv in ((4, "auto"), (8, "auto"), (4, "int8"), (16, "auto")):
        ckpt = synthetic_checkpoint(spec, bits=bits, num_layers=2, dtype=torch.bfloat16)
        ref = qruntime.Model(ckpt, device="cuda", backend="torch", max_seq_len=128)
        fast = qruntime.Model(ckpt, device="cuda", backend="triton", max_seq_len=128, kv_cache=kv)
        name = f"{short}_2layer_w{bits}" + ("_kv8" if kv == "int8" else "")
        r = fast.runner
        ids = torch.randint(0, synthetic_config(spec).vocab_size, (48,), generator=torch.Generator().manual_seed(1)).tolist()
        r.prefill(torch.tensor(ids[:-1], device="cuda"))
        r.token.fill_(ids[-1]); r.pos.fill_(len(ids) - 1); r.seq_len.fill_(len(ids))
        # also the torch backend in fp32, to tell the bf16 reference's own rounding apart from ours
        ref32 = qruntime.Model(ckpt, device="cuda", backend="torch", max_seq_len=128, dtype=torch.float32)
        errs, agree, errs32, ref_errs32, agree32 = [], 0, [], [], 0
        for _ in range(steps):
            r.step()
            expected = ref.logits(ids)[-1].float()
            exact = ref32.logits(ids)[-1].float()
            got = r.logits[0].float()
            errs.append(((got - expected).norm() / expected.norm()).item())
            agree += int(got.argmax() == expected.argmax())
            errs32.append(((got - exact).norm() / exact.norm()).item())
            ref_errs32.append(((expected - exact).norm() / exact.norm()).item())
            agree32 += int(got.argmax() == exact.argmax())
            ids.append(int(r.token))
        out[f"{name}_decode_steps_max_rel_err"] = max(errs)
        out[f"{name}_decode_steps_top1_agree"] = agree / steps
        print(f"{spec} 2-layer w{bits} KV {kv} decode steps (graph): max rel err {max(errs):.2e}, top-1 {agree}/{steps}",
              flush=True)
        out[f"{name}_decode_steps_triton_vs_fp32_max_rel_err"] = max(errs32)
        out[f"{name}_decode_steps_torch_bf16_vs_fp32_max_rel_err"] = max(ref_errs32)
        out[f"{name}_decode_steps_top1_agree_fp32"] = agree32 / steps
        print(f"  against the torch backend in fp32: triton {max(errs32):.2e} (top-1 {agree32}/{steps}), "
              f"torch bf16 {max(ref_errs32):.2e}", flush=True)
        del ckpt, ref, ref32, fast
        gc.collect()
        torch.cuda.empty_cache()
    return out


def check_large_activations() -> dict:
    """Packed GEMV on inputs in the thousands (a down_proj input reaches them in some models: the
    kernel's integer activations take their step from the slice's largest |x|) against the fp32
    reference."""
    from qruntime.kernels.layout import prepare
    from qruntime.quantizers.rtn import quantize_rtn

    out = {}
    k, n = 14336, 4096
    for bits in (4, 8):
        lin = quantize_rtn(torch.randn(n, k, device="cuda") * 0.02, bits, 128, False)
        t = prepare(lin, torch.device("cuda"), torch.float16)
        x = torch.randn(1, k, device="cuda")
        x[0, 100], x[0, 9000] = 2500.0, -4000.0
        x = x.half()
        y = torch.zeros(1, n, device="cuda")
        qmatmul_accumulate(x, t, y)
        ref = R.linear(x.float(), lin)
        out[f"gemv_w{bits}_large_x_rel_err"] = ((y - ref).norm() / ref.norm()).item()
        print(f"w{bits} GEMV with |x| up to 4000: rel err {out[f'gemv_w{bits}_large_x_rel_err']:.1e}", flush=True)
    return out


def linear_bytes(ckpt) -> int:
    return sum(l.nbytes() for l in ckpt.linears.values()) if "lm_head" in ckpt.linears else \
        sum(l.nbytes() for l in ckpt.linears.values()) + ckpt.dense["model.embed_tokens.weight"].numel() * 2


def time_decode(model, prompt_len=128, new_tokens=256, repeats=3) -> float:
    """Median ms per decode step (graph replay: step + argmax + position update) over `new_tokens`."""
    r = model.runner
    times = []
    for _ in range(repeats):
        prefill_and_capture(r, model.config.vocab_size, prompt_len)
        times.append(time_replays(r, new_tokens))
    return statistics.median(times)


def time_hf(spec: str, prompt_len=128, new_tokens=256) -> float:
    """HF transformers bf16 on the spec's shapes (Llama's or Qwen2's model, random weights): ms per
    decoded token, as `qruntime bench --peer hf` times it (medians of 3 runs)."""
    model = hf_model(spec, torch.device("cuda"))
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), device="cuda")
    ms = generate_ms_per_token(model, ids, new_tokens, repeats=3)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return ms


def decode_model(ckpt, prompt_len: int) -> "qruntime.Model":
    """`ckpt` on the triton backend with room for a `prompt_len` prompt and time_decode's tokens."""
    return qruntime.Model(ckpt, device="cuda", backend="triton", max_seq_len=max(512, prompt_len + 257))


def bench_e2e(bw: float, specs, peer: bool, bits=(16, 8, 4), prompt_len: int = 128) -> list[dict]:
    rows = []
    for spec in specs:
        for b in bits:
            ckpt = synthetic_checkpoint(spec, bits=b, dtype=torch.bfloat16)
            pw = linear_bytes(ckpt)
            model = decode_model(ckpt, prompt_len)
            del ckpt
            with pdl(False):
                ms_plain = time_decode(model, prompt_len)
            model.runner.graph = None  # recaptured with PDL launches
            with pdl(True):
                ms = time_decode(model, prompt_len)
            floor = pw / bw * 1e3
            rows.append(dict(model=spec, weights=f"w{b}", group=128 if b < 16 else None, kv="kv16", prompt=prompt_len,
                             ms_per_token=ms, tok_per_s=1e3 / ms, weight_bytes=pw, floor_ms=floor,
                             ratio_to_floor=ms / floor, efficiency=floor / ms, ms_per_token_no_pdl=ms_plain))
            print(f"{spec} w{b}: {ms:7.3f} ms/token ({1e3 / ms:6.1f} tok/s); floor B {floor:6.3f} ms; "
                  f"{ms / floor:4.2f}x floor ({100 * floor / ms:4.1f}%); without PDL {ms_plain:7.3f} ms", flush=True)
            del model
            gc.collect()
            torch.cuda.empty_cache()
        if peer:
            ms = time_hf(spec)
            ckpt_bytes = 2 * sum(n * k for _, (n, k) in __import__("qruntime.checkpoint", fromlist=["x"]).expected_linear_shapes(
                synthetic_config(spec), has_lm_head=True))
            floor = ckpt_bytes / bw * 1e3
            rows.append(dict(model=spec, weights="hf-bf16", ms_per_token=ms, tok_per_s=1e3 / ms, weight_bytes=ckpt_bytes,
                             floor_ms=floor, ratio_to_floor=ms / floor, efficiency=floor / ms))
            print(f"{spec} HF transformers bf16: {ms:7.3f} ms/token ({1e3 / ms:6.1f} tok/s); {ms / floor:4.2f}x its floor", flush=True)
    return rows


# the datasheet's memory bandwidth (THEORY.md: report against it and against the measured figure)
DATASHEET_BW = {"NVIDIA H200": 4.8e12, "NVIDIA H100 80GB HBM3": 3.35e12}


def markdown(env, bw, gemv, fd, corr, e2e) -> str:
    sheet = DATASHEET_BW.get(env.get("gpu"))
    fastest = max((r["tbps"] * 1e12 for r in gemv + fd), default=0.0)
    lines = [f"# Decode benchmark ({env.get('gpu')}, driver {env.get('driver')}, torch {env['torch']}, triton {env['triton']}, CUDA {env.get('cuda')})",
             "", f"Measured streaming read bandwidth: {bw / 1e12:.3f} TB/s (2 GiB x.sum(), median of 20); datasheet: "
             + (f"{sheet / 1e12:.2f} TB/s." if sheet else "not known for this card.")]
    if fastest > bw:
        lines += ["", f"One kernel in the tables below read {fastest / 1e12:.3f} TB/s, more than x.sum() did: that figure",
                  "understates what the card can read, and ratios to it flatter; the end-to-end table also gives the",
                  "floor at the datasheet's bandwidth."]
    if gemv:  # each section only where the run made it (--skip)
        lines += ["",
                  "## GEMV (int-quantized, group 128, asymmetric; graph of launches over rotating buffers)", "",
                  "Launched with programmatic dependent launch (PDL, as in the decode step: each GEMV requests its",
                  "weights while the previous one drains); the last two columns are the same launches without it.", "",
                  "| bits | M | K | N | us | TB/s | % of read BW | us, no PDL | % no PDL |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['bits']} | {r['m']} | {r['k']} | {r['n']} | {r['us']:.2f} | {r['tbps']:.3f} | {100 * r['frac_of_read_bw']:.1f} | "
                  f"{r['us_no_pdl']:.2f} | {100 * r['frac_no_pdl']:.1f} |" for r in gemv]
    if fd:
        lines += ["", "## Flash-decoding (32 q / 8 kv heads, head_dim 128)", "",
                  "| cache | context | us | TB/s | % of read BW | rel err | best of sweep |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['cache']} | {r['context']} | {r['us']:.1f} | {r['tbps']:.3f} | {100 * r['frac_of_read_bw']:.1f} | {r['rel_err']:.1e} | "
                  f"{r['config']} |" for r in fd]
    if corr:
        lines += ["", "## Correctness on the GPU", ""] + [f"- {k}: {v}" for k, v in corr.items()]
    if e2e:
        lines += ["", "## End to end (batch 1, 128-token prompt, 256 new tokens, random weights, exact shapes)", "",
                  "| model | weights | ms/token | tok/s | floor B (ms) | x floor | % of floor | x datasheet floor | ms/token, no PDL |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['weights']} | {r['ms_per_token']:.3f} | {r['tok_per_s']:.1f} | {r['floor_ms']:.3f} | "
                  f"{r['ratio_to_floor']:.2f} | {100 * r['efficiency']:.1f} | "
                  f"{r['ms_per_token'] / (r['weight_bytes'] / sheet * 1e3) if sheet else float('nan'):.2f} | "
                  f"{r.get('ms_per_token_no_pdl', float('nan')):.3f} |" for r in e2e]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: gemv,fd,corr,e2e,peer")
    ap.add_argument("--spec", action="append", help="end-to-end models (repeatable; default: Llama-3.1-8B and Llama-3.2-1B)")
    ap.add_argument("--fd-sweep", choices=("default", "wide"), default="default",
                    help="flash-decoding configs: the default sweep, or wide (also 1-2 warps, 32 positions, 256 splits)")
    args = ap.parse_args()
    skip = set(args.skip.split(","))
    env = environment()
    bw = measure_read_bandwidth()
    print(f"# {env}\n# read bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    gemv = [] if "gemv" in skip else bench_gemv(bw)
    fd = [] if "fd" in skip else bench_flash_decode(bw, configs=FD_CONFIGS_WIDE if args.fd_sweep == "wide" else None)
    corr = {}
    if "corr" not in skip:
        corr = check_correctness()  # 8B's decode steps among its checks
        for spec in args.spec or []:
            if spec != "synthetic:llama3.1-8b":  # the other models' shapes take their own tiles
                corr.update(check_decode_steps(spec=spec))
    e2e = [] if "e2e" in skip else bench_e2e(bw, args.spec or ["synthetic:llama3.1-8b", "synthetic:llama3.2-1b"], peer="peer" not in skip)
    dump(f"{args.out}/decode.json", dict(env=env, read_bw=bw, gemv=gemv, flash_decode=fd, correctness=corr, e2e=e2e))
    md = markdown(env, bw, gemv, fd, corr, e2e)
    with open(f"{args.out}/decode.md", "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
