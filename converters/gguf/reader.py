"""A validating GGUF parser: every count, length, type id, shape and offset is checked against the
file before anything is allocated or sliced, so a hostile file raises a QRuntimeError subclass.

GGUF v2/v3 layout (little-endian; llama.cpp `ggml/src/gguf.cpp`, gguf-py `gguf_reader.py`):

    u32 magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x      { str key | u32 value_type | value }
    n_tensors x { str name | u32 n_dims | i64 ne[n_dims] | u32 ggml_type | u64 offset }
    padding to `general.alignment` (default 32) | tensor data (offsets relative to here)

    str   = u64 length | bytes (UTF-8, no terminator)
    value = scalar | str | { u32 elem_type | u64 count | count x elem }   (arrays do not nest)

ne[0] is the innermost (contiguous) dimension: a linear weight [N, K] has ne = (K, N). We keep
GGUF's order in `TensorInfo.shape` and say so wherever a shape is turned around.

Memory bound: each element of a count costs at least one byte of the file (a string or a tensor
info costs more), so every count is checked against the bytes left *before* a loop or an
allocation runs; numeric arrays are sliced from the mapped file, never sized from the header.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from qruntime.errors import CorruptFileError, UnsupportedFormatError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 counted in 32 bits and is long gone
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4          # GGML_MAX_DIMS
MAX_NAME_BYTES = 63   # GGML_MAX_NAME is 64 including the terminating NUL
_INT64_MAX = 2**63 - 1

# value type -> (struct format, byte width) of the scalar types
_SCALARS: dict[int, tuple[str, int]] = {
    GGUFValueType.UINT8: ("<B", 1), GGUFValueType.INT8: ("<b", 1),
    GGUFValueType.UINT16: ("<H", 2), GGUFValueType.INT16: ("<h", 2),
    GGUFValueType.UINT32: ("<I", 4), GGUFValueType.INT32: ("<i", 4),
    GGUFValueType.FLOAT32: ("<f", 4), GGUFValueType.BOOL: ("<?", 1),
    GGUFValueType.UINT64: ("<Q", 8), GGUFValueType.INT64: ("<q", 8),
    GGUFValueType.FLOAT64: ("<d", 8),
}
_NUMPY = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "<u1", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


def type_name(ggml_type: int) -> str:
    """llama.cpp's name of a tensor type id ("Q4_K"), or "type<id>" for an unknown id."""
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type{ggml_type}"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry, validated. `shape` is GGUF order (ne0 first)."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GGUFFile:
    """A parsed, validated GGUF file. `data` is the whole file (a read-only memory map or buffer)."""

    source: str
    version: int
    alignment: int
    data_start: int
    metadata: dict[str, Any]            # scalars as Python values, string arrays as lists,
    metadata_types: dict[str, str]      # numeric arrays as numpy arrays; key -> "uint32", "array[string]"...
    tensors: dict[str, TensorInfo]      # in file order
    data: np.ndarray

    def tensor_bytes(self, name: str) -> np.ndarray:
        """uint8 view of one tensor's bytes (bounds checked at parse time)."""
        t = self.tensors[name]
        return self.data[t.offset:t.offset + t.nbytes]

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


class _Cursor:
    """Reads little-endian values from `buf`, refusing to read past its end."""

    def __init__(self, buf: np.ndarray, source: str) -> None:
        self.buf, self.source, self.pos, self.size = buf, source, 0, len(buf)

    def fail(self, what: str) -> CorruptFileError:
        return CorruptFileError(f"{self.source}: {what} (at byte {self.pos} of {self.size}); "
                                "the file is corrupt or truncated: re-download it")

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.size - self.pos:
            raise self.fail(f"{what} needs {n} bytes, only {self.size - self.pos} left")

    def scalar(self, vtype: int, what: str) -> Any:
        fmt, width = _SCALARS[vtype]
        self.need(width, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += width
        return value

    def u32(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT64, what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def count(self, what: str, min_bytes_each: int) -> int:
        """A u64 count whose elements need at least `min_bytes_each` bytes each: checked so no
        loop or allocation is sized by a number the file cannot back."""
        n = self.u64(f"count of {what}")
        if n > (self.size - self.pos) // max(min_bytes_each, 1):
            raise self.fail(f"{what}: count {n} cannot fit in the {self.size - self.pos} bytes left")
        return n


def _value_type(cur: _Cursor, raw: int, key: str, in_array: bool = False) -> int:
    if raw not in _SCALARS and raw not in (GGUFValueType.STRING, GGUFValueType.ARRAY):
        raise cur.fail(f"metadata {key!r}: unknown value type {raw}")
    if in_array and raw == GGUFValueType.ARRAY:
        raise cur.fail(f"metadata {key!r}: nested arrays are not part of GGUF")
    return raw


def _read_value(cur: _Cursor, vtype: int, key: str) -> tuple[Any, str]:
    if vtype == GGUFValueType.STRING:
        return cur.string(f"metadata {key!r}"), "string"
    if vtype != GGUFValueType.ARRAY:
        return cur.scalar(vtype, f"metadata {key!r}"), GGUFValueType(vtype).name.lower()
    etype = _value_type(cur, cur.u32(f"metadata {key!r} element type"), key, in_array=True)
    if etype == GGUFValueType.STRING:
        n = cur.count(f"metadata {key!r}", 8)  # each string has at least its u64 length
        return [cur.string(f"metadata {key!r}[{i}]") for i in range(n)], "array[string]"
    width = _SCALARS[etype][1]
    n = cur.count(f"metadata {key!r}", width)
    arr = np.frombuffer(cur.buf, dtype=_NUMPY[etype], count=n, offset=cur.pos).copy()
    if etype == GGUFValueType.BOOL:
        arr = arr.astype(bool)
    cur.pos += n * width
    return arr, f"array[{GGUFValueType(etype).name.lower()}]"


def _tensor_info(cur: _Cursor) -> tuple[str, int, tuple[int, ...], int]:
    name = cur.string("tensor name")
    where = f"tensor {name!r}"
    if not name:
        raise cur.fail("a tensor has an empty name")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise cur.fail(f"{where}: name longer than {MAX_NAME_BYTES} bytes")
    n_dims = cur.u32(f"{where} n_dims")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"{where}: n_dims {n_dims} outside 1..{MAX_DIMS}")
    shape = tuple(cur.scalar(GGUFValueType.INT64, f"{where} ne[{i}]") for i in range(n_dims))
    if any(d < 0 for d in shape):
        raise cur.fail(f"{where}: negative dimension in {list(shape)}")
    ggml_type = cur.scalar(GGUFValueType.INT32, f"{where} type")
    offset = cur.u64(f"{where} offset")
    return name, ggml_type, shape, offset


def _tensor_nbytes(cur: _Cursor, name: str, ggml_type: int, shape: tuple[int, ...]) -> int:
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise UnsupportedFormatError(
            f"{cur.source}: tensor {name!r} has type id {ggml_type}, unknown to this reader (gguf "
            f"package); known types: {', '.join(t.name for t in GGML_QUANT_SIZES)}. A newer llama.cpp "
            "type needs a newer qruntime, or re-quantize the model with llama.cpp to a listed type"
        ) from None
    n = 1
    for d in shape:
        n *= d
        if n > _INT64_MAX:
            raise cur.fail(f"tensor {name!r}: element count of {list(shape)} overflows int64")
    if shape[0] % block:
        raise cur.fail(f"tensor {name!r}: ne0={shape[0]} is not a multiple of the {type_name(ggml_type)} "
                       f"block size {block}")
    nbytes = n // block * type_size
    if nbytes > _INT64_MAX:
        raise cur.fail(f"tensor {name!r}: {nbytes} bytes overflows int64")
    return nbytes


def parse_gguf(data: np.ndarray, source: str) -> GGUFFile:
    """Parses and validates a GGUF image held in `data` (uint8, e.g. a memory map)."""
    cur = _Cursor(data, source)
    if cur.size < 4 or bytes(data[:4]) != MAGIC:
        raise CorruptFileError(f"{source}: not a GGUF file (magic {bytes(data[:4])!r}, expected {MAGIC!r})")
    cur.pos = 4
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        hint = " (it looks big-endian: convert it on a little-endian machine)" if version & 0xFFFF == 0 else ""
        raise UnsupportedFormatError(f"{source}: GGUF version {version} is not supported{hint}; "
                                     f"supported: {', '.join(map(str, SUPPORTED_VERSIONS))}")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    # a key/value needs >= 8 (key length) + 4 (type) + 1 bytes; a tensor info >= 8 + 1 + 4 + 8 + 4 + 8
    if n_kv > cur.size // 13 or n_tensors > cur.size // 33:
        raise cur.fail(f"header declares {n_tensors} tensors and {n_kv} metadata entries, more than the "
                       f"file can hold")

    metadata: dict[str, Any] = {}
    types: dict[str, str] = {}
    for _ in range(n_kv):
        key = cur.string("metadata key")
        if not key:
            raise cur.fail("a metadata key is empty")
        if key in metadata:
            raise cur.fail(f"metadata key {key!r} appears twice")
        vtype = _value_type(cur, cur.u32(f"metadata {key!r} type"), key)
        metadata[key], types[key] = _read_value(cur, vtype, key)

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        alignment = metadata["general.alignment"]
        if types["general.alignment"] != "uint32" or alignment == 0 or alignment & (alignment - 1):
            raise cur.fail(f"general.alignment must be a uint32 power of two, got {types['general.alignment']} "
                           f"{alignment!r}")

    raw_infos = [_tensor_info(cur) for _ in range(n_tensors)]
    data_start = -(-cur.pos // alignment) * alignment
    if data_start > cur.size:
        raise cur.fail("the header ends past the end of the file")

    tensors: dict[str, TensorInfo] = {}
    for name, ggml_type, shape, rel_offset in raw_infos:
        if name in tensors:
            raise cur.fail(f"tensor {name!r} appears twice")
        nbytes = _tensor_nbytes(cur, name, ggml_type, shape)
        if rel_offset % alignment:
            raise cur.fail(f"tensor {name!r}: offset {rel_offset} is not a multiple of the alignment {alignment}")
        if rel_offset > cur.size - data_start or nbytes > cur.size - data_start - rel_offset:
            raise CorruptFileError(
                f"{source}: tensor {name!r} needs bytes {data_start + rel_offset}..{data_start + rel_offset + nbytes} "
                f"but the file has {cur.size}; the file is truncated or corrupt: re-download it"
            )
        tensors[name] = TensorInfo(name, ggml_type, shape, data_start + rel_offset, nbytes)

    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise CorruptFileError(f"{source}: tensors {a!r} and {b!r} overlap; the file is corrupt")
    return GGUFFile(source, version, alignment, data_start, metadata, types, tensors, data)


def read_gguf(path: str | Path) -> GGUFFile:
    """Memory-maps and validates a GGUF file (nothing but the header is read into memory)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size < 24:
            raise CorruptFileError(f"{path}: {size} bytes, too short for a GGUF file (header is 24 bytes)")
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except OSError as e:
        raise CorruptFileError(f"{path}: cannot be read ({e})") from None
    return parse_gguf(data, str(path))


def peek_magic(path: Path) -> bool:
    """True when `path` is a file starting with the GGUF magic (cheap format detection)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False
