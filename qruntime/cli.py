"""The `qruntime` command. Each subcommand parses its options and calls one library function;
a QRuntimeError is printed as one line (no traceback) and the exit status is 2."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from qruntime.errors import InvalidOptionError, QRuntimeError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def _group_size(text: str) -> int:
    value = int(text)
    if value != -1 and (value < 16 or value & (value - 1)):
        raise argparse.ArgumentTypeError(f"{text}: choose a power of two >= 16 (32, 64, 128) or -1 for per-channel")
    return value


def _converter_names() -> list[str]:
    from qruntime.converters.base import CONVERTERS

    return list(CONVERTERS)


def cmd_convert(args: argparse.Namespace) -> None:
    from qruntime.convert import convert_checkpoint
    from qruntime.quantizers.calibration import Calibration

    calib_given = args.calib is not None or args.calib_samples is not None or args.calib_seqlen is not None
    calibration = Calibration(args.calib, args.calib_samples or 128, args.calib_seqlen or 512) if calib_given else None
    source = args.source_format or [None]
    formats = _converter_names()
    if len(source) > 2 or (len(source) == 2 and source[0] != "gguf") or (source[0] is not None and source[0] not in formats):
        raise InvalidOptionError(f"--from {' '.join(source)}: expected one of {', '.join(formats)}, or `gguf QUANT` "
                                 "(e.g. gguf q4_k_m)")
    out = convert_checkpoint(
        args.src, args.output, source_format=source[0], bits=args.bits, group_size=args.group_size,
        symmetric=args.sym, lm_head_bits=args.lm_head_bits, method=args.method, act_order=args.act_order,
        calibration=calibration, force=args.force, progress=not args.quiet,
        quant_type=source[1] if len(source) == 2 else None, requantize=args.requantize,
    )
    print(f"wrote {out}", file=sys.stderr)


def _load(args: argparse.Namespace):
    import qruntime

    return qruntime.load(args.model, bits=args.bits, group_size=args.group_size, device=args.device,
                         dtype=args.dtype, max_seq_len=args.max_seq_len, kv_cache=args.kv_cache,
                         memory_budget=args.memory_budget)


def _sampling(args: argparse.Namespace) -> dict:
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                repetition_penalty=args.repetition_penalty, seed=args.seed)


def cmd_generate(args: argparse.Namespace) -> None:
    from qruntime import GenerationStats

    model = _load(args)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    stats = GenerationStats()
    for delta in model.generate(prompt, max_new_tokens=args.max_new_tokens, stream=True, stats=stats,
                                **_sampling(args)):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if not args.quiet:  # on stderr, so that stdout holds the text alone
        sys.stdout.flush()
        print(f"qruntime: {stats.summary()} [{model.backend_name} backend, {model.device}]", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    model = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("qruntime chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        reply = []
        for delta in model.generate(messages, max_new_tokens=args.max_new_tokens, stream=True, **_sampling(args)):
            reply.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_bench(args: argparse.Namespace) -> None:
    import os

    # Growable segments keep a tight --memory-budget from failing on fragmentation; read when the
    # CUDA allocator starts, which has not happened yet in this process.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch

    from qruntime.bench.measure import parse_context_range
    from qruntime.bench.report import markdown, plot, write_json
    from qruntime.bench.run import BenchOptions, run_bench, run_compare
    from qruntime.memory import parse_size

    try:
        contexts = parse_context_range(args.context)
    except ValueError as e:
        raise InvalidOptionError(str(e)) from None
    weights = args.weights.split(",") if args.weights else None
    if weights and any(w not in ("w16", "w8", "w4") for w in weights):
        raise InvalidOptionError(f"--weights {args.weights}: choose from w16, w8, w4")
    kvs = args.kv.split(",")
    if any(k not in ("kv16", "kv8") for k in kvs):
        raise InvalidOptionError(f"--kv {args.kv}: choose from kv16, kv8")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    opts = BenchOptions(weights=weights, kvs=kvs, contexts=contexts, prompt=args.prompt, repeat=args.repeat,
                        memory_budget=parse_size(args.memory_budget) if args.memory_budget else None,
                        device=device, dtype=None, group_size=args.group_size)
    if args.compare:
        report = run_compare(args.models, opts, text=args.text, ctx=args.eval_ctx)
    else:
        if args.text:
            raise InvalidOptionError("--text goes with --compare (perplexity/KL across checkpoints)")
        report = run_bench(args.models, opts, peers=args.peer or [])
    print(markdown(report))
    if args.json:
        write_json(report, args.json)
    if args.plot:
        plot(report, args.plot)


def cmd_eval(args: argparse.Namespace) -> None:
    from pathlib import Path

    from qruntime.errors import ModelNotFoundError
    from qruntime.evaluate import kl_divergence, perplexity

    if not Path(args.text).is_file():
        raise ModelNotFoundError(f"{args.text}: no such text file")
    text = Path(args.text).read_text(encoding="utf-8")
    model = _load(args)
    if args.kl_base:
        import qruntime

        base = qruntime.load(args.kl_base, device=args.device, dtype=args.dtype)
        result = kl_divergence(model, base, text, ctx=args.ctx, max_chunks=args.max_chunks)
    else:
        result = perplexity(model, text, ctx=args.ctx, max_chunks=args.max_chunks)
    result.update(model=str(args.model), base=args.kl_base, text=str(args.text))
    for key, value in result.items():
        print(f"{key:16s} {value:.6g}" if isinstance(value, float) else f"{key:16s} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def cmd_inspect(args: argparse.Namespace) -> None:
    from qruntime.inspect import format_report, inspect_model

    report = inspect_model(args.model)
    print(json.dumps(report, indent=2) if args.json else format_report(report))


def cmd_demo(args: argparse.Namespace) -> None:
    from qruntime.demo import run_demo

    run_demo(args.model, bits=args.bits, prompt=args.prompt, max_new_tokens=args.max_new_tokens)


def _add_load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="packed qruntime directory or Hugging Face model directory")
    p.add_argument("--bits", type=int, choices=(4, 8, 16), default=None,
                   help="quantize an HF model on the fly with RTN (default: keep its precision)")
    p.add_argument("--group-size", type=_group_size, default=128)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"))
    p.add_argument("--max-seq-len", type=_positive_int, default=None,
                   help="KV cache length (default: what --memory-budget allows, else min(model max, 4096))")
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="device memory for weights and KV cache, e.g. 20GB: the cache gets the most positions that fit")
    p.add_argument("--kv-cache", choices=("auto", "int8"), default="auto",
                   help="KV cache: the compute dtype, or int8 with per-token scales (GPU: triton backend)")
    p.add_argument("-n", "--max-new-tokens", type=_positive_int, default=128)
    p.add_argument("--temperature", type=float, default=None, help="0 is greedy (default: generation_config.json)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qruntime", description="Quantized LLM inference runtime")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a checkpoint to the packed format")
    p.add_argument("src", help="source checkpoint: Hugging Face fp16/bf16, GPTQ, AWQ or compressed-tensors "
                               "directory, GGUF file, directory of GGUF files, or a Hugging Face repo id with --from gguf QUANT")
    p.add_argument("-o", "--output", required=True, help="output directory (must not exist unless --force)")
    p.add_argument("--from", dest="source_format", nargs="+", metavar="FORMAT", default=None,
                   help=f"source format (default: detected): {', '.join(_converter_names())}; for gguf an optional "
                        "QUANT (a llama.cpp type: q4_k_m, q8_0, ...) picks that file in a directory or repo")
    p.add_argument("--requantize", action="store_true",
                   help="GGUF: dequantize tensor types the packed format cannot hold (IQ*, TQ*, ...) and "
                        "re-quantize them with RTN at --bits (default int4, group 32); lossy, and said so")
    p.add_argument("--bits", type=int, choices=(4, 8, 16), default=None,
                   help="quantize float weights to 4 or 8 bits; 16 or unset keeps the source precision")
    p.add_argument("--method", choices=("rtn", "gptq", "awq"), default="rtn",
                   help="how float weights are quantized: rtn (no data), gptq or awq (calibration text)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns in decreasing Hessian order")
    p.add_argument("--calib", default=None, help="calibration text file for gptq/awq (default: built-in text)")
    p.add_argument("--calib-samples", type=_positive_int, default=None, help="calibration windows (default 128)")
    p.add_argument("--calib-seqlen", type=_positive_int, default=None, help="tokens per window (default 512)")
    p.add_argument("--group-size", type=_group_size, default=128, help="columns per scale; -1 per-channel")
    p.add_argument("--sym", action="store_true", help="symmetric quantization (no zero points); default asymmetric")
    p.add_argument("--lm-head-bits", type=int, choices=(4, 8, 16), default=None, help="default 8")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="generate text from a prompt (streams to stdout)")
    _add_load_options(p)
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("-q", "--quiet", action="store_true", help="no timing line on stderr after the text")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with the model's chat template")
    _add_load_options(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("bench", help="decode latency vs theory (B, W), TTFT, max context on a memory budget")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="packed dir, HF dir, or synthetic:llama3.1-8b | synthetic:llama3.2-1b | synthetic:qwen2.5-7b")
    p.add_argument("--weights", default=None, help="comma list of w16,w8,w4 (synthetic/HF sources; default all for synthetic)")
    p.add_argument("--kv", default="kv16", help="comma list of kv16,kv8 (kv8 needs a GPU)")
    p.add_argument("--context", default="0:8192:512", help="START:STOP:STEP context lengths of the decode curve")
    p.add_argument("--prompt", type=int, default=512, help="prompt length for TTFT (0 skips it)")
    p.add_argument("--repeat", type=_positive_int, default=5, help="timed repeats after warm-up")
    p.add_argument("--memory-budget", default=None, help="cap the allocator, e.g. 24GB, to emulate a smaller card")
    p.add_argument("--group-size", type=_group_size, default=128)
    p.add_argument("--peer", action="append", help="hf, or llama.cpp=PATH_TO_llama-bench (GGUF models)")
    p.add_argument("--compare", action="store_true", help="one table across converted checkpoints of one model")
    p.add_argument("--text", default=None, help="with --compare: text file for perplexity and KL vs the first model")
    p.add_argument("--eval-ctx", type=_positive_int, default=512, help="with --text: perplexity chunk length")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="write the full report as JSON")
    p.add_argument("--plot", default=None, help="write latency vs context (PNG)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="perplexity (llama.cpp protocol) and KL divergence against a base model")
    _add_load_options(p)
    p.add_argument("--text", required=True, help="UTF-8 text file to score")
    p.add_argument("--ctx", type=_positive_int, default=512, help="chunk length; the second half of each is scored")
    p.add_argument("--kl-base", default=None, help="base (e.g. fp16) model: report KL(base || MODEL) and top-1 agreement")
    p.add_argument("--max-chunks", type=_positive_int, default=None)
    p.add_argument("--json", default=None, help="write the results as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("inspect", help="architecture, per-tensor bits/group, honest BPW, sizes")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("demo", help="convert -> load -> generate end to end (a tiny local model if none is given)")
    p.add_argument("model", nargs="?", default=None, help="HF model directory (default: build a tiny random one)")
    p.add_argument("--bits", type=int, choices=(4, 8), default=4)
    p.add_argument("-p", "--prompt", default="hello world")
    p.add_argument("-n", "--max-new-tokens", type=_positive_int, default=32)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except QRuntimeError as e:
        print(f"qruntime: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qruntime: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
