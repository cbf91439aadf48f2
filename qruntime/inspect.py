"""`qruntime inspect`: what a model directory holds, with honest bits-per-weight.

BPW counts every byte a decode step reads for a linear: codes, scales, zeros/offsets, the
act-order permutation and the bias (THEORY.md's P_w), divided by its number of weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qruntime import format as packed_format
from qruntime.config import ModelConfig
from qruntime.converters import base as converters
from qruntime.converters.hf import read_config
from qruntime.errors import ModelNotFoundError, NotAModelError


def inspect_model(path: str | Path) -> dict[str, Any]:
    """A report dict: source format, config, one row per linear, totals."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such file or directory")
    if packed_format.is_packed_dir(path):
        manifest = packed_format.read_manifest(path)
        config = ModelConfig.from_dict(packed_format.read_json(path / packed_format.CONFIG))
        headers: dict[str, dict[str, Any]] = {}
        for shard in manifest["shards"]:
            headers.update(packed_format.safetensors_header(path / shard))
        specs = manifest["linears"]
        source = manifest.get("source", {})
        fmt = f"{packed_format.FORMAT_NAME} v{manifest['format_version']}"
    elif converters.detect_format(path) == "hf":
        config = read_config(path)
        headers = {}
        for shard in sorted(path.glob("*.safetensors")):
            headers.update(packed_format.safetensors_header(shard))
        specs = {n[: -len(".weight")]: None for n, h in headers.items() if n.endswith("proj.weight") or n == "lm_head.weight"}
        source = {"format": "hf"}
        fmt = "hf safetensors"
    elif converters.detect_format(path) == "gguf":
        from qruntime.converters.gguf.inspect import inspect_gguf

        return inspect_gguf(path)
    else:
        raise NotAModelError(f"{path}: inspect reads packed and Hugging Face directories and GGUF files")

    rows = []
    for name, spec in specs.items():
        parts = {k: h for k, h in headers.items() if k.startswith(name + ".")}
        nbytes = sum(h["nbytes"] for h in parts.values())
        main = parts.get(f"{name}.weight") or parts.get(f"{name}.qweight")
        if spec is None:  # unquantized HF weight
            out_f, in_f = main["shape"]
            spec = {"bits": 16, "group_size": -1, "zero_mode": "none", "act_order": False,
                    "in_features": in_f, "out_features": out_f}
        n_weights = spec["in_features"] * spec["out_features"]
        rows.append({
            "name": name, "bits": spec["bits"], "group_size": spec["group_size"], "zero_mode": spec["zero_mode"],
            "act_order": spec["act_order"], "shape": [spec["out_features"], spec["in_features"]],
            "bytes": nbytes, "bpw": 8 * nbytes / n_weights, "weights": n_weights,
        })
    linear_bytes = sum(r["bytes"] for r in rows)
    linear_weights = sum(r["weights"] for r in rows)
    total_bytes = sum(h["nbytes"] for h in headers.values())
    return {
        "path": str(path),
        "format": fmt,
        "source": source,
        "config": config.to_dict(),
        "linears": rows,
        "linear_bytes": linear_bytes,
        "linear_bpw": 8 * linear_bytes / max(linear_weights, 1),
        "total_tensor_bytes": total_bytes,
        "other_tensor_bytes": total_bytes - linear_bytes,
    }


def format_report(report: dict[str, Any]) -> str:
    if report["format"].startswith("gguf"):
        from qruntime.converters.gguf.inspect import format_gguf_report

        return format_gguf_report(report)
    c = report["config"]
    lines = [
        f"{report['path']}: {report['format']} (source: {report['source'].get('format', '?')}"
        f"{', method ' + report['source']['method'] if report['source'].get('method') else ''})",
        f"arch {c['family']}: {c['num_layers']} layers, hidden {c['hidden_size']}, ffn {c['intermediate_size']}, "
        f"heads {c['num_heads']}/{c['num_kv_heads']} kv, head_dim {c['head_dim']}, vocab {c['vocab_size']}, "
        f"rope theta {c['rope_theta']:g}{' (' + c['rope_scaling']['type'] + ')' if c['rope_scaling'] else ''}, "
        f"tied embeddings {c['tie_word_embeddings']}",
        "",
        f"{'linear':48s} {'bits':>4s} {'group':>6s} {'zeros':>9s} {'act':>4s} {'shape':>14s} {'MiB':>9s} {'BPW':>6s}",
    ]
    for r in report["linears"]:
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        lines.append(
            f"{r['name']:48s} {r['bits']:>4d} {r['group_size']:>6d} {r['zero_mode']:>9s} {'yes' if r['act_order'] else 'no':>4s} "
            f"{shape:>14s} {r['bytes'] / 2**20:>9.3f} {r['bpw']:>6.3f}"
        )
    lines += [
        "",
        f"linears: {report['linear_bytes'] / 2**20:.2f} MiB at {report['linear_bpw']:.3f} bits per weight "
        "(codes + scales + zeros + perm + bias)",
        f"other tensors (embeddings, norms): {report['other_tensor_bytes'] / 2**20:.2f} MiB; "
        f"total {report['total_tensor_bytes'] / 2**20:.2f} MiB",
    ]
    return "\n".join(lines)
