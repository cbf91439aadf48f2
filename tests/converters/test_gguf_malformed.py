"""Hostile GGUF files: a hand-made corpus covering llama.cpp's `tests/test-gguf.cpp` cases (and a
few more), each raising its typed error, plus a bounded fuzz run (hypothesis) over mutated real
files asserting that nothing but QRuntimeError subclasses ever escapes.
"""

from __future__ import annotations

import struct
import time

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from qruntime.converters.gguf import convert, read_checkpoint
from qruntime.converters.gguf.reader import parse_gguf, read_gguf
from qruntime.errors import (
    CorruptFileError, MissingTensorError, QRuntimeError, ShapeMismatchError, UnsupportedArchitectureError,
    UnsupportedFormatError,
)

U32, I32, STR, ARR, U64 = 4, 5, 8, 9, 10  # GGUF value types
F32, I8, Q4_0 = 0, 24, 2                   # ggml types


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv_str(key: str, value: str) -> bytes:
    return s(key) + struct.pack("<I", STR) + s(value)


def kv_u32(key: str, value: int, vtype: int = U32) -> bytes:
    return s(key) + struct.pack("<I", vtype) + struct.pack("<i" if vtype == I32 else "<I", value)


def tinfo(name: str | bytes, ne: list[int], ttype: int, offset: int, n_dims: int | None = None) -> bytes:
    dims = struct.pack("<I", len(ne) if n_dims is None else n_dims) + b"".join(struct.pack("<q", d) for d in ne)
    return s(name) + dims + struct.pack("<i", ttype) + struct.pack("<Q", offset)


def image(kvs=(kv_str("general.architecture", "llama"),), tensors=(tinfo("t", [8], F32, 0),), data=b"\0" * 32,
          magic=b"GGUF", version=3, n_tensors=None, n_kv=None, alignment=32) -> bytes:
    """A GGUF image: header, metadata, tensor infos, padding to `alignment`, data."""
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * (-len(body) % alignment) + data


CORPUS = {
    # header (test-gguf.cpp HANDCRAFTED_HEADER_*)
    "bad-magic": (image(magic=b"FUGG"), CorruptFileError),
    "version-0": (image(version=0), UnsupportedFormatError),
    "version-1": (image(version=1), UnsupportedFormatError),
    "version-future": (image(version=4), UnsupportedFormatError),
    "huge-n-tensors": (image(n_tensors=2**64 - 1), CorruptFileError),
    "huge-n-kv": (image(n_kv=2**64 - 1), CorruptFileError),
    "n-kv-one-too-many": (image(n_kv=2), CorruptFileError),
    "empty": (b"", CorruptFileError),
    "header-only-truncated": (b"GGUF\x03\0\0\0\x01", CorruptFileError),
    # key/values (HANDCRAFTED_KV_*)
    "key-size-huge": (image(kvs=[struct.pack("<Q", 2**64 - 1) + b"general.architecture"]), CorruptFileError),
    "key-empty": (image(kvs=[kv_str("", "x")]), CorruptFileError),
    "key-not-utf8": (image(kvs=[s(b"\xff\xfe") + struct.pack("<I", U32) + b"\0" * 4]), CorruptFileError),
    "value-type-unknown": (image(kvs=[s("k") + struct.pack("<I", 13) + b"\0" * 8]), CorruptFileError),
    "value-string-huge": (image(kvs=[s("k") + struct.pack("<IQ", STR, 2**63)]), CorruptFileError),
    "array-count-huge": (image(kvs=[s("k") + struct.pack("<IIQ", ARR, U32, 2**62)]), CorruptFileError),
    "array-of-strings-huge": (image(kvs=[s("k") + struct.pack("<IIQ", ARR, STR, 2**40)]), CorruptFileError),
    "array-nested": (image(kvs=[s("k") + struct.pack("<IIQ", ARR, ARR, 1)]), CorruptFileError),
    "duplicate-key": (image(kvs=[kv_str("a", "x"), kv_str("a", "y")]), CorruptFileError),
    "alignment-not-pow2": (image(kvs=[kv_u32("general.alignment", 13)]), CorruptFileError),
    "alignment-zero": (image(kvs=[kv_u32("general.alignment", 0)]), CorruptFileError),
    "alignment-wrong-type": (image(kvs=[kv_u32("general.alignment", 32, I32)]), CorruptFileError),
    # tensor infos (HANDCRAFTED_TENSORS_*)
    "tensor-name-too-long": (image(tensors=[tinfo("t" * 64, [8], F32, 0)]), CorruptFileError),
    "tensor-name-empty": (image(tensors=[tinfo("", [8], F32, 0)]), CorruptFileError),
    "n-dims-5": (image(tensors=[tinfo("t", [8, 1, 1, 1, 1], F32, 0)]), CorruptFileError),
    "n-dims-0": (image(tensors=[tinfo("t", [], F32, 0)]), CorruptFileError),
    "ne-negative": (image(tensors=[tinfo("t", [-1], F32, 0)]), CorruptFileError),
    "ne-too-big": (image(tensors=[tinfo("t", [4 * 2**31, 4 * 2**31], F32, 0)]), CorruptFileError),
    "nbytes-too-big": (image(tensors=[tinfo("t", [2**40, 2**21], 27, 0)]), CorruptFileError),
    "nbytes-pad-wrap": (image(tensors=[tinfo("t", [4, 2**30 - 1, 2**30 + 1], F32, 0)]), CorruptFileError),
    "ne0-not-block-multiple": (image(tensors=[tinfo("t", [33], Q4_0, 0)]), CorruptFileError),
    "type-unknown": (image(tensors=[tinfo("t", [8], 99, 0)]), UnsupportedFormatError),
    "type-removed-q4_2": (image(tensors=[tinfo("t", [8], 4, 0)]), UnsupportedFormatError),
    "offset-huge": (image(tensors=[tinfo("t", [8], F32, 2**64 - 32)]), CorruptFileError),
    "offset-unaligned": (image(tensors=[tinfo("t", [8], F32, 1)]), CorruptFileError),
    "duplicate-tensor": (image(tensors=[tinfo("t", [8], F32, 0), tinfo("t", [8], F32, 32)], data=b"\0" * 64),
                         CorruptFileError),
    "tensors-overlap": (image(tensors=[tinfo("a", [16], F32, 0), tinfo("b", [8], F32, 32)], data=b"\0" * 64),
                        CorruptFileError),
    # data (HANDCRAFTED_DATA_*)
    "data-truncated": (image(data=b"\0" * 31), CorruptFileError),
    "data-missing": (image(data=b""), CorruptFileError),
    "mem-size-overflow": (image(tensors=[tinfo("a", [0x7FFFFFFFFFFFFFC0], I8, 0),
                                         tinfo("b", [0x7FFFFFFFFFFFFFC0], I8, 0x7FFFFFFFFFFFFFC0)]), CorruptFileError),
}


@pytest.mark.parametrize("case", list(CORPUS))
def test_malformed_header_raises_typed_error(case):
    data, error = CORPUS[case]
    with pytest.raises(error):
        parse_gguf(np.frombuffer(data, dtype=np.uint8), case)


def test_valid_minimal_image_parses():
    """The corpus' base image is valid, so each case fails for its own defect; zero-size dims are
    legal GGUF (llama.cpp accepts them) and only fail later against the model's shapes."""
    f = parse_gguf(np.frombuffer(image(), dtype=np.uint8), "base")
    assert f.tensors["t"].shape == (8,) and f.metadata["general.architecture"] == "llama"
    f = parse_gguf(np.frombuffer(image(tensors=[tinfo("t", [8, 0], F32, 0)]), dtype=np.uint8), "zero-dim")
    assert f.tensors["t"].nbytes == 0


@pytest.mark.parametrize("size", [0, 3, 23])
def test_tiny_files_on_disk(tmp_path, size):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGUF\x03\0\0\0"[:size] + b"\0" * max(0, size - 8))
    with pytest.raises(CorruptFileError):
        read_gguf(p)


# --------------------------------------------------------------- model-level defects (valid GGUF)

def _rewrite(src, out, drop=(), kv=None, retype=None, add=None):
    """Copy of a GGUF with tensors dropped, replaced ({name: array}) or added, and metadata replaced
    ({key: (value, GGUFValueType)}); the writer keeps the last value of a key."""
    reader = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(out), reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if not name.startswith("GGUF.") and name != "general.alignment":
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    for name, (value, vtype, *sub) in (kv or {}).items():
        w.add_key_value(name, value, vtype, sub_type=sub[0] if sub else None)
    for t in reader.tensors:
        if t.name in drop:
            continue
        if retype and t.name in retype:
            w.add_tensor(t.name, retype[t.name])
        else:
            w.add_tensor(t.name, np.array(t.data), raw_shape=tuple(t.data.shape), raw_dtype=t.tensor_type)
    for name, array in (add or {}).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


V = gguf.GGUFValueType
MODEL_CASES = {
    "missing-tensor": (dict(drop=["blk.1.ffn_up.weight"]), MissingTensorError),
    "unknown-tensor": (dict(add={"blk.0.ffn_extra.weight": np.ones(256, np.float32)}), UnsupportedArchitectureError),
    "unknown-architecture": (dict(kv={"general.architecture": ("gpt2", V.STRING)}), UnsupportedArchitectureError),
    "head-count-zero": (dict(kv={"llama.attention.head_count": (0, V.UINT32)}), CorruptFileError),
    "head-count-not-multiple": (dict(kv={"llama.attention.head_count_kv": (3, V.UINT32)}), CorruptFileError),
    "block-count-huge": (dict(kv={"llama.block_count": (2**31, V.UINT32)}), CorruptFileError),
    "block-count-wrong-type": (dict(kv={"llama.block_count": ("2", V.STRING)}), CorruptFileError),
    "hidden-size-mismatch": (dict(kv={"llama.embedding_length": (128, V.UINT32)}), ShapeMismatchError),
    "eps-negative": (dict(kv={"llama.attention.layer_norm_rms_epsilon": (-1.0, V.FLOAT32)}), CorruptFileError),
    "rope-yarn": (dict(kv={"llama.rope.scaling.type": ("yarn", V.STRING)}), UnsupportedArchitectureError),
    "eos-id-out-of-range": (dict(kv={"tokenizer.ggml.eos_token_id": (10**6, V.UINT32)}), CorruptFileError),
    "token-types-not-numbers": (dict(kv={"tokenizer.ggml.token_type": (["x"] * 384, V.ARRAY, V.STRING)}),
                                CorruptFileError),
    "merges-not-strings": (dict(kv={"tokenizer.ggml.merges": ([1, 2], V.ARRAY, V.UINT32)}), CorruptFileError),
    "wrong-shape": (dict(retype={"blk.0.attn_norm.weight": np.ones(255, np.float32)}), ShapeMismatchError),
    "rope-freqs-wrong-size": (dict(retype={"rope_freqs.weight": np.ones(31, np.float32)}), ShapeMismatchError),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_model_level_defects(gguf_zoo, tmp_path, case):
    options, error = MODEL_CASES[case]
    path = _rewrite(gguf_zoo.file("llama", "Q8_0"), tmp_path / f"{case}.gguf", **options)
    with pytest.raises(error):
        convert(path, progress=False)


def test_rewrite_without_changes_converts(gguf_zoo, tmp_path):
    """The copy machinery above is sound, so each model-level case fails for its own defect."""
    convert(_rewrite(gguf_zoo.file("llama", "Q8_0"), tmp_path / "copy.gguf"), progress=False)


# --------------------------------------------------------------------------------- fuzzing

FUZZ_EXAMPLES = 5000      # mutated files in total, split over the base files below
FUZZ_SECONDS = 100        # each test stops early past this share of the budget
_INTERESTING = [0, 1, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1, 2**32, 64, 13]


def _mutate(base: bytes, data_start: int, draw) -> bytes:
    buf = bytearray(base)
    for _ in range(draw(st.integers(1, 6))):
        # mostly the header (where parsers break), sometimes anywhere (the block decoders)
        end = data_start if draw(st.integers(0, 3)) else len(buf)
        pos = draw(st.integers(0, max(end - 1, 0)))
        if draw(st.booleans()):
            buf[pos] = draw(st.integers(0, 255))
        else:
            word = struct.pack("<Q", draw(st.sampled_from(_INTERESTING)))[: draw(st.sampled_from([4, 8]))]
            buf[pos:pos + len(word)] = word
    if draw(st.integers(0, 9)) == 0:
        del buf[draw(st.integers(0, len(buf))):]
    return bytes(buf)


def _fuzz(base: bytes, examples: int):
    data_start = parse_gguf(np.frombuffer(base, np.uint8), "base").data_start
    deadline = time.monotonic() + FUZZ_SECONDS / 2
    outcomes = {"ok": 0, "typed error": 0}

    @seed(12345)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data):
        if time.monotonic() > deadline:
            return
        mutated = _mutate(base, data_start, data.draw)
        try:
            read_checkpoint(parse_gguf(np.frombuffer(mutated, np.uint8), "fuzz"))
            outcomes["ok"] += 1
        except QRuntimeError:
            outcomes["typed error"] += 1
        # anything else propagates and fails the test with the mutated file's bytes shown

    run()
    return outcomes


@pytest.mark.parametrize("model,ftype", [("llama", "Q4_K_M"), ("qwen2", "Q5_K_M")])
def test_fuzz_mutated_files_raise_only_typed_errors(gguf_zoo, model, ftype):
    """Runs the whole reader + weight conversion (all but the tokenizer) in-process on mutated
    copies of real llama.cpp files: zero untyped exceptions and zero crashes."""
    outcomes = _fuzz(gguf_zoo.file(model, ftype).read_bytes(), FUZZ_EXAMPLES // 2)
    print(f"\nfuzz {model}-{ftype}: {outcomes}")
    assert outcomes["typed error"] > 0 and sum(outcomes.values()) > FUZZ_EXAMPLES // 20
