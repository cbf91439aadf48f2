"""Decode ms/token of models whose shapes the tuned table never measured, by how such shapes
choose their GEMV tiles (kernels.tuning.splitk_config): "fixed", DEFAULT_TILE everywhere (as before);
"rule", the default (DEFAULT_TILE unless it leaves the card underfilled, then the nearest measured
shape's entry); "nearest", the nearest entry everywhere. One model per spec, the variants
alternated and the step recaptured for each (the tiles are chosen at capture), so that neither run
noise nor where a model's weights landed in memory tells them apart:

    PYTHONPATH=$(bash benchmarks/stage_package.sh):. python3 benchmarks/ab_nearest.py \
        [--spec synthetic:llama3.2-3b ...] [--bits 4 8] [--rounds 3] [--per-role]

Prints each model's ms/token each way and its floor B (linear bytes / read bandwidth). --per-role
also times variants where only one role's GEMV (q|k|v, o, gate|up, down, lm_head) takes the
nearest entry, the others DEFAULT_TILE: which shapes gain and which lose."""
import argparse
import contextlib
import gc
import statistics

import torch

from bench_decode import decode_model, linear_bytes, time_decode
from gpu_common import environment, measure_read_bandwidth
from qruntime.kernels import tuning
from qruntime.synthetic import synthetic_checkpoint, synthetic_config

UNMEASURED = ["synthetic:llama3.2-3b", "synthetic:qwen2.5-0.5b", "synthetic:qwen2.5-1.5b", "synthetic:qwen2.5-3b", "synthetic:qwen3-4b",
              "synthetic:qwen3-8b", "synthetic:llama2-7b", "synthetic:qwen2.5-14b"]


def role_shapes(spec: str) -> dict[str, tuple[int, int]]:
    """(N, K) of each decode-step GEMV role of `spec`."""
    c = synthetic_config(spec)
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return {"qkv": (q + 2 * kv, c.hidden_size), "o": (c.hidden_size, q), "gate_up": (2 * c.intermediate_size, c.hidden_size),
            "down": (c.hidden_size, c.intermediate_size), "lm_head": (c.vocab_size, c.hidden_size)}


@contextlib.contextmanager
def tile_choice(variant: str, only_shape: tuple[int, int] | None = None):
    """Unmeasured shapes' tiles as `variant` chooses them (see the module's doc); with only_shape, the
    nearest entry for that (N, K) alone."""
    threshold, nearest = tuning.UNDERFILLED_PROGRAMS_PER_SM, tuning.nearest_entry
    tuning.UNDERFILLED_PROGRAMS_PER_SM = {"fixed": 0, "rule": threshold, "nearest": 10 ** 9}[variant]
    if only_shape is not None:
        tuning.nearest_entry = lambda table, prefix, n, k: nearest(table, prefix, n, k) if (n, k) == only_shape else None
    try:
        yield
    finally:
        tuning.UNDERFILLED_PROGRAMS_PER_SM, tuning.nearest_entry = threshold, nearest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", nargs="+", default=UNMEASURED)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--per-role", action="store_true")
    args = ap.parse_args()
    bw = measure_read_bandwidth()
    print(f"# {environment()}\n# read bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    for spec in args.spec:
        for bits in args.bits:
            variants = {"fixed": ("fixed", None), "rule": ("rule", None), "nearest": ("nearest", None)}
            if args.per_role:
                variants.update({f"only {role}": ("nearest", shape) for role, shape in role_shapes(spec).items()})
            ckpt = synthetic_checkpoint(spec, bits=bits, dtype=torch.bfloat16)
            floor = linear_bytes(ckpt) / bw * 1e3
            model = decode_model(ckpt, args.prompt)
            del ckpt
            times = {v: [] for v in variants}
            for _ in range(args.rounds):
                for variant, choice in variants.items():
                    with tile_choice(*choice):
                        model.runner.graph = None  # recaptured with this variant's tiles
                        times[variant].append(time_decode(model, args.prompt, repeats=2))
            ms = {v: statistics.median(t) for v, t in times.items()}
            print(f"{spec} w{bits}: floor B {floor:.4f} ms; " + "; ".join(
                f"{v} {ms[v]:.4f} ms/token ({ms[v] / floor:.2f}x floor B, {100 * (ms[v] / ms['fixed'] - 1):+.1f}%)"
                for v in list(variants)[:3]), flush=True)
            for role, (n, k) in role_shapes(spec).items():
                head_bits = 8 if role == "lm_head" else bits
                chosen = {}
                for variant in ("fixed", "rule", "nearest"):
                    with tile_choice(variant):
                        chosen[variant] = tuning.splitk_config(head_bits, n, k, 1, torch.device("cuda"), True)
                print(f"  {role} w{head_bits} N={n} K={k}: " + ", ".join(f"{v} {c}" for v, c in chosen.items()), flush=True)
            for variant in variants:
                print(f"  {variant} {variants[variant][1] or ''}: {ms[variant]:.4f} ms/token, "
                      f"{100 * (ms[variant] / ms['fixed'] - 1):+.1f}% against fixed; rounds "
                      f"{[f'{t:.4f}' for t in times[variant]]}", flush=True)
            del model
            gc.collect()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
