"""Runs `qruntime bench`: for each model and configuration, build, time and compare with theory."""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from qruntime.checkpoint import QuantizedCheckpoint
from qruntime.config import ModelConfig
from qruntime.errors import InvalidOptionError, ModelNotFoundError
from qruntime.runtime import Model, read_checkpoint
from qruntime.synthetic import synthetic_checkpoint

from .fit import fit_latency
from .measure import decode_latency, generate_ms_per_token, measure_read_bandwidth, time_to_first_token
from .theory import DATASHEET_BANDWIDTH, DecodeTheory, bits_per_weight, weight_bytes

WEIGHT_BITS = {"w16": 16, "w8": 8, "w4": 4}


@dataclass(frozen=True)
class BenchOptions:
    weights: list[str] | None
    kvs: list[str]
    contexts: list[int]
    prompt: int
    repeat: int
    memory_budget: float | None  # bytes
    device: torch.device
    dtype: torch.dtype | None
    group_size: int = 128
    burst: int = 8


def load_config_checkpoint(spec: str, weights: str, opts: BenchOptions) -> QuantizedCheckpoint:
    bits = WEIGHT_BITS[weights]
    if spec.startswith("synthetic:"):
        dtype = opts.dtype or (torch.bfloat16 if opts.device.type == "cuda" else torch.float32)
        return synthetic_checkpoint(spec, bits=bits, group_size=opts.group_size, device=opts.device, dtype=dtype)
    return read_checkpoint(spec, bits=None if bits == 16 else bits, group_size=opts.group_size)


def weight_choices(spec: str, opts: BenchOptions) -> list[str | None]:
    """Which weight configs a model takes: all requested for synthetic/HF sources; a packed
    directory is benchmarked as stored (asking it for other bits is an error, not ignored)."""
    path = Path(spec)
    if not spec.startswith("synthetic:") and not path.exists():
        raise ModelNotFoundError(f"{spec}: no such file or directory (or use synthetic:llama3.1-8b ...)")
    if (path / "quantization.json").is_file():
        if opts.weights:
            raise InvalidOptionError(f"{spec} is a packed model (its bits are fixed); drop --weights for it")
        return [None]
    if opts.weights:
        return list(opts.weights)
    return ["w16", "w8", "w4"] if spec.startswith("synthetic:") else ["w16"]


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _build_model(ckpt: QuantizedCheckpoint, kv: str, opts: BenchOptions, wanted_len: int) -> tuple[Model, dict]:
    """The model with a static cache of `wanted_len` positions, or with a memory budget the longest
    that fits it (Model's memory_budget, qruntime.memory; capped by the model's max positions), and
    the context the budget has room for (predicted) vs the one allocated."""
    backend = "triton" if opts.device.type == "cuda" else "torch"
    if kv == "kv8" and backend != "triton":
        raise InvalidOptionError("kv8 needs the triton backend (a CUDA device)")
    try:
        model = Model(ckpt, device=opts.device, dtype=opts.dtype, backend=backend,
                      max_seq_len=None if opts.memory_budget else wanted_len, memory_budget=opts.memory_budget,
                      kv_cache="int8" if kv == "kv8" else "auto", consume=backend == "triton")
    except torch.OutOfMemoryError:
        raise InvalidOptionError("the model and the cache predicted to fit do not fit the memory budget") from None
    report = model.memory_report()
    # the model's own figure: the cache's real dtype (fp32 on a CPU) and the int8 scales
    info: dict[str, Any] = {"kv_bytes_per_token": report["kv_bytes_per_token"]}
    if opts.memory_budget:
        info["predicted_max_context"] = report["budget_max_seq_len"]
        info["allocated_max_context"] = model.max_seq_len
        info["allocated_bytes"] = torch.cuda.memory_allocated(opts.device) if opts.device.type == "cuda" else None
    return model, info


def bench_one(spec: str, weights: str | None, kv: str, opts: BenchOptions, bandwidth: float, datasheet: float | None) -> dict:
    ckpt = load_config_checkpoint(spec, weights, opts) if weights else read_checkpoint(spec)
    name = f"{spec} {weights or 'as-stored'} {kv}"
    pw = weight_bytes(ckpt)
    bpw = bits_per_weight(ckpt)
    wanted = max(opts.contexts) + opts.burst + 1
    model, mem = _build_model(ckpt, kv, opts, max(wanted, opts.prompt + 1))
    del ckpt
    contexts = [n for n in opts.contexts if n + opts.burst <= model.max_seq_len]
    ttft = time_to_first_token(model, opts.prompt, opts.repeat) if opts.prompt else None
    lat = [decode_latency(model, n, opts.repeat, opts.burst) for n in tqdm(contexts, desc=name, leave=False)]
    fit = fit_latency(contexts, [s.mean for s in lat]) if len(contexts) >= 2 else None
    theory = DecodeTheory(pw, mem["kv_bytes_per_token"], bandwidth)
    sheet = DecodeTheory(pw, mem["kv_bytes_per_token"], datasheet) if datasheet else None
    result = {
        "name": name, "model": spec, "weights": weights or "as-stored", "kv": kv, "backend": model.backend_name,
        "bpw": bpw, "weight_bytes": pw, **mem,
        "ttft_ms": None if ttft is None else {"mean": ttft.mean, "std": ttft.std, "prompt": opts.prompt},
        "contexts": contexts, "latency_ms": [{"mean": s.mean, "std": s.std} for s in lat],
        "fit": None if fit is None else {"B_ms": fit.b_ms, "W_tokens_per_ms": fit.w_tokens_per_ms, "r2": fit.r2},
        "theory_measured_bw": {"B_ms": theory.b_ms, "W_tokens_per_ms": theory.w_tokens_per_ms},
        "theory_datasheet_bw": None if sheet is None else {"B_ms": sheet.b_ms, "W_tokens_per_ms": sheet.w_tokens_per_ms},
    }
    if fit is not None:
        result["efficiency"] = {"B": theory.b_ms / fit.b_ms, "W": fit.w_tokens_per_ms / theory.w_tokens_per_ms}
    del model
    _free()
    return result


def hf_config(cfg: ModelConfig):
    """The transformers config of `cfg`'s shapes (Llama's, Qwen2's with its q|k|v bias, or Qwen3's
    with its q/k norms), for timing HF on random weights: RoPE scaling is left out, as it changes
    no work per token."""
    import transformers

    kwargs = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
                  rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_position_embeddings,
                  tie_word_embeddings=cfg.tie_word_embeddings)
    families = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}
    return families.get(cfg.family, transformers.LlamaConfig)(**kwargs)


def hf_model(spec: str, device: torch.device):
    """HF transformers' model of `spec`, the peer timed beside ours: random weights of a synthetic
    spec's shapes (bf16 on a GPU, fp32 on a CPU), or a Hugging Face directory's own."""
    import transformers

    from qruntime.synthetic import synthetic_config

    if spec.startswith("synthetic:"):
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        with device:  # made directly in its dtype: an fp32 copy of 8B would not fit a 24 GB budget
            return transformers.AutoModelForCausalLM.from_config(hf_config(synthetic_config(spec)), dtype=dtype).eval()
    if (Path(spec) / "config.json").is_file() and not (Path(spec) / "quantization.json").is_file():
        return transformers.AutoModelForCausalLM.from_pretrained(spec).to(device).eval()
    raise InvalidOptionError(f"--peer hf: {spec} is neither a synthetic spec nor a Hugging Face directory")


def hf_peer(spec: str, opts: BenchOptions, new_tokens: int = 64) -> dict:
    """HF transformers on the same shape (random weights for synthetic specs), ms per decoded token."""
    model = hf_model(spec, opts.device)
    ids = torch.randint(0, model.config.vocab_size, (1, opts.prompt or 128), device=opts.device)
    ms = generate_ms_per_token(model, ids, new_tokens, repeats=max(1, opts.repeat // 2))
    del model
    _free()
    return {"peer": "hf", "model": spec, "ms_per_token": ms, "context": (opts.prompt or 128) + new_tokens // 2}


def llama_cpp_peer(binary: str, gguf: str, opts: BenchOptions) -> dict:
    """Runs `llama-bench` from a llama.cpp build on a GGUF file; tokens/s of prompt and generation."""
    exe = shutil.which(binary) or binary
    if not Path(exe).exists():
        raise InvalidOptionError(f"--peer llama.cpp={binary}: no such program (pass the path of llama-bench)")
    if not gguf.lower().endswith(".gguf"):
        raise InvalidOptionError("--peer llama.cpp needs a .gguf MODEL (llama-bench reads GGUF files only)")
    cmd = [exe, "-m", gguf, "-p", str(opts.prompt or 512), "-n", "128", "-r", str(opts.repeat), "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise InvalidOptionError(f"llama-bench failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    rows = json.loads(proc.stdout)
    out = {"peer": "llama.cpp", "model": gguf, "command": " ".join(cmd)}
    for row in rows:
        kind = "prompt" if row.get("n_prompt", 0) and not row.get("n_gen", 0) else "generate"
        out[f"{kind}_tokens_per_s"] = row.get("avg_ts")
        if kind == "generate" and row.get("avg_ts"):
            out["ms_per_token"] = 1e3 / row["avg_ts"]
    return out


def run_bench(models: list[str], opts: BenchOptions, peers: list[str], progress: bool = True) -> dict:
    """Every (model, weights, kv) configuration; bandwidth measured once, first, on the same card."""
    if opts.memory_budget and opts.device.type == "cuda":
        total = torch.cuda.get_device_properties(opts.device).total_memory
        if opts.memory_budget > total:
            raise InvalidOptionError(f"--memory-budget {opts.memory_budget / 1e9:.1f} GB exceeds the card's {total / 1e9:.1f} GB")
        index = opts.device.index if opts.device.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(opts.memory_budget / total, index)
    bandwidth = measure_read_bandwidth(opts.device, gib=2.0 if opts.device.type == "cuda" else 0.25)
    card = torch.cuda.get_device_name(opts.device) if opts.device.type == "cuda" else "cpu"
    datasheet = next((v for k, v in DATASHEET_BANDWIDTH.items() if k.lower() in card.lower()), None)
    results, peer_results = [], []
    plan = [(m, w, kv) for m in models for w in weight_choices(m, opts) for kv in opts.kvs]
    for spec, weights, kv in tqdm(plan, desc="bench", disable=not progress or len(plan) < 2):
        results.append(bench_one(spec, weights, kv, opts, bandwidth, datasheet))
    for peer in peers:
        for spec in models:
            if peer == "hf":
                peer_results.append(hf_peer(spec, opts))
            elif peer.startswith("llama.cpp="):
                if spec.lower().endswith(".gguf"):
                    peer_results.append(llama_cpp_peer(peer.split("=", 1)[1], spec, opts))
            else:
                raise InvalidOptionError(f"--peer {peer!r}: choose hf or llama.cpp=PATH_TO_llama-bench")
    from .report import environment

    return {"environment": environment(opts.device), "read_bandwidth": bandwidth, "datasheet_bandwidth": datasheet,
            "memory_budget": opts.memory_budget, "results": results, "peers": peer_results}


def run_compare(models: list[str], opts: BenchOptions, text: str | None = None, ctx: int = 512) -> dict:
    """One table across converted checkpoints of the same model: BPW, memory, B, W, max context at
    the budget, and with `text` the perplexity and KL divergence against the first entry."""
    report = run_bench(models, BenchOptions(**{**opts.__dict__, "weights": None, "kvs": opts.kvs[:1]}), peers=[],
                       progress=False)
    if text:
        from qruntime.evaluate import kl_divergence, perplexity

        if not Path(text).is_file():
            raise ModelNotFoundError(f"{text}: no such text file")
        words = Path(text).read_text(encoding="utf-8")
        base = Model(read_checkpoint(models[0]), device=opts.device)
        report["quality"] = [{"model": models[0], **perplexity(base, words, ctx=ctx, progress=False)}]
        for spec in models[1:]:
            other = Model(read_checkpoint(spec), device=opts.device)
            kl = kl_divergence(other, base, words, ctx=ctx, progress=False)
            report["quality"].append({"model": spec, **kl})
            del other
            _free()
    return report
