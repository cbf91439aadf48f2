"""Every error a user can cause: the typed exception from the API, and from the CLI exit status 2
with one clear line and no traceback."""

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import qruntime
from qruntime import errors
from qruntime.cli import main
from conftest import assert_clean_cli_error, run_cli


def cli(capsys, *args):
    """Runs the CLI in-process; returns (exit status, stderr)."""
    try:
        status = main([str(a) for a in args])
    except SystemExit as e:  # argparse rejects bad options this way
        status = e.code
    return status, capsys.readouterr().err


def expect_cli_error(capsys, fragment, *args):
    status, err = cli(capsys, *args)
    assert status == 2, (status, err)
    assert "Traceback" not in err
    assert fragment in err.strip().splitlines()[-1], err  # the last line is the one clear error


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- the cases of point 8

def test_missing_path(tmp_path, capsys):
    with pytest.raises(errors.ModelNotFoundError, match="nope"):
        qruntime.load(tmp_path / "nope")
    expect_cli_error(capsys, "nope: no such file", "generate", tmp_path / "nope", "-p", "hi")
    expect_cli_error(capsys, "nope: no such file", "convert", tmp_path / "nope", "-o", tmp_path / "o")
    expect_cli_error(capsys, "nope: no such file", "inspect", tmp_path / "nope")


def test_not_a_model(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(errors.NotAModelError, match="not a model"):
        qruntime.load(tmp_path)
    expect_cli_error(capsys, "not a model", "generate", tmp_path, "-p", "hi")
    expect_cli_error(capsys, "not a model", "inspect", tmp_path)


def test_corrupt_safetensors(tiny_model_dir, tmp_path, capsys):
    path = copy_model(tiny_model_dir("llama2"), tmp_path / "m")
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(errors.CorruptFileError, match="model.safetensors"):
        qruntime.load(path)
    expect_cli_error(capsys, "model.safetensors", "generate", path, "-p", "hi")


def test_truncated_safetensors(tiny_model_dir, tmp_path, capsys):
    path = copy_model(tiny_model_dir("llama2"), tmp_path / "m")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(errors.CorruptFileError, match="truncated"):
        qruntime.load(path)
    expect_cli_error(capsys, "truncated", "convert", path, "-o", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tiny_model_dir, tmp_path, capsys):
    path = copy_model(tiny_model_dir("llama2"), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(errors.UnsupportedArchitectureError, match="GPT2LMHeadModel"):
        qruntime.load(path)
    expect_cli_error(capsys, "GPT2LMHeadModel", "generate", path, "-p", "hi")


def test_unsupported_rope_type(tiny_model_dir, tmp_path):
    path = copy_model(tiny_model_dir("llama2"), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"], cfg["rope_scaling"] = 10000.0, {"type": "yarn", "factor": 4.0}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(errors.UnsupportedArchitectureError, match="yarn"):
        qruntime.load(path)


def _rewrite_tensor(path, name, fn):
    tensors = load_file(path / "model.safetensors")
    if fn is None:
        del tensors[name]
    else:
        tensors[name] = fn(tensors[name])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_shape_mismatch(tiny_model_dir, tmp_path, capsys):
    path = copy_model(tiny_model_dir("llama2"), tmp_path / "m")
    _rewrite_tensor(path, "model.layers.1.mlp.down_proj.weight", lambda t: t[:, :-8].contiguous())
    with pytest.raises(errors.ShapeMismatchError, match="model.layers.1.mlp.down_proj"):
        qruntime.load(path)
    with pytest.raises(errors.ShapeMismatchError, match="model.layers.1.mlp.down_proj"):
        qruntime.load(path, bits=4)
    expect_cli_error(capsys, "model.layers.1.mlp.down_proj", "convert", path, "-o", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_tensor(tiny_model_dir, tmp_path):
    path = copy_model(tiny_model_dir("qwen2"), tmp_path / "m")
    _rewrite_tensor(path, "model.layers.0.self_attn.k_proj.bias", None)
    with pytest.raises(errors.MissingTensorError, match="model.layers.0.self_attn.k_proj.bias"):
        qruntime.load(path)


def test_bad_options(tiny_model_dir, tmp_path, capsys):
    path = tiny_model_dir("llama2")
    with pytest.raises(errors.InvalidOptionError, match="bits=3"):
        qruntime.load(path, bits=3)
    with pytest.raises(errors.InvalidOptionError, match="group_size=100"):
        qruntime.load(path, bits=4, group_size=100)
    with pytest.raises(errors.InvalidOptionError, match="dtype"):
        qruntime.load(path, dtype="float64")
    model = qruntime.load(path)
    with pytest.raises(errors.InvalidOptionError, match="temperature"):
        model.generate("hi", temperature=-1)
    with pytest.raises(errors.InvalidOptionError, match="top_p"):
        model.generate("hi", top_p=0)
    with pytest.raises(errors.InvalidOptionError, match="exceed the KV cache"):
        model.generate("hi", max_new_tokens=10_000)
    expect_cli_error(capsys, "invalid choice: 3", "convert", path, "-o", tmp_path / "o", "--bits", "3")
    expect_cli_error(capsys, "power of two", "convert", path, "-o", tmp_path / "o", "--group-size", "100")
    expect_cli_error(capsys, "temperature", "generate", path, "-p", "hi", "--temperature", "-1")
    expect_cli_error(capsys, "--lm-head-bits needs", "convert", path, "-o", tmp_path / "o", "--bits", "16", "--lm-head-bits", "4")
    assert not (tmp_path / "o").exists()


def test_output_exists_refused_unless_force(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    expect_cli_error(capsys, "already exists", "convert", tiny_model_dir("llama2"), "-o", out, "-q")
    assert (out / "keep.txt").read_text() == "mine"
    assert cli(capsys, "convert", tiny_model_dir("llama2"), "-o", out, "-q", "--force")[0] == 0
    assert not (out / "keep.txt").exists() and (out / "quantization.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left behind


def test_pickle_checkpoint_refused_never_unpickled(tmp_path, capsys, tiny_model_dir):
    path = tmp_path / "m"
    path.mkdir()
    shutil.copy(tiny_model_dir("llama2") / "config.json", path / "config.json")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (path / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(errors.UnsafeCheckpointError, match="never unpickles"):
        qruntime.load(path)
    expect_cli_error(capsys, "never unpickles", "convert", path, "-o", tmp_path / "o")
    assert not marker.exists()


def test_failed_convert_leaves_no_output_and_keeps_source(tiny_model_dir, tmp_path):
    path = copy_model(tiny_model_dir("qwen3"), tmp_path / "m")
    _rewrite_tensor(path, "model.layers.1.self_attn.q_norm.weight", lambda t: torch.ones(3))
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    proc = run_cli("convert", path, "-o", tmp_path / "out", "--bits", "4")
    assert_clean_cli_error(proc, "model.layers.1.self_attn.q_norm.weight")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


def test_error_hierarchy():
    for cls in (errors.ModelNotFoundError, errors.NotAModelError, errors.CorruptFileError, errors.ChecksumMismatchError,
                errors.UnsupportedArchitectureError, errors.ShapeMismatchError, errors.MissingTensorError,
                errors.InvalidOptionError, errors.UnsafeCheckpointError, errors.OutputExistsError,
                errors.UnsupportedFormatError, errors.MissingDependencyError):
        assert issubclass(cls, qruntime.QRuntimeError)


def test_memory_budget_and_kv_cache_options(tiny_model_dir, capsys):
    """--memory-budget and --kv-cache reach the model (the sizing itself: tests/test_memory.py)."""
    from qruntime.memory import WORKSPACE_BYTES

    path = tiny_model_dir("llama")
    assert cli(capsys, "generate", path, "-p", "hi", "-n", "2", "--memory-budget", "1.5GiB", "--kv-cache", "auto")[0] == 0
    expect_cli_error(capsys, "expected a positive size", "generate", path, "-p", "hi", "--memory-budget", "lots")
    expect_cli_error(capsys, "leaves no room for a KV cache", "generate", path, "-p", "hi", "--memory-budget", "1GiB")
    room_for_100 = qruntime.load(path).memory_report()["weights_bytes"] + WORKSPACE_BYTES + 100 * 1024  # < 1 KiB a position
    expect_cli_error(capsys, "does not fit the memory budget", "generate", path, "-p", "hi", "--memory-budget",
                     f"{room_for_100}B", "--max-seq-len", "200")
    expect_cli_error(capsys, "needs the triton backend", "generate", path, "-p", "hi", "--kv-cache", "int8",
                     "--device", "cpu")
