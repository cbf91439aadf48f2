"""Decode ms/token (w4) with the decode step's flash-decoding tiles (block_s, num_warps) and split
count overridden, to choose DECODE_ATTENTION_* and the split count in qruntime.engine.triton_runner.

    PYTHONPATH=$(bash benchmarks/stage_package.sh):. python3 benchmarks/fd_variants.py TAG [SPEC ...]
"""
import sys

import torch

from bench_decode import time_decode
from gpu_common import set_decode_attention_tile, set_decode_splits, synthetic_model

tag = sys.argv[1]
for spec in sys.argv[2:] or ("synthetic:llama3.1-8b",):
    model = synthetic_model(spec, 4)
    r = model.runner
    for splits in (8, 16, 32):
        set_decode_splits(r, splits)
        for bs, nw in ((32, 4), (64, 4), (64, 8), (128, 4)):
            set_decode_attention_tile(bs, nw)
            r.graph = None
            ms = [time_decode(model, repeats=2)]
            print(f"{tag} {spec} w4 fd splits={splits} block_s={bs} warps={nw}: {min(ms):.4f} ms/token {ms}", flush=True)
    del model
    torch.cuda.empty_cache()
