"""Where a decode step's time goes: per-kernel GPU time inside the captured step, from a profiler
trace of graph replays, next to the step's wall time.

    PYTHONPATH=$(bash benchmarks/stage_package.sh) python3 benchmarks/profile_decode.py \
        --spec synthetic:llama3.1-8b --bits 4 --out DIR

Prints, per kernel: launches per step, median duration, and its share of the step; then the sum
of kernel durations and the union of their intervals (PDL overlaps neighbours, so the sum can
exceed the union) against the step's wall time: what is left is launch gaps.
"""

from __future__ import annotations

import argparse
import collections
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from gpu_common import dump, environment, prefill_and_capture, synthetic_model, time_graph, time_replays
from qruntime.kernels.argmax import greedy_advance, greedy_workspace
from qruntime.kernels.rmsnorm import rmsnorm


def short_name(name: str) -> str:
    for prefix in ("void ", "at::native::"):
        name = name.removeprefix(prefix)
    return name.split("(")[0].split("<")[0][:48]


def profile_model(spec: str, bits: int, steps: int = 20, prompt_len: int = 128) -> dict:
    model = synthetic_model(spec, bits)
    r = model.runner
    prefill_and_capture(r, model.config.vocab_size, prompt_len)
    time_replays(r, 10)  # warm-up
    step_us = time_replays(r, steps) * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            r.graph.replay()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    intervals = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    union, cur_s, cur_e = 0.0, None, None
    for s, e in intervals:
        if cur_e is None or s > cur_e:
            union += 0 if cur_e is None else cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    union += 0 if cur_e is None else cur_e - cur_s
    by_name = collections.defaultdict(list)
    for e in kernels:
        by_name[short_name(e.name)].append(e.time_range.end - e.time_range.start)
    rows = []
    for name, ds in by_name.items():
        rows.append(dict(kernel=name, per_step=len(ds) / steps, median_us=statistics.median(ds),
                         us_per_step=sum(ds) / steps))
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    print(f"\n{spec} w{bits}: step {step_us:.1f} us (graph replay, no profiler); profiled kernels: "
          f"sum {total:.1f} us/step, union {union / steps:.1f} us/step, {len(kernels) / steps:.0f} launches/step")
    print(f"{'kernel':48s} {'n/step':>7s} {'med us':>8s} {'us/step':>8s} {'% step':>7s}")
    for row in rows:
        print(f"{row['kernel']:48s} {row['per_step']:7.1f} {row['median_us']:8.2f} {row['us_per_step']:8.1f} "
              f"{100 * row['us_per_step'] / step_us:6.1f}%")
    # the step's launches by position (kernels in issue order; one step = launches/steps of them):
    # layer 1's kernels tell the GEMVs apart (q|k|v, o, gate|up, down)
    per_step = len(kernels) // steps
    ordered = sorted(kernels, key=lambda e: e.time_range.start)
    position = [statistics.median(ordered[i + j * per_step].time_range.end - ordered[i + j * per_step].time_range.start
                                  for j in range(steps)) for i in range(min(per_step, 12))]
    print("first launches of the step, median us:", " ".join(f"{short_name(ordered[i].name)[:22]}={position[i]:.2f}"
                                                            for i in range(len(position))))
    # what each launch adds to the step: its end minus the previous launch's end (with PDL a kernel
    # starts before its predecessor ends, so its duration overstates what it costs)
    added = [statistics.median(ordered[i + j * per_step].time_range.end - ordered[i - 1 + j * per_step].time_range.end
                               for j in range(steps)) for i in range(1, min(per_step, 12))]
    print("end-to-end added by each launch, median us:", " ".join(f"{short_name(ordered[i + 1].name)[:22]}={added[i]:.2f}"
                                                                 for i in range(len(added))))
    del model, r
    torch.cuda.empty_cache()
    return dict(spec=spec, bits=bits, step_us=step_us, first_launches_us=position, first_launches_added_us=added, kernel_sum_us=total, kernel_union_us=union / steps,
                launches_per_step=len(kernels) / steps, kernels=rows)


def small_kernel_costs() -> dict:
    """us per launch of the step's small kernels when chained in one graph (PDL on, as in the step):
    what a launch costs beyond its work, and the greedy argmax against torch.argmax."""
    h = torch.randn(1, 4096, device="cuda")
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    xn = torch.empty(1, 4096, device="cuda", dtype=torch.float16)
    logits = torch.randn(1, 128256, device="cuda")
    token = torch.zeros(1, device="cuda", dtype=torch.long)
    pos, seq_len = torch.zeros(1, device="cuda", dtype=torch.int32), torch.ones(1, device="cuda", dtype=torch.int32)
    ws = greedy_workspace("cuda")
    costs = dict(
        rmsnorm_4096_us=time_graph([lambda: rmsnorm(h, w, 1e-5, out=xn)] * 200) * 1e6,
        greedy_advance_128256_us=time_graph([lambda: greedy_advance(logits, token, pos, seq_len, ws)] * 200) * 1e6,
        torch_argmax_128256_us=time_graph([lambda: token.copy_(torch.argmax(logits[0]).view(1))] * 200) * 1e6,
    )
    assert int(token) == int(torch.argmax(logits[0])), "greedy_advance disagrees with torch.argmax"
    greedy_advance(logits, token, pos, seq_len, ws)
    assert int(token) == int(torch.argmax(logits[0]))
    print("small kernels, us per launch in a chain of 200:", {k: round(v, 2) for k, v in costs.items()})
    return costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", action="append", help="synthetic:<name> (repeatable)")
    ap.add_argument("--bits", type=int, action="append", help="4, 8 or 16 (repeatable)")
    ap.add_argument("--out", help="directory for profile_decode.json")
    args = ap.parse_args()
    costs = small_kernel_costs()
    results = [profile_model(spec, bits) for spec in args.spec or ["synthetic:llama3.1-8b"] for bits in args.bits or [4]]
    if args.out:
        dump(f"{args.out}/profile_decode.json", dict(environment=environment(), small_kernels=costs, results=results))


if __name__ == "__main__":
    main()
