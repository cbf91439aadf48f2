"""The CLI from a shell: convert, generate, inspect."""

import json

from conftest import run_cli


def test_convert_then_generate_from_shell(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("convert", tiny_model_dir("llama"), "-o", out, "--bits", "4")
    assert proc.returncode == 0, proc.stderr
    assert "linears" in proc.stderr  # the progress bar
    assert (out / "quantization.json").is_file() and (out / "tokenizer").is_dir()
    proc = run_cli("generate", out, "-p", "hello", "-n", "8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()  # streamed text
    assert "tokens/s" in proc.stderr and "tokens/s" not in proc.stdout  # the timing line, beside the text

    proc = run_cli("inspect", out, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["source"]["format"] == "hf" and report["source"]["method"] == "rtn"
    assert report["source"]["files"]["model.safetensors"]  # source hash recorded
    rows = {r["name"]: r for r in report["linears"]}
    q = rows["model.layers.0.self_attn.q_proj"]
    # 64x64 int4 with one 64-column group (g128 > K): 4 bits + 16-bit scale/64 + 8-bit zero/64
    assert q["bits"] == 4 and abs(q["bpw"] - (4 + 16 / 64 + 8 / 64)) < 1e-9
    assert rows["lm_head"]["bits"] == 8

    text = run_cli("inspect", out).stdout
    assert "bits per weight" in text and "llama" in text


def test_inspect_hf_dir(tiny_model_dir):
    proc = run_cli("inspect", tiny_model_dir("qwen2"), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    q = next(r for r in report["linears"] if r["name"] == "model.layers.0.self_attn.q_proj")
    # fp32 tiny weights + fp32 bias: 32 bits per weight plus the bias share
    assert q["bits"] == 16 and abs(q["bpw"] - (32 + 32 / 64)) < 1e-9


def test_generate_chat_flag_and_sampling_options(tiny_model_dir):
    proc = run_cli("generate", tiny_model_dir("qwen3"), "-p", "hi", "-n", "4", "--chat",
                   "--temperature", "0.7", "--top-k", "20", "--top-p", "0.9", "--seed", "3", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s" not in proc.stderr  # --quiet: no timing line


def test_chat_reads_stdin_until_eof(tiny_model_dir):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "qruntime.cli", "chat", str(tiny_model_dir("qwen3")), "-n", "4"],
                          input="hello\nand again\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("> ") >= 2


def test_convert_method_gptq_awq_from_shell(tiny_model_dir, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("hello world, this is a tiny tokenizer for tests. " * 40)
    for method in ("gptq", "awq"):
        out = tmp_path / method
        proc = run_cli("convert", tiny_model_dir("llama"), "-o", out, "--bits", "4", "--group-size", "32",
                       "--method", method, "--calib", calib, "--calib-samples", "4", "--calib-seqlen", "32",
                       *(["--act-order"] if method == "gptq" else []))
        assert proc.returncode == 0, proc.stderr
        assert f"{method} layers" in proc.stderr  # the per-layer progress bar
        report = json.loads(run_cli("inspect", out, "--json").stdout)
        assert report["source"]["method"] == method
    proc = run_cli("convert", tiny_model_dir("llama"), "-o", tmp_path / "x", "--method", "gptq")
    assert proc.returncode == 2 and "need --bits 4 or 8" in proc.stderr
    proc = run_cli("convert", tiny_model_dir("llama"), "-o", tmp_path / "y", "--bits", "4", "--act-order")
    assert proc.returncode == 2 and "act_order is a GPTQ option" in proc.stderr
    proc = run_cli("convert", tiny_model_dir("llama"), "-o", tmp_path / "z", "--bits", "4", "--method", "awq",
                   "--calib-seqlen", "100000")
    assert proc.returncode == 2 and "fewer than --calib-seqlen" in proc.stderr


def test_demo_runs_offline_end_to_end():
    """README's first command: with no model, `qruntime demo` builds a tiny random Llama, converts it
    to w4, loads it and generates, printing the inspect summary, the text, its speed and the memory."""
    proc = run_cli("demo", "-n", "6")
    assert proc.returncode == 0, proc.stderr
    assert "no model given" in proc.stderr
    assert "output:" in proc.stdout and "tokens/s" in proc.stdout and "MiB" in proc.stdout
