"""Decode ms/token of the same model with an environment switch the kernels read at launch (e.g.
QRUNTIME_PDL, or one added for an experiment) flipped back and forth in one process, the step
recaptured each time, so that card-to-card and run noise cancel out:

    PYTHONPATH=$(bash benchmarks/stage_package.sh):. python3 benchmarks/ab_env.py VAR VALUE1 VALUE2 \
        [--spec SPEC ...] [--bits 4] [--rounds 3] [--prompt 128]

VAR may also name a setting of the triton runner:
- runner.fused_merge (0/1: o_proj merges flash-decoding's splits, or the combine launch does);
- runner.num_splits (the decode step's split count);
- runner.attention_tile (BLOCKxWARPS[xSTAGES] of its flash-decoding, e.g. 64x8 or 64x8x2; no stages: the
  runner's own, 0: Triton's default);
- runner.plain_step_ends (0/1: the step's start and lm_head's zeroing as torch launches);
- runner.deferred_norms (0/1: the layers' RMSNorms as launches, or deferred to the kernels after their GEMVs);
- runner.carveout (the preferred shared-memory carveout, in percent, of every kernel compiled so far; -1: the
  driver's choice; list -1 first, so that the kernels are compiled before the others);
or tile:KEY, a packed-GEMV entry of the tuned table as BLOCK_N,BLOCK_K,K_ITERS,WARPS (e.g.
tile:step/w4/m1/n4096/k4096 64,128,1,1).
"""
import argparse
import os

import torch

from bench_decode import time_decode
import qruntime.engine.triton_runner as runner_mod
from qruntime.kernels import tuning
from gpu_common import (prefill_and_capture, set_decode_attention_tile, set_decode_splits, synthetic_model,
                        set_shared_carveout, use_combine_launch, use_deferred_norms)

_REAL = dict(embed_rmsnorm=runner_mod.embed_rmsnorm)


def _plain_embed_rmsnorm(table, index, weight, eps, rows, out):
    """The step's start as it was: embedding lookup and copy (two torch launches), then RMSNorm."""
    rows.copy_(table.index_select(0, index))
    return runner_mod.rmsnorm(rows, weight, eps, out=out)


def _plain_step_ends(r, on: bool) -> None:
    """runner.plain_step_ends=1: the step starts with the torch embedding lookup and copy and zeroes
    the logits with a torch launch before lm_head, as before embed_rmsnorm (layer 0 still zeroes
    the logits too, a few hundred KB of stores: the old step is emulated a little slow)."""
    runner_mod.embed_rmsnorm = _plain_embed_rmsnorm if on else _REAL["embed_rmsnorm"]
    lm_head = r.lm_head
    if on and not hasattr(lm_head, "_real_accumulate"):
        lm_head._real_accumulate = lm_head.accumulate
        lm_head.accumulate = lambda x, out: (out.zero_(), lm_head._real_accumulate(x, out))
    elif not on and hasattr(lm_head, "_real_accumulate"):
        lm_head.accumulate = lm_head._real_accumulate
        del lm_head._real_accumulate


def set_switch(r, var: str, value: str) -> None:
    if var.startswith("tile:"):  # a tuned-table entry, e.g. tile:step/w4/m1/n4096/k4096 64,128,1,1
        tuning._table_for(torch.device("cuda"))[var[len("tile:"):]] = [*map(int, value.split(",")), "packed"]
        return
    if not var.startswith("runner."):
        os.environ[var] = value
        return
    name = var[len("runner."):]
    if name == "fused_merge":
        use_combine_launch(r, value != "1")
    elif name == "attention_tile":  # BLOCKxWARPS[xSTAGES] of the decode step's flash-decoding (0: Triton's default)
        set_decode_attention_tile(*[int(v) or None for v in value.split("x")])  # no stages: the runner's
    elif name == "plain_step_ends":
        _plain_step_ends(r, value == "1")
    elif name == "deferred_norms":
        use_deferred_norms(r, value == "1")
    elif name == "carveout":  # preferred shared-memory carveout of every compiled kernel (-1: the driver's)
        print(f"  carveout {value}: {set_shared_carveout(int(value))} kernels", flush=True)
    elif name == "num_splits":
        set_decode_splits(r, int(value))
    else:
        raise SystemExit(f"unknown runner setting {name}")

ap = argparse.ArgumentParser()
ap.add_argument("var")
ap.add_argument("values", nargs="+")
ap.add_argument("--spec", action="append")
ap.add_argument("--bits", type=int, default=4)
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--prompt", type=int, default=128, help="prompt length: the context the 256 timed steps start from")
args = ap.parse_intermixed_args()
for spec in args.spec or ["synthetic:llama3.1-8b"]:
    model = synthetic_model(spec, args.bits, max_seq_len=args.prompt + 384)
    r = model.runner
    reference, results = None, {v: [] for v in args.values}
    for _ in range(args.rounds):
        for value in args.values:
            set_switch(r, args.var, value)
            r.graph = None
            torch.manual_seed(0)
            prefill_and_capture(r, model.config.vocab_size, args.prompt)
            tokens = []
            for _ in range(32):
                r.graph.replay()
                tokens.append(r.token.clone())
            tokens = torch.cat(tokens).tolist()
            reference = reference or tokens
            ms = time_decode(model, prompt_len=args.prompt, repeats=3)
            results[value].append(ms)
            print(f"{spec} w{args.bits} {args.var}={value}: {ms:.4f} ms/token; greedy "
                  f"{sum(a == b for a, b in zip(tokens, reference))}/32 as the first", flush=True)
    for value, ms in results.items():
        print(f"{spec} w{args.bits} {args.var}={value}: best {min(ms):.4f} median {sorted(ms)[len(ms) // 2]:.4f} ms/token")
    del model, r
    torch.cuda.empty_cache()
