"""Sampling semantics (against transformers' logits processors), EOS, streaming, chat."""

import json
import shutil

import pytest
import torch

import qruntime
from qruntime.engine.sampler import Sampler, SamplingParams
from hf_sampling import hf_filtered


# 6, 9, 3 and 19 tokens survive the filters (at 3x these logits the first two kept one token)
@pytest.mark.parametrize("temperature,top_k,top_p,penalty", [(0.7, 10, 0.9, 1.3), (1.3, 0, 0.5, 1.0), (1.0, 3, 1.0, 0.8),
                                                            (2.0, 20, 0.95, 1.2)])
def test_sampling_distribution_matches_transformers(temperature, top_k, top_p, penalty):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g)
    seen = torch.tensor([1, 5, 7, 7])
    ref = hf_filtered(logits, temperature, top_k, top_p, penalty, seen).softmax(-1)
    sampler = Sampler(SamplingParams(temperature, top_k, top_p, penalty, seed=1), torch.device("cpu"))
    counts = torch.zeros(50)
    for _ in range(4000):
        counts[sampler(logits, seen)] += 1
    assert torch.all(counts[ref == 0] == 0), "sampled a token the filters remove"
    assert (counts / counts.sum() - ref).abs().max() < 0.03


def test_greedy_with_repetition_penalty_matches_transformers():
    logits = torch.tensor([1.0, 3.0, 2.9, -1.0])
    seen = torch.tensor([1])
    sampler = Sampler(SamplingParams(repetition_penalty=1.2), torch.device("cpu"))
    assert sampler(logits, seen) == 2  # 3.0 / 1.2 < 2.9


def test_seed_reproducible(tiny_model_dir):
    model = qruntime.load(tiny_model_dir("llama"))
    a = model.generate("hello", max_new_tokens=16, temperature=1.0, seed=7)
    b = model.generate("hello", max_new_tokens=16, temperature=1.0, seed=7)
    c = model.generate("hello", max_new_tokens=16, temperature=1.0, seed=8)
    assert a == b and a != c


def test_stops_on_every_eos_of_generation_config(tiny_model_dir, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama2"), path)
    model = qruntime.load(path)
    prompt = model.tokenizer.encode("hello world")
    model.eos_ids = set()
    free = list(model.generate_ids(prompt, 12))
    third = free[2]
    assert third not in free[:2]
    gc = json.loads((path / "generation_config.json").read_text())
    gc["eos_token_id"] = [2, third]  # the second of two EOS ids stops generation
    (path / "generation_config.json").write_text(json.dumps(gc))
    model = qruntime.load(path)
    assert list(model.generate_ids(prompt, 12)) == free[:3]


def test_stream_concatenates_to_full_text(tiny_model_dir):
    model = qruntime.load(tiny_model_dir("qwen2"))
    full = model.generate("The quick brown", max_new_tokens=20, temperature=0)
    parts = list(model.generate("The quick brown", max_new_tokens=20, temperature=0, stream=True))
    assert len(parts) > 1 and "".join(parts) == full


def test_generation_stats_count_and_time_what_was_generated(tiny_model_dir):
    """GenerationStats (the line `qruntime generate` prints): the prompt's tokens, every new token,
    and times in order; filled as a stream is consumed, not before."""
    model = qruntime.load(tiny_model_dir("llama"), bits=4, device="cpu")
    model.eos_ids = set()  # all 6 tokens
    stats = qruntime.GenerationStats()
    stream = model.generate("hello world, the quick", max_new_tokens=6, temperature=0, stream=True, stats=stats)
    assert stats.new_tokens == 0 and stats.start is None and stats.summary() == "no tokens generated"
    text = "".join(stream)
    assert text == model.generate("hello world, the quick", max_new_tokens=6, temperature=0)
    assert stats.prompt_tokens == len(model.encode("hello world, the quick")) and stats.new_tokens == 6
    assert stats.start <= stats.first <= stats.end
    line = stats.summary()
    assert f"prompt: {stats.prompt_tokens} tokens" in line and "generation: 6 tokens" in line and "ms/token" in line


def test_chat_messages_use_the_template(tiny_model_dir):
    model = qruntime.load(tiny_model_dir("qwen3"))
    messages = [{"role": "user", "content": "hello"}]
    ids = model.encode(messages)
    expected = model.tokenizer.encode("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert ids == expected
    assert isinstance(model.generate(messages, max_new_tokens=4), str)


def test_defaults_come_from_generation_config(tiny_model_dir, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama2"), path)
    gc = json.loads((path / "generation_config.json").read_text())
    gc.update(do_sample=True, temperature=0.6, top_p=0.9, top_k=50)
    (path / "generation_config.json").write_text(json.dumps(gc))
    model = qruntime.load(path)
    assert model.sampling_params() == SamplingParams(temperature=0.6, top_k=50, top_p=0.9)
    assert model.sampling_params(temperature=0).greedy


def test_memory_report_counts_packed_bytes(tiny_model_dir):
    fp = qruntime.load(tiny_model_dir("llama")).memory_report()
    q4 = qruntime.load(tiny_model_dir("llama"), bits=4, group_size=32).memory_report()
    assert q4["weights_by_kind"]["linear_w4"] < fp["weights_by_kind"]["linear_w16"] / 5
    assert q4["kv_cache_bytes"] == fp["kv_cache_bytes"] == 256 * q4["kv_bytes_per_token"]
    assert fp["total_bytes"] == fp["weights_bytes"] + fp["kv_cache_bytes"]
    # tied embedding kept 16-bit is shared with lm_head, not counted twice
    import tiny_models

    n_params = tiny_models.hf_model(tiny_model_dir("llama")).num_parameters()  # counts the tied matrix once
    assert fp["weights_bytes"] == 4 * n_params


TOKENIZER_TEXT = "Hello world! Grüße aus München. 你好，世界。こんにちは 🙂 12345 tabs\tand  spaces"


@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3"])
def test_tokenizer_ids_equal_hf_autotokenizer(tiny_model_dir, tmp_path, variant):
    """The tokenizer a loaded model carries gives the ids of AutoTokenizer on the original directory,
    whether loaded from that directory or from its conversion (whose tokenizer files come without
    config.json: transformers picks Qwen2Tokenizer, with its own pre-tokenizer, from model_type)."""
    from transformers import AutoTokenizer

    from conftest import run_cli

    src = tiny_model_dir(variant)
    expected = AutoTokenizer.from_pretrained(src)(TOKENIZER_TEXT)["input_ids"]
    out = tmp_path / "q4"
    proc = run_cli("convert", src, "--bits", "4", "-o", out)
    assert proc.returncode == 0, proc.stderr
    for path in (src, out):
        assert qruntime.load(str(path)).tokenizer(TOKENIZER_TEXT)["input_ids"] == expected, path
