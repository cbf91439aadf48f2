"""Timing helpers for GPU benchmarks (see ../shared/reference/KERNELS.md for why they look like this).

- measure_read_bandwidth: a large streaming read (x.sum() over 2 GiB), the card's real ceiling.
- time_graph: many launches captured in ONE CUDA graph, over rotating buffers so the weights come
  from HBM and not from the 50 MB L2; median over repeats, per launch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time

import torch

import qruntime
import qruntime.engine.triton_runner as runner_mod
from qruntime import format as packed_format
from qruntime.bench.measure import measure_read_bandwidth as bench_read_bandwidth
from qruntime.bench.report import environment as bench_environment
from qruntime.kernels import reference as R
from qruntime.kernels.layout import prepare
from qruntime.quantizers.rtn import quantize_rtn
from qruntime.synthetic import synthetic_checkpoint


def environment() -> dict:
    """Card, driver and versions, recorded beside every result (the same record `qruntime bench` keeps)."""
    return bench_environment(torch.device("cuda"))


def measure_read_bandwidth(gib: float = 2.0, repeats: int = 20) -> float:
    """Bytes/s of a streaming read over `gib` GiB on the GPU (median of repeats)."""
    return bench_read_bandwidth(torch.device("cuda"), gib=gib, repeats=repeats)


def as_float_offsets(packed):
    """The same weights as scales * q + offsets (GGUF's K types' form) instead of integer zero points."""
    return dataclasses.replace(packed, offsets=(-packed.scales.float() * packed.zeros.float()).half(), zeros=None)


def gemv_workload(k: int, n: int, m: int, bits: int, total_bytes: float = 300e6, group: int = 128,
                  zero_mode: str = "int"):
    """Distinct copies of one random int4/int8 linear (g128 with integer zero points unless told:
    zero_mode "symmetric" as GGUF's Q8_0 and Q4_0, "float" offsets as its K types; enough copies to
    exceed L2), their inputs and fp32 outputs, and the bytes one GEMV must read (words + scales +
    zeros or offsets + x)."""
    count = max(2, math.ceil(total_bytes / (n * k * bits // 8)))
    packed = quantize_rtn(torch.randn(n, k, device="cuda") * 0.02, bits, group, zero_mode == "symmetric")
    if zero_mode == "float":
        packed = as_float_offsets(packed)
    lins = [prepare(packed, torch.device("cuda"), torch.float16) for _ in range(count)]
    xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(count)]
    outs = [torch.zeros(m, n, device="cuda") for _ in range(count)]
    t0 = lins[0]
    need = t0.nbytes() + m * k * 2
    return lins, xs, outs, need


def time_graph(fns, repeats: int = 10) -> float:
    """Median seconds per call of the callables in `fns`, all captured back to back in one graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns[:3]:  # warm-up compiles outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(fns))
    return statistics.median(times)


def kv_caches(kv: int, context: int, hd: int, int8: bool, copies: int) -> list[dict]:
    """`copies` random [kv, context, hd] K/V caches as flash_decode's keyword arguments: fp16
    (k_cache, v_cache), or int8 codes with their per-position scales (k_scale, v_scale). Rotated
    by the flash-decoding benchmarks so that no launch reads a cache from L2."""
    caches = []
    for _ in range(copies):
        k = torch.randn(kv, context, hd, device="cuda", dtype=torch.float16)
        v = torch.randn(kv, context, hd, device="cuda", dtype=torch.float16)
        if int8:
            (kc, ks), (vc, vs) = R.quantize_kv_int8(k), R.quantize_kv_int8(v)
            caches.append(dict(k_cache=kc, v_cache=vc, k_scale=ks, v_scale=vs))
        else:
            caches.append(dict(k_cache=k, v_cache=v))
    return caches


def synthetic_model(spec: str, bits: int, max_seq_len: int = 512, kv_cache: str = "auto", group_size: int = 128,
                    dtype: torch.dtype = torch.bfloat16, lm_head_scale: float = 1.0,
                    zero_mode: str = "int") -> "qruntime.Model":
    """A random-weight model of `spec`'s exact shapes (dense parts and activations in `dtype`) on the
    triton backend: what the decode benchmarks time. lm_head_scale multiplies the quantized lm_head's
    scales, so its logits (flat in a random model) have a few tokens standing out. zero_mode
    "symmetric" or "float" gives every quantized linear the zero points of GGUF's Q8_0 / Q4_0 or the
    float offsets of its K types, as gemv_workload does (other weights, the same shapes and bytes)."""
    ckpt = synthetic_checkpoint(spec, bits=bits, group_size=group_size, dtype=dtype)
    for name, packed in list(ckpt.linears.items()):
        if zero_mode != "int" and packed.zeros is not None:
            ckpt.linears[name] = as_float_offsets(packed) if zero_mode == "float" else dataclasses.replace(packed, zeros=None)
    if lm_head_scale != 1.0:
        ckpt.linears["lm_head"].scales.mul_(lm_head_scale)
    return qruntime.Model(ckpt, device="cuda", backend="triton", dtype=dtype, max_seq_len=max_seq_len, kv_cache=kv_cache)


def checkpoint_model(path: str, max_seq_len: int = 512, kv_cache: str = "auto",
                     dtype: str | None = None) -> "qruntime.Model":
    """A packed checkpoint (e.g. `qruntime convert`'s of one of llama.cpp's files) on the triton
    backend, activations in `dtype` (None: its config's), as synthetic_model's are timed."""
    return qruntime.Model(packed_format.load(path, verify=False), device="cuda", backend="triton", dtype=dtype,
                          max_seq_len=max_seq_len, kv_cache=kv_cache)


def use_combine_launch(runner, on: bool) -> None:
    """The decode step with flash-decoding's combine launch and a plain o_proj (on), or with o_proj
    merging the splits itself (off, the default where every o_proj can); recapture after."""
    runner.fused_merge = not on
    if runner.attn is None:  # the combine's output buffer
        runner.attn = torch.zeros((1, runner.cfg.num_heads * runner.cfg.head_dim), device=runner.device,
                                  dtype=torch.float16)


def set_decode_splits(runner, splits: int) -> None:
    """The decode step's flash-decoding split count, with a workspace to match; recapture after."""
    cfg = runner.cfg
    runner.num_splits = splits
    runner.workspace = (torch.empty((splits, cfg.num_heads, cfg.head_dim), device=runner.device),
                        torch.empty((splits, cfg.num_heads), device=runner.device))


def use_deferred_norms(runner, on: bool) -> None:
    """The decode step with its layers' RMSNorms deferred to the kernels after their GEMVs (on, the
    default where the model allows it) or as launches of their own; recapture after."""
    if not hasattr(runner, "_deferred_norms_allowed"):
        runner._deferred_norms_allowed = (runner.defer_attention_norm, runner.defer_mlp_norm)
    runner.defer_attention_norm, runner.defer_mlp_norm = (on and allowed for allowed in runner._deferred_norms_allowed)
    runner.rope_inputs = runner.build_rope_inputs()


_STEP_ATTENTION_STAGES = runner_mod.DECODE_ATTENTION_STAGES  # the runner's own choice


def set_decode_attention_tile(block: int, warps: int, stages: int | None = _STEP_ATTENTION_STAGES) -> None:
    """Positions per block, warps (for either cache dtype) and pipeline stages (None: Triton's
    default; left out: the runner's own) of the decode step's flash-decoding (read at each capture)."""
    runner_mod.DECODE_ATTENTION_BLOCK, runner_mod.DECODE_ATTENTION_WARPS = block, warps
    runner_mod.DECODE_ATTENTION_WARPS_INT8 = warps
    runner_mod.DECODE_ATTENTION_STAGES = stages


def prefill_and_capture(runner, vocab_size: int, prompt_len: int) -> None:
    """Prefills a random prompt, points the decode state at the next position, captures the step."""
    ids = torch.randint(0, vocab_size, (prompt_len,), device="cuda")
    logits = runner.prefill(ids)
    runner.token.copy_(logits[0].argmax().view(1))
    runner.pos.fill_(prompt_len)
    runner.seq_len.fill_(prompt_len + 1)
    if runner.graph is None:
        runner.capture()
    torch.cuda.synchronize()


def us_per_call(fn, n: int = 300, repeats: int = 5, warmup: int = 20) -> float:
    """Median microseconds per call of `fn` over `repeats` host-timed loops of `n` calls, after
    `warmup` calls: what a caller waits, launch overheads included (a graph's replay, an eager chain)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(out)


def time_replays(runner, steps: int) -> float:
    """Milliseconds per replay of the runner's captured decode step, over `steps` replays."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        runner.graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps


def dump(path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def set_shared_carveout(percent: int) -> int:
    """Experiment: the preferred shared-memory carveout (percent of the unified L1/shared memory; -1:
    the driver's choice) of every Triton kernel of qruntime.kernels compiled so far, so that the
    step's kernels ask the SMs for one configuration. Returns how many kernels were set."""
    import ctypes
    import importlib
    import pkgutil

    import qruntime.kernels as kernels_pkg
    from triton.runtime.jit import JITFunction

    cuda = ctypes.CDLL("libcuda.so.1")
    carveout_attribute = 9  # CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT
    count = 0
    for info in pkgutil.iter_modules(kernels_pkg.__path__):
        module = importlib.import_module(f"qruntime.kernels.{info.name}")
        for fn in vars(module).values():
            if not isinstance(fn, JITFunction):
                continue
            for entry in fn.device_caches.values():
                for kernel in list(entry[0].values()):
                    if not hasattr(kernel, "_init_handles"):  # a compile still in flight (a future)
                        kernel = kernel.result()
                    kernel._init_handles()
                    rc = cuda.cuFuncSetAttribute(ctypes.c_void_p(kernel.function), carveout_attribute, ctypes.c_int(percent))
                    if rc != 0:
                        raise RuntimeError(f"cuFuncSetAttribute({fn.__name__}, carveout {percent}) failed: CUresult {rc}")
                    count += 1
    return count
