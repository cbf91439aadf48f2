"""End-to-end A/B of two versions of the package on llama.cpp's own files, converted once: what a
table or lookup change really buys in the decode step (a GEMV sweep times each shape alone, and the
step can prefer other tiles: results/h200/ab_converted_groups.log).

    python3 benchmarks/ab_converted.py --bin build/llamacpp/bin --spec synthetic:qwen2.5-7b \\
        --types Q8_0,Q4_K_M --old qruntime/kernels/tuned/nvidia-h200.json=OLD.json [--rounds 2]

Run from the repository root on the GPU machine, with llama.cpp built there (build_llamacpp.sh) and
`gguf` on the path (.device_deps). "new" is this checkout staged as the package; "old" is the same
with each --old PATH=FILE's file put in place of PATH (relative to the staged package: e.g. an older
table, or an older kernels/tuning.py at qruntime/kernels/tuning.py). The files: bench_llamacpp's
random F16 GGUF of the spec's shapes, written once, llama-quantize to each type and `qruntime
convert` (under "new"); then, type by type, e2e_once.py --checkpoint in alternating processes, old
first in each round.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def stage(dest: str, replacements: list[tuple[str, str]] = ()) -> str:
    """This checkout as the `qruntime` package in `dest`, with each (path, file) of `replacements` in place."""
    subprocess.run(["bash", f"{HERE}/stage_package.sh", dest], check=True, capture_output=True)
    for path, source in replacements:
        target = os.path.join(dest, path)
        if not os.path.isfile(target):
            raise SystemExit(f"--old {path}=...: the staged package has no {path}")
        shutil.copyfile(source, target)
    return dest


def with_package(package: str) -> dict:
    """The environment with `package` first on the path (run from benchmarks/, so that the checkout's
    own qruntime/ folder, not a package, is never the one imported)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package, HERE, os.environ.get("PYTHONPATH")]))}


def make_converted(bin_dir: str, spec: str, ftypes: list[str], work: str, package: str) -> dict[str, str]:
    """The spec's random F16 GGUF (written once), quantized by llama.cpp to each of `ftypes` and
    converted by qruntime, in a process of its own with `package` on the path; the GGUF files are
    deleted, the conversions kept: {file type: converted folder}."""
    out = {ftype: f"{work}/converted-{ftype}" for ftype in ftypes}
    script = f"""
import os, time
import bench_llamacpp as B
from qruntime.convert import convert_checkpoint
from qruntime.synthetic import synthetic_config
f16 = {work!r} + "/f16.gguf"
t = time.perf_counter(); B.write_f16_gguf(f16, synthetic_config({spec!r}))
print(f"# {spec} F16 GGUF written in {{time.perf_counter() - t:.0f}} s", flush=True)
for ftype, out in {out!r}.items():
    q = {work!r} + f"/{{ftype}}.gguf"
    t = time.perf_counter(); B.run_llama({bin_dir!r}, "llama-quantize", f16, q, ftype, str(os.cpu_count()))
    print(f"# {{ftype}} quantized in {{time.perf_counter() - t:.0f}} s", flush=True)
    t = time.perf_counter(); convert_checkpoint(q, out, progress=False, force=True); os.remove(q)
    print(f"# {{ftype}} converted in {{time.perf_counter() - t:.0f}} s", flush=True)
os.remove(f16)
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=HERE, env=with_package(package))
    return out


def time_once(package: str, tag: str, checkpoint: str) -> float:
    """e2e_once.py's median ms/token for `checkpoint` under `package` (its printed line echoed)."""
    done = subprocess.run([sys.executable, f"{HERE}/e2e_once.py", tag, "--checkpoint", checkpoint],
                          capture_output=True, text=True, cwd=HERE, env=with_package(package))
    if done.returncode:
        raise SystemExit(f"e2e_once.py failed under {tag}:\n{done.stderr[-3000:]}")
    line = done.stdout.strip().splitlines()[-1]
    print(line, flush=True)
    return float(re.search(r"median ([0-9.]+) ms/token", line).group(1))


def replacement(text: str) -> tuple[str, str]:
    path, sep, source = text.partition("=")
    if not sep or not os.path.isfile(source):
        raise argparse.ArgumentTypeError(f"expected PATH=FILE with FILE an existing file, got {text!r}")
    return path, os.path.abspath(source)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", required=True, help="folder of the built llama-quantize")
    ap.add_argument("--spec", required=True, help="synthetic:<name>, e.g. synthetic:llama3.1-8b")
    ap.add_argument("--types", required=True, help="llama.cpp file types, comma-separated, e.g. Q8_0,Q4_K_M")
    ap.add_argument("--old", type=replacement, action="append", required=True, metavar="PATH=FILE",
                    help="a file of the old version, in place of PATH in the staged package (repeatable)")
    ap.add_argument("--rounds", type=int, default=2, help="old/new process pairs per type")
    args = ap.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    results = []
    with tempfile.TemporaryDirectory() as work:
        new_pkg, old_pkg = stage(f"{work}/new"), stage(f"{work}/old", args.old)
        t = time.perf_counter()
        converted = make_converted(os.path.abspath(args.bin), args.spec, args.types.split(","), work, new_pkg)
        print(f"# {args.spec}: {len(converted)} files made in {time.perf_counter() - t:.0f} s", flush=True)
        for ftype, checkpoint in converted.items():
            times = {"old": [], "new": []}
            for r in range(args.rounds):
                for tag, package in (("old", old_pkg), ("new", new_pkg)):
                    times[tag].append(time_once(package, f"{tag}-{ftype}-r{r + 1}", checkpoint))
            shutil.rmtree(checkpoint)
            old, new = statistics.median(times["old"]), statistics.median(times["new"])
            results.append(f"{args.spec} {ftype}: old {old:.4f} ms/token, new {new:.4f} ({100 * (new / old - 1):+.1f}%)")
            print(results[-1], flush=True)
    print("\n".join(["# summary"] + results))


if __name__ == "__main__":
    main()
