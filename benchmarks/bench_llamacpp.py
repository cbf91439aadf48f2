"""llama.cpp as the decode peer, on the same card in the same run as qruntime.

For each model shape (random weights, the exact shapes of bench_decode's end to end): a GGUF of
F16 weights is written with the `gguf` package, llama.cpp's own llama-quantize makes its Q8_0,
Q4_K_M and Q4_0 files, and llama-bench (CUDA build, every layer on the GPU, FlashAttention on,
CUDA graphs as llama.cpp uses them by default) times 256 generated tokens after a 128-token
context (--context: longer), the same protocol as qruntime's figure (bench_decode.bench_e2e,
timed here too). Each side is also set against its own floor: the bytes of weights and of fp16 KV
cache it reads per token / the read bandwidth measured in the same run (llama.cpp keeps token_embd
in host memory and reads one row of it, so that tensor is left out of its bytes unless it doubles
as the output matrix).

    bash benchmarks/build_llamacpp.sh                       # on the GPU machine: prints BIN
    PYTHONPATH=zz_pkg:. python3 bench_llamacpp.py --bin BIN --spec synthetic:llama3.2-1b --out DIR

Files go to --work (a local disk with room for an 8B F16 file and one quantized file at a time).
--convert (qruntime on llama.cpp's own files, results/h200/llamacpp_peer_convert_*.md) converts GGUF,
which needs transformers >= 5.18 for the tokenizer: the GPU image's is 5.17, so carry a newer one there
as a wheel (`pip download --no-deps transformers==5.24.0` into an ignored folder, installed there with
`pip install --no-index --no-deps --target /tmp/site` and PYTHONPATH=/tmp/site first).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

from bench_decode import bench_e2e, decode_model, linear_bytes, time_decode
from gpu_common import dump, environment, measure_read_bandwidth
from qruntime import format as packed_format
from qruntime.convert import convert_checkpoint
from qruntime.synthetic import synthetic_config

# llama.cpp file types timed, and the qruntime weights each is set beside in the table
QUANT_TYPES = ("Q8_0", "Q4_K_M", "Q4_0")
CONTEXT, NEW_TOKENS = 128, 256  # bench_decode.bench_e2e's protocol (--context changes the first)


def write_f16_gguf(path: str, cfg, device: str = "cuda") -> None:
    """A llama- or qwen2-architecture GGUF (as `cfg`'s family) with random weights of `cfg`'s
    shapes: linears and the embedding F16 (std 0.02), norms F32 ones, q|k|v biases F32 zeros where
    the family has them, and a placeholder SentencePiece vocabulary of the model's size (byte tokens
    included, which llama.cpp's SPM vocabulary looks up). Written for timing only: no rope_freqs
    tensor (llama3's RoPE scaling changes no work) and no Q/K row permutation."""
    import gguf

    w = gguf.GGUFWriter(path, "qwen2" if cfg.family == "qwen2" else "llama")  # the keys' prefix too
    hyperparameters = dict(  # each through its GGUFWriter.add_<name> (the llama.* keys llama.cpp reads)
        context_length=cfg.max_position_embeddings, embedding_length=cfg.hidden_size, block_count=cfg.num_layers,
        feed_forward_length=cfg.intermediate_size, head_count=cfg.num_heads, head_count_kv=cfg.num_kv_heads,
        rope_dimension_count=cfg.head_dim, key_length=cfg.head_dim, value_length=cfg.head_dim,
        rope_freq_base=cfg.rope_theta, layer_norm_rms_eps=cfg.rms_norm_eps, vocab_size=cfg.vocab_size)
    for name, value in hyperparameters.items():
        getattr(w, f"add_{name}")(value)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    specials = ["<unk>", "<s>", "</s>"]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"tok{i}" for i in range(cfg.vocab_size - len(tokens))]
    types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (cfg.vocab_size - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * cfg.vocab_size)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return (torch.randn(shape, device=device, generator=gen, dtype=torch.float16) * 0.02).cpu().numpy()

    ones = np.ones(cfg.hidden_size, dtype=np.float32)
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    w.add_tensor("token_embd.weight", rand(cfg.vocab_size, cfg.hidden_size))
    for i in range(cfg.num_layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones)
        w.add_tensor(p + "attn_q.weight", rand(h * hd, cfg.hidden_size))
        w.add_tensor(p + "attn_k.weight", rand(kv * hd, cfg.hidden_size))
        w.add_tensor(p + "attn_v.weight", rand(kv * hd, cfg.hidden_size))
        if cfg.qkv_bias:
            for proj, rows in (("q", h * hd), ("k", kv * hd), ("v", kv * hd)):
                w.add_tensor(p + f"attn_{proj}.bias", np.zeros(rows, dtype=np.float32))
        w.add_tensor(p + "attn_output.weight", rand(cfg.hidden_size, h * hd))
        w.add_tensor(p + "ffn_norm.weight", ones)
        w.add_tensor(p + "ffn_gate.weight", rand(cfg.intermediate_size, cfg.hidden_size))
        w.add_tensor(p + "ffn_up.weight", rand(cfg.intermediate_size, cfg.hidden_size))
        w.add_tensor(p + "ffn_down.weight", rand(cfg.hidden_size, cfg.intermediate_size))
    w.add_tensor("output_norm.weight", ones)
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", rand(cfg.vocab_size, cfg.hidden_size))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def weight_bytes_read(path: str) -> int:
    """Bytes of the tensors llama.cpp reads per decode token with every layer on the GPU: all of
    them but token_embd (host memory, one row read), which counts when it is also the output."""
    import gguf

    sizes = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    embd = sizes.pop("token_embd.weight")
    return sum(sizes.values()) + (0 if "output.weight" in sizes else embd)


def kv_bytes_read(spec: str, context: int) -> float:
    """KV cache bytes read per timed token: P_kv (THEORY.md; fp16 K and V of every layer, both
    runtimes' default cache) times the cached positions, averaged over the NEW_TOKENS timed."""
    cfg = synthetic_config(spec)
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * (context + (NEW_TOKENS - 1) / 2)


def set_floor(row: dict, kv_bytes: float, bw: float) -> dict:
    """The row's floor (THEORY.md's B + (n - 1) / W at the mean context): its weights' and the KV
    cache's bytes read per token over the read bandwidth, and its time against that."""
    floor = (row["weight_bytes"] + kv_bytes) / bw * 1e3
    row.update(kv_bytes=kv_bytes, floor_ms=floor, ratio_to_floor=row["ms_per_token"] / floor,
               efficiency=floor / row["ms_per_token"])
    return row


def time_converted(path: str, spec: str, ftype: str, context: int, bw: float) -> dict:
    """qruntime on the same GGUF file: converted by `qruntime convert` (converters.gguf keeps
    llama.cpp's codes and scales), then timed as bench_e2e times its own models (PDL on)."""
    out = path.removesuffix(".gguf") + "-qruntime"
    t = time.perf_counter()
    convert_checkpoint(path, out, progress=False, force=True)
    print(f"  {ftype} converted by qruntime in {time.perf_counter() - t:.0f} s", flush=True)
    ckpt = packed_format.load(out)
    nbytes = linear_bytes(ckpt)
    model = decode_model(ckpt, context)
    del ckpt
    ms = time_decode(model, context)
    del model
    torch.cuda.empty_cache()
    shutil.rmtree(out)
    row = set_floor(dict(model=spec, weights=f"qruntime from {ftype}", ms_per_token=ms, tok_per_s=1e3 / ms,
                         weight_bytes=nbytes), kv_bytes_read(spec, context), bw)
    print(f"{spec} qruntime from {ftype}: {ms:7.3f} ms/token; floor {row['floor_ms']:6.3f} ms; "
          f"{row['ratio_to_floor']:4.2f}x floor", flush=True)
    return row


def llama_bench(bin_dir: str, path: str, repeats: int, context: int) -> dict:
    """llama-bench's record of NEW_TOKENS generated after a `context`-token context (-d), JSON."""
    out = run_llama(bin_dir, "llama-bench", "-m", path, "-ngl", "99", "-fa", "1", "-p", "0", "-n", str(NEW_TOKENS),
                    "-d", str(context), "-r", str(repeats), "-o", "json")
    records = json.loads(out.stdout)
    if len(records) != 1:
        raise RuntimeError(f"llama-bench gave {len(records)} records: {out.stdout[:500]}")
    return records[0]


def llama_cpp_version(bin_dir: str) -> str:
    """The llama.cpp commit stage_llamacpp.sh noted (llama-bench's build_commit names the enclosing
    repository's HEAD, the staged source having no git of its own)."""
    with open(f"{bin_dir}/LLAMA_CPP_VERSION") as f:
        return f.read().strip()


def run_llama(bin_dir: str, *args: str) -> subprocess.CompletedProcess:
    """One of the built llama.cpp tools (its shared libraries beside it)."""
    return subprocess.run([f"{bin_dir}/{args[0]}", *args[1:]], check=True, capture_output=True, text=True,
                          env={**os.environ, "LD_LIBRARY_PATH": bin_dir})


def time_llamacpp(bin_dir: str, spec: str, ftypes: list[str], work: str, repeats: int, context: int, bw: float,
                  done: list, converted: bool = False) -> None:
    """Appends to `done` a row per llama.cpp file type of `spec` (as qruntime's e2e rows, plus
    llama-bench's spread and samples), each file made, timed and deleted in turn; `converted`:
    and a row of qruntime running each quantized file (time_converted)."""
    f16 = f"{work}/{spec.split(':')[-1]}-F16.gguf"
    t = time.perf_counter()
    write_f16_gguf(f16, synthetic_config(spec))
    print(f"{spec}: F16 GGUF written in {time.perf_counter() - t:.0f} s", flush=True)
    version = llama_cpp_version(bin_dir)
    for ftype in ftypes:
        path = f16 if ftype == "F16" else f16.replace("-F16", f"-{ftype}")
        if ftype != "F16":
            t = time.perf_counter()
            run_llama(bin_dir, "llama-quantize", f16, path, ftype, str(os.cpu_count()))
            print(f"  {ftype} quantized in {time.perf_counter() - t:.0f} s", flush=True)
        rec = llama_bench(bin_dir, path, repeats, context)
        nbytes = weight_bytes_read(path)
        ms = 1e3 / rec["avg_ts"]
        row = set_floor(dict(model=spec, weights=f"llama.cpp {ftype}", ms_per_token=ms, tok_per_s=rec["avg_ts"],
                             tok_per_s_stddev=rec["stddev_ts"], samples_tok_per_s=rec.get("samples_ts"),
                             weight_bytes=nbytes,
                             llama_cpp=dict(version=version, backends=rec.get("backends"),
                                            gpu_info=rec.get("gpu_info"), n_depth=rec.get("n_depth"),
                                            n_gen=rec.get("n_gen"), flash_attn=rec.get("flash_attn"))),
                        kv_bytes_read(spec, context), bw)
        done.append(row)
        print(f"{spec} llama.cpp {ftype}: {ms:7.3f} ms/token ({rec['avg_ts']:6.1f} +- {rec['stddev_ts']:.1f} tok/s); "
              f"floor {row['floor_ms']:6.3f} ms; {row['ratio_to_floor']:4.2f}x floor", flush=True)
        if converted and ftype != "F16":
            done.append(time_converted(path, spec, ftype, context, bw))
        if path != f16:
            os.remove(path)
    os.remove(f16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="folder of llama-bench and llama-quantize (build_llamacpp.sh)")
    ap.add_argument("--spec", action="append", required=True, help="synthetic model spec (repeatable)")
    ap.add_argument("--work", default="/tmp/llamacpp_peer", help="where the GGUF files go (deleted after use)")
    ap.add_argument("--repeats", type=int, default=5, help="llama-bench repetitions (it reports their mean)")
    ap.add_argument("--types", default="F16," + ",".join(QUANT_TYPES), help="llama.cpp file types to time")
    ap.add_argument("--bits", default="16,8,4", help="qruntime weights to time (w16, w8, w4 g128)")
    ap.add_argument("--context", type=int, default=CONTEXT, help="tokens in the cache before the timed ones")
    ap.add_argument("--convert", action="store_true",
                    help="also time qruntime on each quantized GGUF file itself, converted by qruntime convert")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    env = environment()
    bw = measure_read_bandwidth()
    print(f"# {env}\n# read bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    ours = [set_floor(r, kv_bytes_read(r["model"], args.context), bw)
            for r in bench_e2e(bw, args.spec, peer=False, bits=[int(b) for b in args.bits.split(",")],
                               prompt_len=args.context)]
    torch.cuda.empty_cache()
    peer = []
    try:
        for spec in args.spec:
            time_llamacpp(args.bin, spec, args.types.split(","), args.work, args.repeats, args.context, bw, peer,
                          args.convert)
    finally:  # what was timed is kept when a later file fails or the run is cut short
        dump(f"{args.out}/llamacpp_peer.json", dict(env=env, read_bw=bw, context=args.context, qruntime=ours,
                                                     llama_cpp=peer))
    md = markdown(env, bw, ours, peer, args.context)
    with open(f"{args.out}/llamacpp_peer.md", "w") as f:
        f.write(md)
    print(md)


def markdown(env, bw, ours, peer, context: int = CONTEXT) -> str:
    lines = [f"# qruntime against llama.cpp, batch-1 decode ({env.get('gpu')}, driver {env.get('driver')}, "
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env.get('cuda')})", "",
             f"Read bandwidth {bw / 1e12:.3f} TB/s (2 GiB x.sum(), median of 20). {context}-token context, "
             f"{NEW_TOKENS} new tokens; random weights of the exact shapes. "
             f"{peer[0]['llama_cpp']['version'] if peer else 'llama.cpp not run'}, built with CUDA for sm_90: llama-bench, all "
             f"layers on the GPU, FlashAttention on, mean of its repetitions; qruntime: median of 3 "
             f"(bench_decode.bench_e2e). Floor: the bytes of weights and of fp16 KV cache read per token (the "
             f"cache at its mean length over the timed tokens) / the read bandwidth.", "",
             "| model | weights | ms/token | tok/s | weight bytes read | KV bytes read | floor (ms) | x floor |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(ours + peer, key=lambda r: (r["model"], r["weight_bytes"])):
        lines.append(f"| {r['model']} | {r['weights']} | {r['ms_per_token']:.3f} | {r['tok_per_s']:.1f} | "
                     f"{r['weight_bytes'] / 1e9:.3f} GB | {r['kv_bytes'] / 1e9:.3f} GB | {r['floor_ms']:.3f} | "
                     f"{r['ratio_to_floor']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
