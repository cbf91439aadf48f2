"""qruntime eval: perplexity (llama.cpp protocol) and KL divergence against straightforward
reference computations on the HF model."""

import json
import math

import pytest
import torch

import qruntime
import tiny_models
from qruntime.errors import InvalidOptionError
from qruntime.evaluate import kl_divergence, perplexity
from conftest import assert_clean_cli_error, run_cli

TEXT = ("The quick brown fox jumps over the lazy dog. hello world, this is a tiny tokenizer for tests. "
        "quantized inference runtimes read int4 weights. Grüße aus München! ") * 12
CTX = 32


def reference_chunks(tokenizer, ctx):
    ids = tokenizer.encode(TEXT, add_special_tokens=True)
    chunks = [ids[c * ctx:(c + 1) * ctx] for c in range(len(ids) // ctx)]
    bos = tokenizer.bos_token_id if ids and ids[0] == tokenizer.bos_token_id else None  # llama.cpp: only if add_bos
    return [[bos] + ch[1:] if bos is not None else ch for ch in chunks]


def reference_logprobs(hf, chunk):
    with torch.no_grad():
        logits = hf(torch.tensor([chunk])).logits[0].float()
    first = len(chunk) // 2  # llama.cpp: score positions n_ctx/2 .. n_ctx-2, predicting the next token
    return torch.log_softmax(logits[first:-1], -1), torch.tensor(chunk[first + 1:])


def test_perplexity_equals_reference(tiny_model_dir):
    path = tiny_model_dir("llama2")
    model = qruntime.load(path)
    hf = tiny_models.hf_model(path)
    nll = []
    for chunk in reference_chunks(model.tokenizer, CTX):
        logp, target = reference_logprobs(hf, chunk)
        nll += (-logp.gather(1, target[:, None])[:, 0]).tolist()
    ref = math.exp(sum(nll) / len(nll))
    out = perplexity(model, TEXT, ctx=CTX, progress=False)
    assert out["ppl"] == pytest.approx(ref, rel=1e-4)
    assert out["tokens_scored"] == len(nll) and out["chunks"] > 1


def test_kl_self_is_zero_and_int4_matches_reference(tiny_model_dir):
    path = tiny_model_dir("qwen2")
    base = qruntime.load(path)
    same = kl_divergence(base, base, TEXT, ctx=CTX, progress=False)
    assert same["kl_mean"] == pytest.approx(0.0, abs=1e-7) and same["top1_agreement"] == 1.0

    q4 = qruntime.load(path, bits=4, group_size=32)
    out = kl_divergence(q4, base, TEXT, ctx=CTX, progress=False)
    kls = []
    for chunk in reference_chunks(base.tokenizer, CTX):
        p = torch.log_softmax(q4.logits(chunk)[CTX // 2:-1], -1)
        q = torch.log_softmax(base.logits(chunk)[CTX // 2:-1], -1)
        kls += (q.exp() * (q - p)).sum(-1).tolist()
    assert out["kl_mean"] > 1e-4
    assert out["kl_mean"] == pytest.approx(sum(kls) / len(kls), rel=1e-4)
    assert 0 < out["top1_agreement"] <= 1 and out["ppl"] > 0 and out["ppl_base"] > 0


def test_short_text_is_a_clear_error(tiny_model_dir):
    with pytest.raises(InvalidOptionError, match="needs at least 512"):
        perplexity(qruntime.load(tiny_model_dir("llama2")), "too short", ctx=512, progress=False)


def test_eval_cli_end_to_end(tiny_model_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / "eval.json"
    proc = run_cli("eval", tiny_model_dir("llama2"), "--text", text, "--ctx", CTX, "--bits", "4",
                   "--kl-base", tiny_model_dir("llama2"), "--json", out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["kl_mean"] > 0 and result["chunks"] > 1
    assert "ppl" in proc.stdout
    assert_clean_cli_error(run_cli("eval", tiny_model_dir("llama2"), "--text", tmp_path / "none.txt"), "no such text file")


def test_bench_compare_with_text(tiny_model_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    fp, q4 = tmp_path / "fp", tmp_path / "q4"
    assert run_cli("convert", tiny_model_dir("llama2"), "-o", fp, "-q").returncode == 0
    assert run_cli("convert", tiny_model_dir("llama2"), "-o", q4, "--bits", "4", "--group-size", "32", "-q").returncode == 0
    out = tmp_path / "cmp.json"
    proc = run_cli("bench", "--compare", fp, q4, "--text", text, "--eval-ctx", CTX, "--context", "0:32:16",
                   "--prompt", "8", "--repeat", "2", "--json", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert [r["weights"] for r in report["results"]] == ["as-stored", "as-stored"]
    assert report["results"][1]["bpw"] < report["results"][0]["bpw"]
    assert report["quality"][0]["ppl"] > 0 and report["quality"][1]["kl_mean"] > 0
    assert "| perplexity |" in proc.stdout.replace("| model | perplexity |", "| perplexity |")
