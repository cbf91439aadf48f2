"""What the decode step's small launches cost, as upper bounds: the step is recaptured with some of
them left out (the tokens are then wrong; only the time counts) and timed in the same process as
the full step, round after round, so that run noise cancels out. A launch that is left out can
save at most what this shows; a fusion that removes it saves less (its work moves elsewhere).

    PYTHONPATH=$(bash benchmarks/stage_package.sh):. python3 benchmarks/upper_bounds.py \
        [--spec SPEC ...] [--bits 4] [--rounds 2] [--combine] [--norm-launches]

Variants: attention (flash-decoding). --norm-launches: the step with its RMSNorms launched (as
before they were deferred to the kernels after their GEMVs), with two more variants: post_norm
(the RMSNorm after o_proj) and inner_norms (both RMSNorms of every layer but layer 0's first).
--combine: the step as it was before o_proj merged flash-decoding's splits (the combine kernel,
then o_proj), with the variants combine (the combine launch left out) and, with --norm-launches,
inner_norms+combine (benchmarks/results/h200/upper_bounds.log was measured with both).
"""
import argparse
import contextlib

import torch

import qruntime.engine.triton_runner as runner_mod
import qruntime.kernels.flash_decode as fd_mod
from bench_decode import time_decode
from gpu_common import synthetic_model, use_combine_launch, use_deferred_norms


class _NoLaunch:
    """Stands in for a Triton kernel: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def leave_out(runner, what: set[str]):
    real_norm, real_fd, real_combine = runner_mod.rmsnorm, runner_mod.flash_decode, fd_mod._combine_kernel
    real_splits = runner_mod.flash_decode_splits
    post = {id(lw.post_norm) for lw in runner.layers}
    inner_input = {id(lw.input_norm) for lw in runner.layers[1:]}

    def norm(x, weight, *args, **kwargs):
        if kwargs.get("out") is None:  # prefill (no out buffer): always run
            return real_norm(x, weight, *args, **kwargs)
        if ("post_norm" in what or "inner_norms" in what) and id(weight) in post:
            return kwargs.get("out")
        if "inner_norms" in what and id(weight) in inner_input:
            return kwargs.get("out")
        return real_norm(x, weight, *args, **kwargs)

    runner_mod.rmsnorm = norm
    if "attention" in what:
        runner_mod.flash_decode = lambda *args, **kwargs: None
        runner_mod.flash_decode_splits = lambda *args, **kwargs: kwargs["workspace"]  # as last written
    if "combine" in what:
        fd_mod._combine_kernel = _NoLaunch()
    try:
        yield
    finally:
        runner_mod.rmsnorm, runner_mod.flash_decode, fd_mod._combine_kernel = real_norm, real_fd, real_combine
        runner_mod.flash_decode_splits = real_splits


ap = argparse.ArgumentParser()
ap.add_argument("--spec", action="append")
ap.add_argument("--bits", type=int, default=4)
ap.add_argument("--rounds", type=int, default=2)
ap.add_argument("--combine", action="store_true", help="the step with the combine launch (o_proj not merging)")
ap.add_argument("--norm-launches", action="store_true", help="the step with its RMSNorm launches (not deferred)")
args = ap.parse_args()
VARIANTS = {"full step": set(), "no attention": {"attention"}}
if args.norm_launches:
    VARIANTS.update({"no post_norm": {"post_norm"}, "no inner norms": {"inner_norms"}})
if args.combine:
    VARIANTS["no combine"] = {"combine"}
if args.combine and args.norm_launches:
    VARIANTS["no inner norms, no combine"] = {"inner_norms", "combine"}
for spec in args.spec or ["synthetic:llama3.1-8b"]:
    model = synthetic_model(spec, args.bits)
    r = model.runner
    if args.combine:
        use_combine_launch(r, True)
    if args.norm_launches:
        use_deferred_norms(r, False)
    results = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, what in VARIANTS.items():
            r.graph = None
            torch.manual_seed(0)
            with leave_out(r, what):
                ms = time_decode(model, repeats=3)
            results[name].append(ms)
            print(f"{spec} w{args.bits} {name}: {ms:.4f} ms/token", flush=True)
    base = sorted(results["full step"])[len(results["full step"]) // 2]
    for name, ms in results.items():
        med = sorted(ms)[len(ms) // 2]
        print(f"{spec} w{args.bits} {name}: median {med:.4f} ms/token ({(med - base) * 1e3 / model.config.num_layers:+.2f} us a layer)")
    del model, r
    torch.cuda.empty_cache()
