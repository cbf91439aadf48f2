"""The packed format v1 on disk (normative spec: docs/FORMAT.md) and the file helpers around it.

This module is the only code that reads or writes model files: converters call
`open_safetensors`/`read_json` for foreign checkpoints, and `save`/`load` for the packed format.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import PackedLinear, QuantizedCheckpoint
from .config import ModelConfig
from .errors import (
    ChecksumMismatchError,
    CorruptFileError,
    ModelNotFoundError,
    NotAModelError,
    OutputExistsError,
    ShapeMismatchError,
    UnsupportedFormatError,
)

FORMAT_NAME = "qruntime.packed"
FORMAT_VERSION = 1
MANIFEST = "quantization.json"
CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_DIR = "tokenizer"
DEFAULT_SHARD_BYTES = 2 * 1024**3
_LINEAR_FIELDS = ("weight", "qweight", "scales", "zeros", "offsets", "perm", "bias")


# ----------------------------------------------------------------------------- file helpers

def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise NotAModelError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path}: not valid JSON ({e}); re-download or re-convert it") from None
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")


def _check_safetensors_header(path: Path) -> None:
    """Checks the header length and that every tensor's data lies inside the file.

    safetensors checks most of this itself; doing it first lets us name the file and the
    problem (truncated download, not a safetensors file) in one clear message.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptFileError(f"{path}: {size} bytes, too short for a safetensors file; re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 1024**2:
            raise CorruptFileError(f"{path}: header length {n} does not fit in the file ({size} bytes); "
                                   "the file is truncated or not safetensors")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CorruptFileError(f"{path}: safetensors header is not valid JSON; the file is corrupt") from None
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path}: safetensors header is not an object")
    end = max((v["data_offsets"][1] for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + n + end > size:
        raise CorruptFileError(f"{path}: truncated: tensors need {8 + n + end} bytes, the file has {size}; "
                               "re-download or re-convert it")


@contextlib.contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """safe_open with every failure turned into CorruptFileError naming the file."""
    _check_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            yield _CheckedReader(f, path)
    except CorruptFileError:
        raise
    except Exception as e:  # safetensors raises its own SafetensorError and OSError variants
        raise CorruptFileError(f"{path}: cannot read safetensors ({e}); re-download or re-convert it") from None


class _CheckedReader:
    def __init__(self, handle: Any, path: Path) -> None:
        self._handle, self._path = handle, path

    def keys(self) -> list[str]:
        return list(self._handle.keys())

    def get_tensor(self, name: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(name)
        except Exception as e:
            raise CorruptFileError(f"{self._path}: tensor {name!r} cannot be read ({e})") from None


# ------------------------------------------------------------------------ atomic output dir

def check_output_free(out: Path, force: bool) -> None:
    if Path(out).exists() and not force:
        raise OutputExistsError(f"{out}: already exists; choose another output path or pass --force to replace it")


@contextlib.contextmanager
def atomic_output_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yields a temporary directory beside `out`, renamed to `out` only if the block succeeds.

    A failed run leaves nothing behind. An existing `out` is refused unless `force`, and is
    replaced only after the new directory is complete.
    """
    out = Path(out)
    check_output_free(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any new directory
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------- packed format

def is_packed_dir(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _tensor_dict(ckpt: QuantizedCheckpoint) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, lin in ckpt.linears.items():
        for suffix, t in lin.tensors().items():
            out[f"{name}.{suffix}"] = t
    out.update(ckpt.dense)
    return out


def _shard_plan(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save(ckpt: QuantizedCheckpoint, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Writes `ckpt` into an existing, empty `directory` (see atomic_output_dir)."""
    directory = Path(directory)
    ckpt.validate()
    tensors = _tensor_dict(ckpt)
    plan = _shard_plan(tensors, max_shard_bytes)
    shards: dict[str, dict[str, Any]] = {}
    weight_map: dict[str, str] = {}
    for i, names in enumerate(plan):
        fname = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in names}, str(directory / fname), metadata={"format": "pt"})
        os.chmod(directory / fname, 0o644)
        shards[fname] = {"sha256": sha256_file(directory / fname), "bytes": (directory / fname).stat().st_size}
        weight_map.update({n: fname for n in names})
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "source": ckpt.source,
        "linears": {
            name: {
                "in_features": lin.in_features,
                "out_features": lin.out_features,
                "bits": lin.bits,
                "group_size": lin.group_size,
                "zero_mode": lin.zero_mode,
                "act_order": lin.perm is not None,
                "bias": lin.bias is not None,
            }
            for name, lin in ckpt.linears.items()
        },
        "dense": sorted(ckpt.dense),
        "shards": shards,
        "weight_map": weight_map,
    }
    _write_json(directory / MANIFEST, manifest)
    _write_json(directory / CONFIG, ckpt.config.to_dict())
    if ckpt.generation_config is not None:
        _write_json(directory / GENERATION_CONFIG, ckpt.generation_config)
    if ckpt.tokenizer_files:
        (directory / TOKENIZER_DIR).mkdir()
        for fname, data in ckpt.tokenizer_files.items():
            (directory / TOKENIZER_DIR / fname).write_bytes(data)


def _read_manifest(directory: Path) -> dict[str, Any]:
    manifest = read_json(directory / MANIFEST)
    if manifest.get("format") != FORMAT_NAME:
        raise UnsupportedFormatError(f"{directory / MANIFEST}: format {manifest.get('format')!r} is not {FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{directory / MANIFEST}: format_version {version!r}; this qruntime reads version {FORMAT_VERSION}. "
            "Re-convert the model with this qruntime, or upgrade qruntime"
        )
    for key in ("linears", "dense", "shards", "weight_map"):
        if key not in manifest:
            raise CorruptFileError(f"{directory / MANIFEST}: missing field {key!r}")
    return manifest


def load(directory: Path, verify: bool = True) -> QuantizedCheckpoint:
    """Reads a packed-format directory, checking every shard's sha256 when `verify`."""
    directory = Path(directory)
    if not directory.exists():
        raise ModelNotFoundError(f"{directory}: no such file or directory")
    manifest = _read_manifest(directory)
    config = ModelConfig.from_dict(read_json(directory / CONFIG))
    tensors: dict[str, torch.Tensor] = {}
    for fname, info in manifest["shards"].items():
        path = directory / fname
        if not path.is_file():
            raise CorruptFileError(f"{path}: shard listed in {MANIFEST} is missing; re-convert the model")
        if verify and sha256_file(path) != info["sha256"]:
            raise ChecksumMismatchError(
                f"{path}: sha256 differs from the one recorded in {MANIFEST}; the file is corrupt or was "
                "modified: re-convert the model (or load with verify=False at your own risk)"
            )
        with open_safetensors(path) as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    missing = [n for n in manifest["weight_map"] if n not in tensors]
    if missing:
        raise CorruptFileError(f"{directory}: tensors listed in {MANIFEST} are missing from the shards: {missing[:5]}")

    linears: dict[str, PackedLinear] = {}
    for name, spec in manifest["linears"].items():
        fields = {s: tensors.pop(f"{name}.{s}") for s in _LINEAR_FIELDS if f"{name}.{s}" in tensors}
        qweight = fields.pop("weight", None) if spec["bits"] == 16 else fields.pop("qweight", None)
        if qweight is None:
            raise CorruptFileError(f"{directory}: linear {name!r} has no stored weight")
        lin = PackedLinear(spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"], qweight, **fields)
        lin.validate(name)
        if lin.zero_mode != spec["zero_mode"] or (lin.perm is not None) != spec["act_order"]:
            raise ShapeMismatchError(f"{name}: stored tensors disagree with {MANIFEST} (zero_mode/act_order)")
        linears[name] = lin
    dense = {n: tensors.pop(n) for n in manifest["dense"] if n in tensors}
    if tensors:
        raise CorruptFileError(f"{directory}: shards hold tensors {MANIFEST} does not describe: {sorted(tensors)[:5]}")
    tok_dir = directory / TOKENIZER_DIR
    tokenizer_files = {p.name: p.read_bytes() for p in sorted(tok_dir.iterdir())} if tok_dir.is_dir() else {}
    gen_path = directory / GENERATION_CONFIG
    ckpt = QuantizedCheckpoint(
        config=config,
        linears=linears,
        dense=dense,
        tokenizer_files=tokenizer_files,
        generation_config=read_json(gen_path) if gen_path.is_file() else None,
        source=manifest.get("source", {}),
    )
    ckpt.validate()
    return ckpt


def read_manifest(directory: Path) -> dict[str, Any]:
    """The parsed quantization.json of a packed directory (for `inspect`)."""
    return _read_manifest(Path(directory))


def safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """name -> {"dtype", "shape", "nbytes"} from a safetensors header, reading no tensor data."""
    _check_safetensors_header(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {
        name: {"dtype": v["dtype"], "shape": v["shape"], "nbytes": v["data_offsets"][1] - v["data_offsets"][0]}
        for name, v in header.items() if name != "__metadata__"
    }
