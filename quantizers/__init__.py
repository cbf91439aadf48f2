"""fp16 -> packed codes. `rtn` now; `gptq` and `awq` plug into the same QuantPolicy."""

from .base import QuantPolicy
from .rtn import quantize_rtn

__all__ = ["QuantPolicy", "quantize_rtn"]
