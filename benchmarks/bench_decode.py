"""Issue-5 GPU benchmark: kernels' achieved bandwidth, GPU correctness, end-to-end decode vs the
bandwidth floor B and vs HF transformers, all in one run on one card.

    PYTHONPATH=$(bash benchmarks/stage_package.sh) python3 benchmarks/bench_decode.py --out DIR

Timing: CUDA graphs of many launches over rotating buffers (> L2) for kernels; graph replays of the
whole decode step for the engine; medians of repeats after warm-up. B = bytes of all linears
(codes + scales + zeros, lm_head included) / read bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import torch

from gpu_common import dump, environment, gemv_workload, measure_read_bandwidth, time_graph
import qruntime
from qruntime.kernels import reference as R
from qruntime.kernels.flash_decode import flash_decode
from qruntime.kernels.qmatmul import qmatmul_accumulate
from qruntime.synthetic import synthetic_checkpoint, synthetic_config

GEMV_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 128256)]  # (K, N)


def bench_gemv(bw: float) -> list[dict]:
    rows = []
    for bits in (4, 8):
        for (k, n) in GEMV_SHAPES:
            for m in (1, 16):
                lins, xs, outs, need = gemv_workload(k, n, m, bits)
                t0 = lins[0]
                t = time_graph([lambda i=i: qmatmul_accumulate(xs[i], lins[i], outs[i]) for i in range(len(lins))])
                rows.append(dict(bits=bits, group=128, m=m, k=k, n=n, us=t * 1e6, bytes=need, tbps=need / t / 1e12,
                                 frac_of_read_bw=need / t / bw, config=list(t0.splitk_config(m))))
                print(f"gemv w{bits} g128 M={m:2d} K={k:6d} N={n:6d}: {t * 1e6:8.2f} us {need / t / 1e12:.3f} TB/s "
                      f"{100 * need / t / bw:5.1f}% of read BW", flush=True)
                del lins, xs, outs
                torch.cuda.empty_cache()
    return rows


def bench_flash_decode(bw: float, context: int = 32768) -> list[dict]:
    rows = []
    h, kv, hd = 32, 8, 128
    for int8 in (False, True):
        copies = 3  # rotate layers so the 134+ MB caches are not served from L2
        caches = []
        for _ in range(copies):
            k = torch.randn(kv, context, hd, device="cuda", dtype=torch.float16)
            v = torch.randn(kv, context, hd, device="cuda", dtype=torch.float16)
            if int8:
                (kc, ks), (vc, vs) = R.quantize_kv_int8(k), R.quantize_kv_int8(v)
                caches.append(dict(k_cache=kc, v_cache=vc, k_scale=ks, v_scale=vs))
            else:
                caches.append(dict(k_cache=k, v_cache=v))
        q = torch.randn(h, hd, device="cuda", dtype=torch.float16)
        seq = torch.tensor([context], device="cuda", dtype=torch.int32)
        outs = [torch.empty(h * hd, device="cuda", dtype=torch.float16) for _ in range(copies)]
        splits = 64
        ws = [(torch.empty(splits, h, hd, device="cuda"), torch.empty(splits, h, device="cuda")) for _ in range(copies)]
        # correctness at this size against the reference (fp32)
        c = caches[0]
        kd = c["k_cache"].float() * (c["k_scale"][..., None] if int8 else 1)
        vd = c["v_cache"].float() * (c["v_scale"][..., None] if int8 else 1)
        flash_decode(q, num_splits=splits, seq_len=seq, out=outs[0], workspace=ws[0], **c)
        ref = R.attention_over_cache(q[None].float(), kd, vd, context - 1)[0]
        err = ((outs[0].float() - ref).norm() / ref.norm()).item()
        nbytes = sum(t.numel() * t.element_size() for t in caches[0].values()) + q.numel() * 2
        t = time_graph([lambda i=i: flash_decode(q, num_splits=splits, seq_len=seq, out=outs[i], workspace=ws[i], **caches[i])
                        for i in range(copies)] * 4)
        rows.append(dict(cache="int8" if int8 else "fp16", context=context, heads=h, kv_heads=kv, head_dim=hd,
                         us=t * 1e6, bytes=nbytes, tbps=nbytes / t / 1e12, frac_of_read_bw=nbytes / t / bw, rel_err=err))
        print(f"flash-decode {'int8' if int8 else 'fp16'} ctx {context}: {t * 1e6:8.1f} us {nbytes / t / 1e12:.3f} TB/s "
              f"{100 * nbytes / t / bw:5.1f}% of read BW  rel err {err:.1e}", flush=True)
        del caches
        torch.cuda.empty_cache()
    return rows


def check_correctness() -> dict:
    """Triton vs torch backend on a 2-layer 8B-shaped model; greedy tokens on the tiny models."""
    out = {}
    ckpt = synthetic_checkpoint("synthetic:llama3.1-8b", bits=4, num_layers=2, dtype=torch.bfloat16)
    ids = torch.randint(0, 128256, (64,)).tolist()
    a = qruntime.Model(ckpt, device="cuda", backend="torch", max_seq_len=128).logits(ids)
    b = qruntime.Model(ckpt, device="cuda", backend="triton", max_seq_len=128).logits(ids)
    out["8b_2layer_w4_rel_err"] = ((a - b).norm() / a.norm()).item()
    out["8b_2layer_w4_top1_agree"] = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    print(f"8B-shaped 2-layer w4 bf16: triton vs torch logits rel err {out['8b_2layer_w4_rel_err']:.2e}, "
          f"top-1 agreement {out['8b_2layer_w4_top1_agree']:.3f}", flush=True)
    del ckpt
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


def linear_bytes(ckpt) -> int:
    return sum(l.nbytes() for l in ckpt.linears.values()) if "lm_head" in ckpt.linears else \
        sum(l.nbytes() for l in ckpt.linears.values()) + ckpt.dense["model.embed_tokens.weight"].numel() * 2


def time_decode(model, prompt_len=128, new_tokens=256, repeats=3) -> float:
    """Median ms per decode step (graph replay: step + argmax + position update) over `new_tokens`."""
    r = model.runner
    times = []
    for _ in range(repeats):
        ids = torch.randint(0, model.config.vocab_size, (prompt_len,), device="cuda")
        logits = r.prefill(ids)
        r.token.copy_(logits[0].argmax().view(1))
        r.pos.fill_(prompt_len)
        r.seq_len.fill_(prompt_len + 1)
        if r.graph is None:
            r.capture()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(new_tokens):
            r.graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / new_tokens)
    return statistics.median(times)


def time_hf(spec: str, prompt_len=128, new_tokens=256) -> float:
    import transformers

    cfg = synthetic_config(spec)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        rope_scaling={"rope_type": "llama3", "factor": cfg.rope_scaling.factor, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), device="cuda")

    def run(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(8)
    t_full = statistics.median(run(new_tokens) for _ in range(2))
    t_one = statistics.median(run(1) for _ in range(3))
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return (t_full - t_one) / (new_tokens - 1) * 1e3


def bench_e2e(bw: float, specs, peer: bool) -> list[dict]:
    rows = []
    for spec in specs:
        for bits in (16, 8, 4):
            ckpt = synthetic_checkpoint(spec, bits=bits, dtype=torch.bfloat16)
            pw = linear_bytes(ckpt)
            model = qruntime.Model(ckpt, device="cuda", backend="triton", max_seq_len=512)
            del ckpt
            ms = time_decode(model)
            floor = pw / bw * 1e3
            rows.append(dict(model=spec, weights=f"w{bits}", group=128 if bits < 16 else None, kv="kv16",
                             ms_per_token=ms, tok_per_s=1e3 / ms, weight_bytes=pw, floor_ms=floor,
                             ratio_to_floor=ms / floor, efficiency=floor / ms))
            print(f"{spec} w{bits}: {ms:7.3f} ms/token ({1e3 / ms:6.1f} tok/s); floor B {floor:6.3f} ms; "
                  f"{ms / floor:4.2f}x floor ({100 * floor / ms:4.1f}%)", flush=True)
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


def markdown(env, bw, gemv, fd, corr, e2e) -> str:
    lines = [f"# Decode benchmark ({env.get('gpu')}, driver {env.get('driver')}, torch {env['torch']}, triton {env['triton']}, CUDA {env.get('cuda')})",
             "", f"Measured streaming read bandwidth: {bw / 1e12:.3f} TB/s (2 GiB x.sum(), median of 20).", "",
             "## GEMV (int-quantized, group 128, asymmetric; graph of launches over rotating buffers)", "",
             "| bits | M | K | N | us | TB/s | % of read BW |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['bits']} | {r['m']} | {r['k']} | {r['n']} | {r['us']:.2f} | {r['tbps']:.3f} | {100 * r['frac_of_read_bw']:.1f} |" for r in gemv]
    lines += ["", "## Flash-decoding (32 q / 8 kv heads, head_dim 128)", "", "| cache | context | us | TB/s | % of read BW | rel err |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['cache']} | {r['context']} | {r['us']:.1f} | {r['tbps']:.3f} | {100 * r['frac_of_read_bw']:.1f} | {r['rel_err']:.1e} |" for r in fd]
    lines += ["", "## Correctness on the GPU", ""] + [f"- {k}: {v}" for k, v in corr.items()]
    lines += ["", "## End to end (batch 1, 128-token prompt, 256 new tokens, random weights, exact shapes)", "",
              "| model | weights | ms/token | tok/s | floor B (ms) | x floor | % of floor |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['weights']} | {r['ms_per_token']:.3f} | {r['tok_per_s']:.1f} | {r['floor_ms']:.3f} | "
              f"{r['ratio_to_floor']:.2f} | {100 * r['efficiency']:.1f} |" for r in e2e]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: gemv,fd,corr,e2e,peer")
    args = ap.parse_args()
    skip = set(args.skip.split(","))
    env = environment()
    bw = measure_read_bandwidth()
    print(f"# {env}\n# read bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    gemv = [] if "gemv" in skip else bench_gemv(bw)
    fd = [] if "fd" in skip else bench_flash_decode(bw)
    corr = {} if "corr" in skip else check_correctness()
    e2e = [] if "e2e" in skip else bench_e2e(bw, ["synthetic:llama3.1-8b", "synthetic:llama3.2-1b"], peer="peer" not in skip)
    dump(f"{args.out}/decode.json", dict(env=env, read_bw=bw, gemv=gemv, flash_decode=fd, correctness=corr, e2e=e2e))
    md = markdown(env, bw, gemv, fd, corr, e2e)
    with open(f"{args.out}/decode.md", "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
