"""Decode ms/token (w4) with the decode step's flash-decoding tiles (block_s, num_warps) and split
count overridden, to choose DECODE_ATTENTION_* and the split count in qruntime.engine.triton_runner.

    PYTHONPATH=$(bash benchmarks/stage_package.sh):. python3 benchmarks/fd_variants.py TAG [SPEC ...]
"""
import sys

import torch

import qruntime.engine.triton_runner as tr
from bench_decode import time_decode
from gpu_common import synthetic_model

tag = sys.argv[1]
for spec in sys.argv[2:] or ("synthetic:llama3.1-8b",):
    model = synthetic_model(spec, 4)
    r = model.runner
    for splits in (8, 16, 32):
        r.num_splits = splits
        r.workspace = (torch.empty((splits, r.cfg.num_heads, r.cfg.head_dim), device="cuda"),
                       torch.empty((splits, r.cfg.num_heads), device="cuda"))
        for bs, nw in ((32, 4), (64, 4), (64, 8), (128, 4)):
            tr.DECODE_ATTENTION_BLOCK, tr.DECODE_ATTENTION_WARPS = bs, nw  # read at each capture
            r.graph = None
            ms = [time_decode(model, repeats=2)]
            print(f"{tag} {spec} w4 fd splits={splits} block_s={bs} warps={nw}: {min(ms):.4f} ms/token {ms}", flush=True)
    del model
    torch.cuda.empty_cache()
