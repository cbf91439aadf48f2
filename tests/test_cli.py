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
                   "--temperature", "0.7", "--top-k", "20", "--top-p", "0.9", "--seed", "3")
    assert proc.returncode == 0, proc.stderr


def test_chat_reads_stdin_until_eof(tiny_model_dir):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "qruntime.cli", "chat", str(tiny_model_dir("qwen3")), "-n", "4"],
                          input="hello\nand again\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("> ") >= 2
