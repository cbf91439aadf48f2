"""Readers of foreign checkpoints into the in-memory QuantizedCheckpoint.

Each converter registers itself in `base.CONVERTERS` with a `detect(path)` and a `convert(...)`;
`base.convert` picks one by detection or by name.
"""

from .base import CONVERTERS, convert, detect_format

__all__ = ["CONVERTERS", "convert", "detect_format"]
