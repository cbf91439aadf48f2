"""Decode ms/token (w4) with the decode step's flash-decoding tiles (block_s, num_warps) overridden,
to choose kernels' DECODE_ATTENTION_* in qruntime.engine.triton_runner.

    PYTHONPATH=$(bash benchmarks/stage_package.sh):. python3 benchmarks/fd_variants.py TAG [SPEC ...]
"""
import sys

import torch

import qruntime
import qruntime.engine.triton_runner as tr
from bench_decode import time_decode
from qruntime.synthetic import synthetic_checkpoint

tag = sys.argv[1]
for spec in sys.argv[2:] or ("synthetic:llama3.1-8b",):
    model = qruntime.Model(synthetic_checkpoint(spec, bits=4, dtype=torch.bfloat16), device="cuda", backend="triton",
                           max_seq_len=512)
    for bs, nw in ((128, 4), (64, 8)):
        tr.DECODE_ATTENTION_BLOCK, tr.DECODE_ATTENTION_WARPS = bs, nw  # read at each capture
        model.runner.graph = None
        ms = [time_decode(model, repeats=2)]
        print(f"{tag} {spec} w4 fd block_s={bs} warps={nw}: {min(ms):.4f} ms/token {ms}", flush=True)
    del model
    torch.cuda.empty_cache()
