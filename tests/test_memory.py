"""The static KV cache sized from a memory budget (qruntime.memory, Model's memory_budget): the
arithmetic against the loaded model's own byte counts, the cap, and every way a budget can be wrong."""

import pytest
import torch

import qruntime
from qruntime.errors import InvalidOptionError
from qruntime.memory import (WORKSPACE_BYTES, cache_bytes_per_token, max_context, parse_size,
                             weight_bytes_on_device)
from qruntime.runtime import read_checkpoint


def test_parse_size():
    assert parse_size("24GB") == 24 * 10**9 and parse_size("20GiB") == 20 * 2**30
    assert parse_size("512 MiB") == 512 * 2**20 and parse_size("1.5gb") == 1.5e9 and parse_size("300kB") == 300_000
    assert parse_size("123456") == parse_size("123456B") == parse_size(123456) == 123456
    for bad in ("lots", "GB", "-3GB", "0", "", "nan", "inf", 0, -5, 0.5):
        with pytest.raises(InvalidOptionError, match="expected a positive size"):
            parse_size(bad)


def test_max_context():
    assert max_context(24e9, 4.5e9, 1e9, 131072) == int((24e9 - 5.5e9) // 131072)
    assert max_context(4e9, 4.5e9, 1e9, 131072) == 0


@pytest.mark.parametrize("bits", [None, 4], ids=["fp32", "w4"])
def test_estimates_match_the_loaded_model(tiny_model_dir, bits):
    """What the budget is divided by is what the model then holds (torch backend, fp32 on a CPU)."""
    ckpt = read_checkpoint(tiny_model_dir("llama"), bits=bits, group_size=32)
    predicted = weight_bytes_on_device(ckpt, torch.float32)
    per_token = cache_bytes_per_token(ckpt.config, torch.float32, int8=False)
    report = qruntime.Model(ckpt, device="cpu", backend="torch").memory_report()
    assert predicted == report["weights_bytes"]
    rope_row = 2 * (ckpt.config.head_dim // 2) * 4  # the RoPE tables' fp32 cos and sin of a position
    assert per_token - rope_row == report["kv_bytes_per_token"]
    cfg = ckpt.config
    int8 = cache_bytes_per_token(cfg, torch.float16, int8=True) - rope_row
    assert int8 == cfg.num_layers * cfg.num_kv_heads * (2 * cfg.head_dim + 2 * 4)  # codes + an fp32 scale each


def test_padded_heads_are_counted_padded(tiny_model_dir):
    """A head_dim that is not a power of two takes the triton runner's padded heads' bytes (K, V and
    the RoPE row), as its cache holds them."""
    import dataclasses

    cfg = read_checkpoint(tiny_model_dir("llama"), bits=4, group_size=32).config
    odd = dataclasses.replace(cfg, head_dim=12)
    padded = dataclasses.replace(cfg, head_dim=16)
    for int8 in (False, True):
        assert cache_bytes_per_token(odd, torch.float16, int8) == cache_bytes_per_token(padded, torch.float16, int8)


def test_cache_sized_from_the_budget(tiny_model_dir):
    ckpt = read_checkpoint(tiny_model_dir("llama"), bits=4, group_size=32)
    weights = weight_bytes_on_device(ckpt, torch.float32)
    per_token = cache_bytes_per_token(ckpt.config, torch.float32, int8=False)
    budget = weights + WORKSPACE_BYTES + 100 * per_token + per_token - 1  # room for 100 positions, not 101
    model = qruntime.Model(ckpt, device="cpu", backend="torch", memory_budget=budget)
    assert model.max_seq_len == model.budget_max_seq_len == 100
    report = model.memory_report()
    assert report["memory_budget"] == budget and report["budget_max_seq_len"] == 100
    assert report["total_bytes"] + 100 * (per_token - report["kv_bytes_per_token"]) + WORKSPACE_BYTES <= budget
    # a shorter cache asked for within the budget is kept; a longer one is refused, naming what fits
    assert qruntime.Model(ckpt, device="cpu", backend="torch", memory_budget=budget, max_seq_len=60).max_seq_len == 60
    with pytest.raises(InvalidOptionError, match="max_seq_len=101 does not fit .* at most 100 positions"):
        qruntime.Model(ckpt, device="cpu", backend="torch", memory_budget=budget, max_seq_len=101)
    # more room than the model has positions: capped at max_position_embeddings
    big = qruntime.Model(ckpt, device="cpu", backend="torch", memory_budget="4GiB")
    assert big.max_seq_len == ckpt.config.max_position_embeddings < big.budget_max_seq_len
    # no budget: the default length, and nothing reported as a budget
    plain = qruntime.Model(ckpt, device="cpu", backend="torch")
    assert plain.max_seq_len == min(ckpt.config.max_position_embeddings, 4096)
    assert plain.memory_report()["memory_budget"] is None and plain.budget_max_seq_len is None


def test_budget_errors(tiny_model_dir):
    ckpt = read_checkpoint(tiny_model_dir("llama"), bits=4, group_size=32)
    with pytest.raises(InvalidOptionError, match="leaves no room for a KV cache: the weights take"):
        qruntime.Model(ckpt, device="cpu", backend="torch", memory_budget="1GiB")  # all of it the workspace
    with pytest.raises(InvalidOptionError, match="expected a positive size"):
        qruntime.Model(ckpt, device="cpu", backend="torch", memory_budget="big")
    with pytest.raises(InvalidOptionError, match="must be positive"):
        qruntime.Model(ckpt, device="cpu", backend="torch", max_seq_len=0)


def test_load_passes_the_budget(tiny_model_dir):
    weights = qruntime.load(tiny_model_dir("qwen2"), bits=8).memory_report()["weights_bytes"]
    per_token = cache_bytes_per_token(qruntime.load(tiny_model_dir("qwen2")).config, torch.float32, int8=False)
    budget = f"{weights + WORKSPACE_BYTES + 150 * per_token}B"
    assert qruntime.load(tiny_model_dir("qwen2"), bits=8, memory_budget=budget).max_seq_len == 150
