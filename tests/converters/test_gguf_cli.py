"""The GGUF command line: convert a file (format detected), pick a quant type in a directory,
inspect, --requantize for types the format cannot hold, and file-name selection rules."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import assert_clean_cli_error, run_cli

import qruntime
from qruntime.converters.gguf import convert
from qruntime.converters.gguf.select import file_type, pick
from qruntime.errors import InvalidOptionError, NotAModelError


def test_convert_file_detected_by_magic_then_load(gguf_zoo, tmp_path):
    src = tmp_path / "renamed.bin.model"  # no .gguf suffix: detection reads the magic
    shutil.copy(gguf_zoo.file("llama", "Q4_K_M"), src)
    proc = run_cli("convert", src, "-o", tmp_path / "out", "-q")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "out" / "quantization.json").read_text())
    assert manifest["source"]["format"] == "gguf" and manifest["source"]["method"] == "none"
    assert {s["bits"] for s in manifest["linears"].values()} == {4, 8}  # Q4_K and Q6_K kept as they are
    model = qruntime.load(tmp_path / "out", device="cpu")
    assert model.generate("hello", max_new_tokens=4, temperature=0) is not None


def test_convert_dir_picks_quant_type_case_insensitively(gguf_zoo, tmp_path):
    d = tmp_path / "repo"
    d.mkdir()
    for t in ("Q4_K_M", "Q8_0"):
        shutil.copy(gguf_zoo.file("qwen2", t), d / f"Tiny-Qwen2-{t}.gguf")
    proc = run_cli("convert", d, "--from", "gguf", "q8_0", "-o", tmp_path / "out", "-q")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "out" / "quantization.json").read_text())
    assert list(manifest["source"]["files"]) == ["Tiny-Qwen2-Q8_0.gguf"]
    assert_clean_cli_error(run_cli("convert", d, "--from", "gguf", "q5_k_m", "-o", tmp_path / "o2"),
                           "no GGUF file of type Q5_K_M (found: Tiny-Qwen2-Q4_K_M.gguf, Tiny-Qwen2-Q8_0.gguf)")
    assert_clean_cli_error(run_cli("convert", d, "-o", tmp_path / "o3"), "holds 2 GGUF files")
    assert_clean_cli_error(run_cli("convert", d, "--from", "gguf", "q4_k", "-o", tmp_path / "o4"),
                           "not a llama.cpp quant type")
    assert_clean_cli_error(run_cli("convert", d, "--from", "hf", "q8_0", "-o", tmp_path / "o5"), "expected one of")


@pytest.mark.parametrize("name,expected", [
    ("Llama-3.2-1B-Instruct-Q4_K_M.gguf", "Q4_K_M"), ("qwen2.5-0.5b-instruct-q4_k_m.gguf", "Q4_K_M"),
    ("model-Q2_K_S.gguf", "Q2_K_S"), ("model-Q2_K.gguf", "Q2_K"), ("model.BF16.gguf", "BF16"),
    ("model-f16.gguf", "F16"), ("model-IQ2_XXS.gguf", "IQ2_XXS"), ("model.gguf", None), ("q4_k_m", "Q4_K_M"),
    ("modelQ4_K_M.gguf", None),
], ids=lambda x: str(x))
def test_file_type_from_name(name, expected):
    assert file_type(name) == expected


def test_pick_errors_list_what_is_there():
    names = ["a-Q4_K_M.gguf", "b-q4_k_m.gguf", "c-Q8_0.gguf", "README.md"]
    with pytest.raises(InvalidOptionError, match="several GGUF files match Q4_K_M"):
        pick(names, "Q4_K_M", "repo")
    with pytest.raises(NotAModelError, match=r"found: a-Q4_K_M.gguf, b-q4_k_m.gguf, c-Q8_0.gguf\)"):
        pick(names, "q6_k", "repo")
    assert pick(names, "Q8_0", "repo") == "c-Q8_0.gguf"


def test_inspect_lists_metadata_types_and_bpw(gguf_zoo):
    proc = run_cli("inspect", gguf_zoo.file("llama", "Q4_K_M"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "gguf v3" in out and "general.architecture = llama" in out and "tokenizer.ggml.tokens = array[string] x 384" in out
    assert "blk.0.attn_q.weight" in out and "Q4_K" in out and "Q6_K" in out
    proc = run_cli("inspect", gguf_zoo.file("llama", "Q4_K_M"), "--json")
    report = json.loads(proc.stdout)
    assert report["by_type"]["Q4_K"]["packed_bpw"] == 5.0 and report["by_type"]["Q6_K"]["packed_bpw"] == 9.0
    assert report["by_type"]["Q4_K"]["bytes"] * 8 / report["by_type"]["Q4_K"]["weights"] == 4.5


def test_unsupported_type_error_and_requantize(gguf_zoo, tmp_path, caplog):
    src = gguf_zoo.file("llama", "IQ4_NL")
    assert_clean_cli_error(run_cli("convert", src, "-o", tmp_path / "o1"),
                           "supported types: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K")
    proc = run_cli("convert", src, "-o", tmp_path / "o2", "-q", "--requantize")
    assert proc.returncode == 0, proc.stderr
    assert "re-quantized with RTN" in proc.stderr and "IQ4_NL" in proc.stderr
    manifest = json.loads((tmp_path / "o2" / "quantization.json").read_text())
    assert manifest["source"]["method"] == "rtn" and "blk.0.attn_q.weight" in manifest["source"]["requantized"]
    ckpt = convert(src, progress=False, requantize=True)
    assert ckpt.linears["model.layers.0.self_attn.q_proj"].group_size == 32
    assert_clean_cli_error(run_cli("convert", gguf_zoo.hf("llama"), "-o", tmp_path / "o3", "--requantize"),
                           "only apply to GGUF sources")


def test_float_gguf_follows_bits_policy(gguf_zoo):
    ckpt = qruntime.runtime.read_checkpoint(gguf_zoo.file("qwen2", "F16"), bits=4, group_size=64)
    lin = ckpt.linears["model.layers.0.mlp.up_proj"]
    assert (lin.bits, lin.group_size, ckpt.source["method"]) == (4, 64, "rtn")
    assert ckpt.linears["lm_head"].bits == 8  # the policy's lm_head rule


def test_hub_repo_id_path_gives_clean_errors(monkeypatch, tmp_path):
    """The hub path cannot run offline; its selection and failure handling can."""
    import huggingface_hub

    from qruntime.converters.gguf.select import hub_file, looks_like_repo_id
    from qruntime.errors import ModelNotFoundError

    assert looks_like_repo_id("bartowski/Llama-3.2-1B-Instruct-GGUF") and not looks_like_repo_id("a/b/c")
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo: ["m-Q4_K_M.gguf", "m-Q8_0.gguf"])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: str(tmp_path / name))
    assert hub_file("o/m", "q8_0").name == "m-Q8_0.gguf"
    with pytest.raises(NotAModelError, match="no GGUF file of type Q6_K"):
        hub_file("o/m", "q6_k")

    def offline(repo):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    with pytest.raises(ModelNotFoundError, match="download the .gguf file and pass its path"):
        hub_file("o/m", "q8_0")
