"""On the GPU: every distinct decode config of the shipped tuned tables adds x @ W.T for every kind
of weights, through its own kernel (TMA and fragment paths included, which the CPU interpreter
cannot run) or the fallbacks, against kernels.reference.linear.

The CPU test tests/kernels/test_qmatmul.py::test_every_shipped_config_serves_any_linear does the
same in Triton's interpreter, where the TMA configs always fall back; here a table entry meets the
card's own kernels. Weights: g128 integer zero points (every fast path), Q4_K-style float offsets
in groups of 32, act-order, one group over K = 96, groups of 16; N = 24 (narrower than any tile)
and 512; 1 row for M = 1 entries, 3 and 16 for few-row ones; fp16 rows, as the decode step's.
Prints one line per failure and a summary; exit status 1 on any failure.

    PYTHONPATH=$(bash benchmarks/stage_package.sh) python3 benchmarks/check_configs_gpu.py [TEXT ...]   # from the repository's root

With TEXT arguments, only the configs whose printed form contains one of them (e.g. ws-tma-frags).
"""

from __future__ import annotations

import sys

import torch

from qruntime.kernels.layout import prepare
from qruntime.kernels.qmatmul import qmatmul_accumulate
from qruntime.kernels.reference import linear as ref_linear

sys.path.insert(0, "tests/kernels")  # the tests' helpers, from the repository's root
from packed_linears import make_linear, shipped_decode_configs  # noqa: E402
from tolerances import TOL  # noqa: E402

# (bits, group, zero mode, act-order, K)
WEIGHTS = [(4, 128, "int", False, 512), (8, 128, "int", False, 512), (4, 128, "symmetric", False, 256),
           (4, 32, "float", False, 128), (8, 128, "int", True, 256), (4, -1, "symmetric", False, 96),
           (8, 16, "symmetric", False, 64)]


def main() -> int:
    dev = torch.device("cuda")
    failures, cases, worst = 0, 0, 0.0
    configs = shipped_decode_configs()
    if sys.argv[1:]:
        configs = {c: rows for c, rows in configs.items() if any(text in str(c) for text in sys.argv[1:])}
    for config, rows in sorted(configs.items(), key=str):
        before = failures
        for bits, group, zero_mode, act_order, k in WEIGHTS:
            for n in (24, 512):
                lin = make_linear(n, k, bits, group, zero_mode, act_order=act_order, seed=k + bits + n)
                t = prepare(lin, dev, torch.float16)
                for m in ([1] if rows == 1 else [3, 16]):
                    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).half()
                    ref = ref_linear(x.float(), lin)
                    start = torch.randn(m, n)
                    out = start.to(dev)
                    name = f"{config} w{bits} g{group} {zero_mode}{' act-order' if act_order else ''} M={m} N={n} K={k}"
                    cases += 1
                    try:
                        qmatmul_accumulate(x.to(dev), t, out, config=config)
                        torch.cuda.synchronize()
                    except Exception as exc:  # noqa: BLE001 (a crash is a failure to report, then go on)
                        failures += 1
                        print(f"FAIL {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                        continue
                    got = out.cpu() - start
                    err = ((got - ref).norm() / ref.norm()).item()
                    worst = max(worst, err) if err == err else float("inf")
                    if not err <= TOL["fp16_dot"]:
                        failures += 1
                        print(f"FAIL {name}: relative error {err:.2e}")
        print(f"{config} (M = {rows}): {'ok' if failures == before else f'{failures - before} failures'}", flush=True)
    print(f"{len(configs)} configs, {cases} cases on {torch.cuda.get_device_name()}: "
          f"{failures} failures, worst relative error {worst:.2e} (bound {TOL['fp16_dot']:.0e})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
