"""Converter registry: detect the checkpoint format of a path and dispatch to its converter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qruntime.checkpoint import QuantizedCheckpoint
from qruntime.errors import InvalidOptionError, ModelNotFoundError, NotAModelError, UnsafeCheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class Converter:
    """A reader of one foreign format.

    detect(path) -> bool: cheap check (file magic, config keys), no heavy reads.
    convert(path, policy=None, progress=True, hash_sources=False, **format_options) -> QuantizedCheckpoint:
      `policy` (a QuantPolicy or None) says how to quantize weights that arrive as floats; weights
      that arrive quantized keep their codes. `hash_sources` records each source file's sha256 in
      `source["files"]`. The result must pass `QuantizedCheckpoint.validate()`.
    """

    name: str
    detect: Callable[[Path], bool]
    convert: Callable[..., QuantizedCheckpoint]


CONVERTERS: dict[str, Converter] = {}


def register(converter: Converter) -> Converter:
    if converter.name in CONVERTERS:  # registries assert unique keys
        raise RuntimeError(f"converter {converter.name!r} registered twice")
    CONVERTERS[converter.name] = converter
    return converter


def refuse_pickles(path: Path) -> None:
    """Raises UnsafeCheckpointError for pickle checkpoints: they can run code when loaded."""
    files = [path] if path.is_file() else list(path.iterdir())
    if any(f.suffix in PICKLE_SUFFIXES for f in files) and not any(f.suffix == ".safetensors" for f in files):
        raise UnsafeCheckpointError(
            f"{path}: holds only pickle weights ({', '.join(sorted({f.suffix for f in files if f.suffix in PICKLE_SUFFIXES}))}); "
            "qruntime never unpickles (it can execute code). Convert them to safetensors first, e.g. "
            "with transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)"
        )


def detect_format(path: Path) -> str:
    """The name of the converter that reads `path`."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such file or directory")
    for name, conv in CONVERTERS.items():
        if conv.detect(path):
            return name
    refuse_pickles(path)
    raise NotAModelError(
        f"{path}: not a model qruntime can read (expected a Hugging Face directory with config.json and "
        f"*.safetensors, or a qruntime packed directory); readable formats: {', '.join(CONVERTERS)}"
    )


def convert(path: Path, source_format: str | None = None, **options) -> QuantizedCheckpoint:
    """Reads `path` with the named converter (detected when None)."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such file or directory")
    name = source_format or detect_format(path)
    if name not in CONVERTERS:
        raise InvalidOptionError(f"--from {name!r}: unknown source format; known: {', '.join(CONVERTERS)}")
    return CONVERTERS[name].convert(path, **options)


# Converters register on import; keep this list the single place that names them.
from . import hf  # noqa: E402,F401
from . import gptq, awq, compressed_tensors  # noqa: E402,F401  (after hf: they reuse its reader)
from . import gguf  # noqa: E402,F401
