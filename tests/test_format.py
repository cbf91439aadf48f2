"""The packed format on disk: bit-exact round trip, checksums, versions, damage detection."""

import json

import pytest
import torch

import qruntime
from qruntime import format as packed_format
from qruntime.errors import ChecksumMismatchError, CorruptFileError, UnsupportedFormatError
from qruntime.runtime import read_checkpoint


@pytest.fixture
def packed(tiny_model_dir, tmp_path):
    ckpt = read_checkpoint(tiny_model_dir("qwen2"), bits=4, group_size=32)
    out = tmp_path / "packed"
    with packed_format.atomic_output_dir(out) as tmp:
        packed_format.save(ckpt, tmp, max_shard_bytes=40_000)  # several shards
    return ckpt, out


def test_roundtrip_is_bit_exact(packed):
    ckpt, out = packed
    assert len(list(out.glob("model-*.safetensors"))) > 1
    back = packed_format.load(out)
    assert back.config == ckpt.config
    assert back.linears.keys() == ckpt.linears.keys()
    for name, lin in ckpt.linears.items():
        other = back.linears[name]
        assert (other.bits, other.group_size, other.zero_mode) == (lin.bits, lin.group_size, lin.zero_mode)
        for suffix, t in lin.tensors().items():
            u = other.tensors()[suffix]
            assert u.dtype == t.dtype and torch.equal(u, t), f"{name}.{suffix}"
    for name, t in ckpt.dense.items():
        assert back.dense[name].dtype == t.dtype and torch.equal(back.dense[name], t), name
    assert back.tokenizer_files == ckpt.tokenizer_files
    assert back.generation_config == ckpt.generation_config


def test_roundtrip_keeps_logits(packed):
    ckpt, out = packed
    ids = list(range(5, 37))
    a = qruntime.Model(ckpt, device="cpu").logits(ids)
    b = qruntime.load(out, device="cpu").logits(ids)
    assert torch.equal(a, b)


def test_roundtrip_16_bit_and_act_order(tiny_model_dir, tmp_path):
    ckpt = read_checkpoint(tiny_model_dir("llama"))
    lin = ckpt.linears["model.layers.0.mlp.up_proj"]
    from qruntime.quantizers.rtn import quantize_rtn

    perm = torch.randperm(lin.in_features, generator=torch.Generator().manual_seed(0)).to(torch.int32)
    q = quantize_rtn(lin.qweight[:, perm.long()], 4, 32)
    q.perm = perm
    ckpt.linears["model.layers.0.mlp.up_proj"] = q
    with packed_format.atomic_output_dir(tmp_path / "p") as tmp:
        packed_format.save(ckpt, tmp)
    back = packed_format.load(tmp_path / "p")
    assert torch.equal(back.linears["model.layers.0.mlp.up_proj"].perm, perm)
    assert back.linears["model.layers.0.self_attn.q_proj"].bits == 16
    assert json.loads((tmp_path / "p" / "quantization.json").read_text())["linears"]["model.layers.0.mlp.up_proj"]["act_order"]


def test_sha256_mismatch_detected(packed):
    _, out = packed
    shard = sorted(out.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in tensor data: the file still parses
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=shard.name):
        packed_format.load(out)
    packed_format.load(out, verify=False)  # explicit opt-out reads it


def test_truncated_shard_detected(packed):
    _, out = packed
    shard = sorted(out.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CorruptFileError, match=shard.name):
        packed_format.load(out, verify=False)


def test_missing_shard_detected(packed):
    _, out = packed
    sorted(out.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(CorruptFileError, match="missing"):
        packed_format.load(out)


def test_unknown_version_refused(packed):
    _, out = packed
    manifest = json.loads((out / "quantization.json").read_text())
    manifest["format_version"] = 99
    (out / "quantization.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsupportedFormatError, match="format_version 99"):
        packed_format.load(out)


def test_failed_save_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with packed_format.atomic_output_dir(out) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
