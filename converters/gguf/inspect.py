"""`qruntime inspect FILE.gguf`: metadata, per-tensor types and bits per weight, and what each type
costs once converted to the packed format (types.py's table)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGMLQuantizationType as T

from .reader import read_gguf
from .select import local_file
from .tensors import torch_shape
from .types import FLOAT_TYPES, QUANT_TYPES

_FLOAT_BITS = {T.F32: 32, T.F16: 16, T.BF16: 16}


def packed_bpw(ggml_type: int) -> float | None:
    """Bits per weight after conversion (fp16 scales/offsets), None for types that need --requantize."""
    if ggml_type in _FLOAT_BITS:
        return float(_FLOAT_BITS[T(ggml_type)])
    m = QUANT_TYPES.get(ggml_type)
    if m is None:
        return None
    return m.bits + 16 / m.group_size * (2 if m.zero_mode == "float" else 1)


def _summary(value: Any, vtype: str) -> Any:
    if isinstance(value, list):
        head = ", ".join(repr(v) for v in value[:3])
        return f"{vtype} x {len(value)} [{head}{', ...' if len(value) > 3 else ''}]"
    if isinstance(value, np.ndarray):
        head = ", ".join(str(v) for v in value[:3].tolist())
        return f"{vtype} x {len(value)} [{head}{', ...' if len(value) > 3 else ''}]"
    if isinstance(value, str) and len(value) > 100:
        return value[:100].replace("\n", "\\n") + f"... ({len(value)} chars)"
    return value


def inspect_gguf(path: str | Path) -> dict[str, Any]:
    """A report dict: file, version, metadata (long values summarized), tensors, totals by type."""
    file = local_file(Path(path), None)
    f = read_gguf(file)
    tensors, by_type = [], {}
    for t in f.tensors.values():
        n = t.n_elements
        tensors.append({"name": t.name, "type": t.type_name, "shape": list(torch_shape(t)), "bytes": t.nbytes,
                        "bpw": 8 * t.nbytes / n if n else 0.0})
        row = by_type.setdefault(t.type_name, {"tensors": 0, "weights": 0, "bytes": 0,
                                               "packed_bpw": packed_bpw(t.ggml_type)})
        row["tensors"] += 1
        row["weights"] += n
        row["bytes"] += t.nbytes
    weights = sum(r["weights"] for r in by_type.values())
    total = sum(r["bytes"] for r in by_type.values())
    return {
        "path": str(file),
        "format": f"gguf v{f.version}",
        "metadata": {k: _summary(v, f.metadata_types[k]) for k, v in f.metadata.items()},
        "tensors": tensors,
        "by_type": by_type,
        "tensor_bytes": total,
        "bpw": 8 * total / max(weights, 1),
        "needs_requantize": sorted(k for k in by_type if by_type[k]["packed_bpw"] is None),
        "mapped_types": sorted(t.name for t in (*FLOAT_TYPES, *QUANT_TYPES)),
    }


def format_gguf_report(report: dict[str, Any]) -> str:
    lines = [f"{report['path']}: {report['format']}", "", "metadata:"]
    lines += [f"  {k} = {v}" for k, v in report["metadata"].items()]
    lines += ["", f"{'tensor':40s} {'type':>8s} {'shape':>16s} {'KiB':>10s} {'BPW':>7s}"]
    for t in report["tensors"]:
        shape = "x".join(map(str, t["shape"]))
        lines.append(f"{t['name']:40s} {t['type']:>8s} {shape:>16s} {t['bytes'] / 1024:>10.1f} {t['bpw']:>7.3f}")
    lines += ["", f"{'type':8s} {'tensors':>8s} {'weights':>12s} {'MiB':>9s} {'BPW':>7s} {'packed BPW':>11s}"]
    for name, r in report["by_type"].items():
        packed = "requantize" if r["packed_bpw"] is None else f"{r['packed_bpw']:.3f}"
        bpw = 8 * r["bytes"] / max(r["weights"], 1)
        lines.append(f"{name:8s} {r['tensors']:>8d} {r['weights']:>12d} {r['bytes'] / 2**20:>9.2f} {bpw:>7.3f} {packed:>11s}")
    lines.append(f"\nall tensors: {report['tensor_bytes'] / 2**20:.2f} MiB at {report['bpw']:.3f} bits per weight")
    if report["needs_requantize"]:
        lines.append(f"types the packed format cannot hold as they are (convert with --requantize): "
                     f"{', '.join(report['needs_requantize'])}")
    return "\n".join(lines)
