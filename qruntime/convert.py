"""`qruntime convert`: any readable checkpoint -> a packed-format directory, atomically."""

from __future__ import annotations

import inspect
from pathlib import Path

from qruntime import format as packed_format
from qruntime.converters import base as converters
from qruntime.errors import InvalidOptionError
from qruntime.quantizers.base import QuantPolicy
from qruntime.quantizers.calibration import Calibration


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    source_format: str | None = None,
    bits: int | None = None,
    group_size: int = 128,
    symmetric: bool = False,
    lm_head_bits: int | None = None,
    method: str = "rtn",
    act_order: bool = False,
    calibration: Calibration | None = None,
    force: bool = False,
    progress: bool = True,
    quant_type: str | None = None,
    requantize: bool = False,
) -> Path:
    """Converts `src` to the packed format in `out`. The output appears only when complete; `src`
    is only read. bits None/16 keeps the source's precision; 4/8 quantizes float weights with
    `method` (rtn, or gptq/awq with `calibration` text, layer by layer).
    GGUF only: `quant_type` picks the file of that llama.cpp type in a directory or hub repo, and
    `requantize` lets types the format cannot hold through by re-quantizing them with RTN."""
    src, out = Path(src), Path(out)
    if source_format == "gguf" and not src.exists():
        from qruntime.converters.gguf.select import hub_file, looks_like_repo_id

        if looks_like_repo_id(str(src)):  # a Hugging Face repo id: download just that one file
            src, quant_type = hub_file(str(src), quant_type), None
    options = {k: v for k, v in (("quant_type", quant_type), ("requantize", requantize)) if v}
    if out.resolve() == src.resolve():
        raise InvalidOptionError(f"{out}: the output must differ from the source")
    if bits in (None, 16):
        if method != "rtn" or act_order or calibration is not None:
            raise InvalidOptionError(f"--method {method} / --act-order / --calib need --bits 4 or 8")
        if lm_head_bits not in (None, 16):
            raise InvalidOptionError("--lm-head-bits needs --bits 4 or 8")
        policy = None
    else:
        if method != "rtn" and calibration is None:
            calibration = Calibration()
        policy = QuantPolicy(bits, group_size, symmetric, lm_head_bits, method=method, act_order=act_order,
                             calibration=calibration)
    packed_format.check_output_free(out, force)  # fail before the (long) conversion, not after it
    name = source_format or converters.detect_format(src)
    if name == "gguf" and method != "rtn":
        raise InvalidOptionError(f"--method {method}: GGUF weights arrive quantized; only --method rtn applies "
                                 "(to its float tensors, with --bits)")
    if name in converters.CONVERTERS:
        accepted = inspect.signature(converters.CONVERTERS[name].convert).parameters
        if [k for k in options if k not in accepted]:
            raise InvalidOptionError(f"{', '.join(options)}: only apply to GGUF sources, not to {name}")
    ckpt = converters.convert(src, source_format=name, policy=policy, hash_sources=True, progress=progress, **options)
    with packed_format.atomic_output_dir(out, force=force) as tmp:
        packed_format.save(ckpt, tmp)
    return out
