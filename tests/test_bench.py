"""qruntime bench: theory figures (THEORY.md's worked numbers), the fit, and the command end to end
on CPU (numbers meaningless there, code path real)."""

import json
import stat
import struct

import numpy as np
import pytest

from qruntime.bench.fit import fit_latency
from qruntime.bench.measure import parse_context_range
from qruntime.bench.run import BenchOptions, hf_config, llama_cpp_peer
from qruntime.bench.theory import DecodeTheory, bits_per_weight, kv_bytes_per_token, linear_params
from qruntime.config import ModelConfig
from qruntime.errors import InvalidOptionError
from qruntime.runtime import read_checkpoint
from qruntime.synthetic import synthetic_config
from conftest import assert_clean_cli_error, run_cli

SEED_BW = 1008 * 2**30  # THEORY.md: the seed reads "1008 GB/s" as 1008 * 2^30 bytes/s


def qwen15(hidden, layers, inter, heads, kv_heads=None, vocab=151936):
    return ModelConfig(family="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv_heads or heads, head_dim=hidden // heads, rms_norm_eps=1e-6,
                       rope_theta=1e6, max_position_embeddings=32768, qkv_bias=True)


@pytest.mark.parametrize("name,cfg,b_ms,w", [
    ("0.5B", qwen15(1024, 24, 2816, 16), 0.86, 11010),
    ("7B", qwen15(4096, 32, 11008, 32), 13.12, 2064),
    ("14B", qwen15(5120, 40, 13696, 40, vocab=152064), 24.74, 1321),
    ("32B-gqa5", qwen15(5120, 64, 27392, 40, kv_heads=8, vocab=152064), 58.64, 4129),
])
def test_theory_reproduces_the_seed_table(name, cfg, b_ms, w):
    """THEORY.md's 4090 table (w16kv16): B from linears + lm_head at 2 bytes, W from the KV bytes."""
    t = DecodeTheory(2 * linear_params(cfg), kv_bytes_per_token(cfg, "kv16"), SEED_BW)
    assert t.b_ms == pytest.approx(b_ms, abs=0.01)
    assert t.w_tokens_per_ms == pytest.approx(w, abs=1)


def test_theory_llama31_8b_by_hand():
    cfg = ModelConfig(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                      num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=5e5,
                      max_position_embeddings=131072)
    per_layer = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096
    params = 32 * per_layer + 128256 * 4096
    assert linear_params(cfg) == params  # 7.50e9: 6.98e9 in the layers + 0.53e9 lm_head
    t = DecodeTheory(2 * params, kv_bytes_per_token(cfg, "kv16"), SEED_BW)
    assert t.b_ms == pytest.approx(2 * params / (SEED_BW / 1000))  # 13.87 ms on the 4090
    assert t.w_tokens_per_ms == pytest.approx(SEED_BW / 1000 / (32 * 2 * 8 * 128 * 2))  # 8257: GQA x4
    # int8 KV: one byte per element plus an fp32 scale per token, head and K/V
    assert kv_bytes_per_token(cfg, "kv8") == 32 * (2 * 8 * 128 + 2 * 8 * 4)


def test_honest_bpw_counts_scales_and_zeros(tiny_model_dir):
    ckpt = read_checkpoint(tiny_model_dir("llama2"), bits=4, group_size=32)  # asymmetric, lm_head at 8 bits
    cfg = ckpt.config
    head = cfg.vocab_size * cfg.hidden_size
    body = linear_params(cfg) - head
    expected = (body * (4 + 16 / 32 + 8 / 32) + head * (8 + 16 / 32 + 8 / 32)) / linear_params(cfg)
    assert bits_per_weight(ckpt) == pytest.approx(expected)


def test_fit_recovers_b_and_w():
    rng = np.random.default_rng(0)
    n = np.arange(1, 8193, 512)
    b, w = 6.5, 2000.0
    lat = (n - 1) / w + b + rng.normal(0, 0.01, n.size)
    fit = fit_latency(n, lat)
    assert fit.b_ms == pytest.approx(b, rel=0.01)
    assert fit.w_tokens_per_ms == pytest.approx(w, rel=0.02)
    assert fit.r2 > 0.99
    with pytest.raises(ValueError):
        fit_latency([5, 5], [1.0, 1.1])


def test_context_ranges():
    assert parse_context_range("0:2048:512") == [1, 512, 1024, 1536, 2048]
    with pytest.raises(ValueError):
        parse_context_range("10:5:1")


def test_bench_end_to_end_on_cpu(tiny_model_dir, tmp_path):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = run_cli("bench", tiny_model_dir("llama2"), "--weights", "w16,w4", "--context", "0:48:16", "--prompt", "8",
                   "--repeat", "2", "--json", out_json, "--plot", out_png, "--peer", "hf")
    assert proc.returncode == 0, proc.stderr
    assert "| config |" in proc.stdout and "w4 kv16" in proc.stdout
    report = json.loads(out_json.read_text())
    assert [r["weights"] for r in report["results"]] == ["w16", "w4"]
    for r in report["results"]:
        assert r["contexts"] == [1, 16, 32, 48] and len(r["latency_ms"]) == 4
        assert r["fit"] is not None and r["ttft_ms"]["mean"] > 0
        assert r["theory_measured_bw"]["B_ms"] > 0
    assert report["results"][1]["bpw"] < report["results"][0]["bpw"] / 4
    assert report["peers"][0]["peer"] == "hf" and report["peers"][0]["ms_per_token"] > 0
    data = out_png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 500 and height > 300


@pytest.mark.parametrize("spec, arch, bias", [("synthetic:qwen2.5-7b", "Qwen2ForCausalLM", True),
                                              ("synthetic:llama3.1-8b", "LlamaForCausalLM", False),
                                              ("synthetic:qwen3-4b", "Qwen3ForCausalLM", False),
                                              ("synthetic:llama2-7b", "LlamaForCausalLM", False)])
def test_hf_peer_has_the_spec_shapes(spec, arch, bias):
    """The HF peer of a synthetic spec: its family's model (Qwen2's q|k|v bias included; Qwen3's with
    its q/k norms), with the spec's heads and head size (built at a reduced width and depth to stay
    cheap)."""
    import dataclasses

    import transformers

    cfg = dataclasses.replace(synthetic_config(spec), vocab_size=64, hidden_size=256, intermediate_size=96,
                              num_layers=1)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(cfg))
    attn = model.model.layers[0].self_attn
    assert type(model).__name__ == arch
    assert (attn.q_proj.bias is not None) == bias
    assert attn.q_proj.out_features == cfg.num_heads * cfg.head_dim
    assert attn.k_proj.out_features == cfg.num_kv_heads * cfg.head_dim
    assert model.model.layers[0].mlp.down_proj.in_features == 96
    assert hasattr(attn, "q_norm") == cfg.qk_norm


def test_hf_generate_timing_takes_medians(monkeypatch):
    """The HF peer's ms/token: median of the full runs less median of the one-token runs, over the
    other tokens (a clock advanced only by a stub model's generate; one full run is an outlier that
    a minimum would pick)."""
    import torch

    from qruntime.bench import measure

    clock = [0.0]
    full_costs = iter([9.0, 0.9, 2.6, 2.5])  # seconds: the full warm-up run, then the three timed ones

    class Stub:
        def generate(self, ids, max_new_tokens, min_new_tokens, **kw):
            assert max_new_tokens == min_new_tokens and kw["do_sample"] is False
            clock[0] += 0.5 if max_new_tokens == 1 else next(full_costs)

    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock[0])
    ms = measure.generate_ms_per_token(Stub(), torch.zeros((1, 4), dtype=torch.long), new_tokens=11, repeats=3)
    assert ms == pytest.approx((2.5 - 0.5) / 10 * 1e3)  # the median 2.5 of 0.9, 2.6, 2.5; not the minimum 0.9


def test_plot_has_measured_fit_and_theory_series(tmp_path):
    from qruntime.bench.report import plot

    result = {"name": "m w4 kv16", "contexts": [1, 512, 1024], "latency_ms": [{"mean": 1.0, "std": 0.1}] * 3,
              "fit": {"B_ms": 1.0, "W_tokens_per_ms": 1000.0, "r2": 1.0},
              "theory_measured_bw": {"B_ms": 0.8, "W_tokens_per_ms": 1200.0}}
    labels = plot({"results": [result, {**result, "name": "m w8 kv16"}], "environment": {"device": "cpu"}}, tmp_path / "p.png")
    assert labels == ["m w4 kv16 measured", "m w4 kv16 fit", "m w4 kv16 theory",
                      "m w8 kv16 measured", "m w8 kv16 fit", "m w8 kv16 theory"]


def test_bench_errors(tiny_model_dir, tmp_path):
    assert_clean_cli_error(run_cli("bench", "synthetic:gpt5"), "unknown synthetic model")
    assert_clean_cli_error(run_cli("bench", tiny_model_dir("llama2"), "--kv", "kv4"), "--kv kv4")
    assert_clean_cli_error(run_cli("bench", tiny_model_dir("llama2"), "--context", "9:1:1"), "--context")
    assert_clean_cli_error(run_cli("bench", tiny_model_dir("llama2"), "--kv", "kv8", "--context", "0:16:8",
                                   "--prompt", "0"), "kv8 needs")


def test_llama_cpp_peer_parses_llama_bench_json(tmp_path):
    fake = tmp_path / "llama-bench"
    fake.write_text("#!/bin/sh\necho '[{\"n_prompt\": 512, \"n_gen\": 0, \"avg_ts\": 5000.0},"
                    " {\"n_prompt\": 0, \"n_gen\": 128, \"avg_ts\": 200.0}]'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    opts = BenchOptions(weights=None, kvs=["kv16"], contexts=[1], prompt=512, repeat=2, memory_budget=None,
                        device=__import__("torch").device("cpu"), dtype=None)
    out = llama_cpp_peer(str(fake), str(gguf), opts)
    assert out["generate_tokens_per_s"] == 200.0 and out["ms_per_token"] == pytest.approx(5.0)
    assert out["prompt_tokens_per_s"] == 5000.0
    with pytest.raises(InvalidOptionError, match="gguf"):
        llama_cpp_peer(str(fake), str(tmp_path / "dir"), opts)


def test_bench_sizes_the_cache_from_its_budget(tiny_model_dir):
    """--memory-budget: the bench's model takes the engine's own sizing (qruntime.memory), and the
    report gives the context the budget has room for beside the one allocated (capped by the model)."""
    import torch

    from qruntime.bench.run import _build_model
    from qruntime.memory import WORKSPACE_BYTES, cache_bytes_per_token, weight_bytes_on_device

    ckpt = read_checkpoint(tiny_model_dir("llama"), bits=4, group_size=32)
    room = weight_bytes_on_device(ckpt, torch.float32) + WORKSPACE_BYTES
    per_token = cache_bytes_per_token(ckpt.config, torch.float32, int8=False)
    for positions, allocated in ((100, 100), (10_000, ckpt.config.max_position_embeddings)):
        opts = BenchOptions(weights=None, kvs=["kv16"], contexts=[1], prompt=8, repeat=1,
                            memory_budget=room + positions * per_token, device=torch.device("cpu"), dtype=None)
        model, info = _build_model(ckpt, "kv16", opts, wanted_len=64)
        assert (info["predicted_max_context"], info["allocated_max_context"], model.max_seq_len) == (positions, allocated, allocated)
    opts = BenchOptions(weights=None, kvs=["kv16"], contexts=[1], prompt=8, repeat=1, memory_budget=None,
                        device=torch.device("cpu"), dtype=None)
    model, info = _build_model(ckpt, "kv16", opts, wanted_len=64)
    assert model.max_seq_len == 64 and "predicted_max_context" not in info
