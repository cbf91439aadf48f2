"""The small building blocks of the decoder: QuantLinear, RMSNorm, rotary embedding, attention, MLP."""

from .attention import Attention
from .mlp import MLP
from .norm import RMSNorm
from .quant_linear import QuantLinear
from .rotary import RotaryEmbedding

__all__ = ["Attention", "MLP", "QuantLinear", "RMSNorm", "RotaryEmbedding"]
