"""One decode figure for a process-to-process comparison of two code versions (run alternately):
ms/token of a random-weight model's captured step, or of a packed checkpoint's (--checkpoint: e.g.
one `qruntime convert` made from llama.cpp's Q4_K_M file, to compare the tables' small-group tiles).

    PYTHONPATH=$(bash benchmarks/stage_package.sh):. python3 benchmarks/e2e_once.py TAG [SPEC] [BITS]
        [--kv int8] [--prompt 8192] [--group 32] [--zeros float] [--dtype float16] [--checkpoint DIR]
"""
import argparse

import torch

from bench_decode import time_decode
from gpu_common import checkpoint_model, synthetic_model

ap = argparse.ArgumentParser()
ap.add_argument("tag")
ap.add_argument("spec", nargs="?", default="synthetic:llama3.1-8b")
ap.add_argument("bits", nargs="?", type=int, default=4)
ap.add_argument("--kv", default="auto", help="KV cache: auto (the model's dtype) or int8")
ap.add_argument("--prompt", type=int, default=128, help="prompt tokens before the 256 timed steps")
ap.add_argument("--group", type=int, default=128, help="SPEC's quantization group size")
ap.add_argument("--zeros", default="int", choices=("int", "symmetric", "float"),
                help="SPEC's zero points: integer, symmetric (GGUF's Q8_0, Q4_0) or float offsets (its K types)")
ap.add_argument("--dtype", choices=["bfloat16", "float16"],
                help="activations (default: SPEC's bfloat16, or the checkpoint config's own dtype)")
ap.add_argument("--checkpoint", help="a packed checkpoint to time instead of SPEC's random weights")
args = ap.parse_args()
if args.checkpoint:
    model = checkpoint_model(args.checkpoint, max_seq_len=args.prompt + 512, kv_cache=args.kv, dtype=args.dtype)
    what = args.checkpoint
else:
    model = synthetic_model(args.spec, args.bits, max_seq_len=args.prompt + 512, kv_cache=args.kv,
                            group_size=args.group, dtype=getattr(torch, args.dtype or "bfloat16"),
                            zero_mode=args.zeros)
    what = f"{args.spec} w{args.bits}g{args.group} {args.zeros}"
ms = [time_decode(model, prompt_len=args.prompt, repeats=3) for _ in range(3)]
print(f"{args.tag} {what} {str(model.dtype)[6:]} kv={args.kv} prompt {args.prompt}: median {sorted(ms)[1]:.4f} ms/token "
      f"{['%.4f' % m for m in ms]}", flush=True)
