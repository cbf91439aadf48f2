"""QuantPolicy: which linears get which bits, shared by every quantizer.

Policy (stated in README and FORMAT.md):
- decoder-layer linears get `bits` (4 or 8) with `group_size` and `symmetric` (default
  asymmetric: an integer zero point per group);
- `lm_head` gets `lm_head_bits` (default 8 when bits is 4 or 8: the output projection is the
  layer most sensitive to quantization, as llama.cpp's q4_k_m also keeps it at 6 bits; 16 keeps it
  unquantized). A tied lm_head that is quantized gets its own packed copy; the embedding is kept.
- embeddings and norms stay 16-bit: decode gathers one embedding row per token, so quantizing the
  table saves memory but no bandwidth.
- `method` picks how decoder linears are quantized: "rtn" (round to nearest, no data), "gptq" or
  "awq" (calibration data, layer by layer; `calibration` says which text). lm_head is quantized
  with RTN by every method (at 8 bits by default the method makes no measurable difference).
"""

from __future__ import annotations

from dataclasses import dataclass

from qruntime.errors import InvalidOptionError

from .calibration import Calibration

SUPPORTED_BITS = (4, 8)
METHODS = ("rtn", "gptq", "awq")


@dataclass(frozen=True)
class QuantPolicy:
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False  # asymmetric RTN loses less at 4 bits; zeros cost 1/16 bit per weight at g128
    lm_head_bits: int | None = None  # None: 8 (see module docstring)
    lm_head_group_size: int | None = None  # None: same as group_size
    method: str = "rtn"
    act_order: bool = False  # GPTQ only: quantize columns in decreasing Hessian-diagonal order
    calibration: Calibration | None = None  # GPTQ/AWQ: None means Calibration() (the built-in text)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidOptionError(f"method={self.method!r}; choose one of {', '.join(METHODS)}")
        if self.act_order and self.method != "gptq":
            raise InvalidOptionError("act_order is a GPTQ option; use it with method='gptq'")
        if self.calibration is not None and self.method == "rtn":
            raise InvalidOptionError("calibration data is used by --method gptq or awq, not rtn")
        if self.bits not in SUPPORTED_BITS:
            raise InvalidOptionError(f"bits={self.bits} is not supported; choose 4 or 8 (or 16 for no quantization)")
        check_group_size(self.group_size)
        if self.lm_head_bits not in (None, 4, 8, 16):
            raise InvalidOptionError(f"lm_head_bits={self.lm_head_bits}; choose 4, 8 or 16")
        if self.lm_head_group_size is not None:
            check_group_size(self.lm_head_group_size)

    def for_linear(self, name: str) -> tuple[int, int]:
        """(bits, group_size) for the named linear; bits 16 means keep it unquantized."""
        if name == "lm_head":
            bits = 8 if self.lm_head_bits is None else self.lm_head_bits
            return bits, self.lm_head_group_size or self.group_size
        return self.bits, self.group_size


def check_group_size(group_size: int) -> None:
    if group_size != -1 and (group_size < 16 or group_size & (group_size - 1)):
        raise InvalidOptionError(
            f"group_size={group_size}; choose a power of two >= 16 (32, 64, 128 are usual) or -1 for per-channel"
        )
