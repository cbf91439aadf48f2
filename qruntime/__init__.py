"""qruntime: a quantized LLM inference runtime for Llama and Qwen models.

    import qruntime
    model = qruntime.load("path/to/model", bits=4)
    print(model.generate("Hello", max_new_tokens=32))
"""

from .errors import QRuntimeError
from .engine.generate import GenerationStats
from .engine.sampler import SamplingParams
from .runtime import Model, load

__version__ = "0.1.0"
__all__ = ["GenerationStats", "Model", "QRuntimeError", "SamplingParams", "load", "__version__"]
