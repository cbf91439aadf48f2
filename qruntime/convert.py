"""`qruntime convert`: any readable checkpoint -> a packed-format directory, atomically."""

from __future__ import annotations

from pathlib import Path

from qruntime import format as packed_format
from qruntime.converters import base as converters
from qruntime.errors import InvalidOptionError
from qruntime.quantizers.base import QuantPolicy


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    source_format: str | None = None,
    bits: int | None = None,
    group_size: int = 128,
    symmetric: bool = False,
    lm_head_bits: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Converts `src` to the packed format in `out`. The output appears only when complete; `src`
    is only read. bits None/16 keeps the source's precision; 4/8 quantizes float weights with RTN."""
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise InvalidOptionError(f"{out}: the output must differ from the source")
    policy = None if bits in (None, 16) else QuantPolicy(bits, group_size, symmetric, lm_head_bits)
    if policy is None and lm_head_bits not in (None, 16):
        raise InvalidOptionError("--lm-head-bits needs --bits 4 or 8")
    packed_format.check_output_free(out, force)  # fail before the (long) conversion, not after it
    ckpt = converters.convert(src, source_format=source_format, policy=policy, hash_sources=True, progress=progress)
    with packed_format.atomic_output_dir(out, force=force) as tmp:
        packed_format.save(ckpt, tmp)
    return out
