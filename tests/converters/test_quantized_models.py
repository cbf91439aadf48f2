"""Whole tiny models in GPTQ, AWQ and compressed-tensors form: detected from their config,
converted, loaded and run; logits equal HF transformers running the dequantized weights (fp32
tolerance), and generation works. Fixtures: model_fixtures.py (the libraries' own packers)."""

import os

import pytest
import torch

import model_fixtures as mf
import qruntime
from backend_checks import check_fp16_decode_steps, check_logits_and_greedy
import tiny_models
from qruntime.converters.base import detect_format
from qruntime.errors import InvalidOptionError, QRuntimeError
from qruntime.runtime import read_checkpoint


@pytest.fixture(scope="module")
def fp16_dir(tmp_path_factory):
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = tiny_models.build_model(tmp_path_factory.mktemp(f"fp16_{variant}"), variant,
                                                     dtype=torch.float16)
        return cache[variant]

    return get


def gptq_model(src, out, bits, gs, sym, act_order, v2=False, lm_head=False, where="both"):
    mf.write_model(src, out, lambda w, b: mf.pack_gptq(w, b, bits, gs, sym, act_order, v2=v2), quant_lm_head=lm_head)
    qc = {"bits": bits, "group_size": gs, "desc_act": act_order, "sym": sym, "static_groups": False,
          "true_sequential": True, "damp_percent": 0.01, "quant_method": "gptq",
          "checkpoint_format": "gptq_v2" if v2 else "gptq", "lm_head": lm_head}
    mf.set_quantization_config(out, qc if where in ("both", "config") else None,
                               ("quantize_config.json", qc) if where in ("both", "side") else None)
    return out


def awq_model(src, out, gs, version):
    mf.write_model(src, out, lambda w, b: mf.pack_awq(w, b, gs, version))
    mf.set_quantization_config(out, {"quant_method": "awq", "zero_point": True, "group_size": gs, "bits": 4,
                                     "version": version, "modules_to_not_convert": None})
    return out


def ct_model(src, out, bits, gs, sym):
    args = {}

    def pack(w, b):
        packed, args["weights"] = mf.pack_ct(w, b, bits, gs, sym)
        return packed

    mf.write_model(src, out, pack)
    mf.set_quantization_config(out, {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": args["weights"], "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        "ignore": ["lm_head"], "sparsity_config": {}, "kv_cache_scheme": None})
    return out


CASES = {  # id -> (variant, builder, expected format)
    "gptq-w4-g32-asym-v1-llama": ("llama", lambda s, o: gptq_model(s, o, 4, 32, False, False), "gptq"),
    "gptq-w4-g32-sym-actorder-qwen2": ("qwen2", lambda s, o: gptq_model(s, o, 4, 32, True, True, where="side"), "gptq"),
    "gptq-w8-g-1-asym-v2-qwen3": ("qwen3", lambda s, o: gptq_model(s, o, 8, -1, False, False, v2=True, where="config"), "gptq"),
    "gptq-w4-g32-lm_head-llama2": ("llama2", lambda s, o: gptq_model(s, o, 4, 32, False, True, lm_head=True), "gptq"),
    "awq-gemm-g32-qwen2": ("qwen2", lambda s, o: awq_model(s, o, 32, "gemm"), "awq"),
    "awq-gemv-g32-llama": ("llama", lambda s, o: awq_model(s, o, 32, "gemv"), "awq"),
    "ct-w4a16-g32-sym-qwen3": ("qwen3", lambda s, o: ct_model(s, o, 4, 32, True), "compressed-tensors"),
    "ct-w8a16-channel-asym-llama": ("llama", lambda s, o: ct_model(s, o, 8, -1, False), "compressed-tensors"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_model_logits_equal_dequantized_reference(fp16_dir, tmp_path, case):
    variant, build, fmt = CASES[case]
    src = fp16_dir(variant)
    path = build(src, tmp_path / case)
    assert detect_format(path) == fmt
    ckpt = read_checkpoint(path)
    assert ckpt.source["format"] == fmt
    quantized = [n for n, lin in ckpt.linears.items() if lin.bits != 16]
    assert len(quantized) >= 7 * 2
    model = qruntime.Model(ckpt, device="cpu", dtype=torch.float32)
    ids = torch.randint(5, tiny_models.VOCAB, (40,), generator=torch.Generator().manual_seed(1))
    ref = tiny_models.reference_logits(src, ckpt, ids)
    err = (model.logits(ids) - ref).abs().max().item()
    assert err < 1e-4, err
    assert model.generate("hello", max_new_tokens=6, temperature=0) is not None


def test_force_format_and_refuse_calibration_method(fp16_dir, tmp_path):
    path = awq_model(fp16_dir("llama"), tmp_path / "awq", 32, "gemm")
    from qruntime.converters.base import convert
    from qruntime.quantizers.base import QuantPolicy

    with pytest.raises(QRuntimeError):  # forcing the wrong reader fails loudly, naming the format
        convert(path, source_format="gptq")
    assert convert(path, source_format="awq", progress=False).source["format"] == "awq"
    with pytest.raises(InvalidOptionError, match="already a awq checkpoint"):
        convert(path, policy=QuantPolicy(4, 32, method="gptq"), progress=False)


@pytest.mark.parametrize("fmt,changes,fragment", [
    ("gptq", {"bits": 3}, "bits=3"),
    ("gptq", {"bits": 2}, "bits=2"),
    ("gptq", {"checkpoint_format": "marlin"}, "checkpoint_format='marlin'"),
    ("gptq", {"group_size": 100}, "group_size=100"),
    ("awq", {"version": "gemv_fast"}, "version='gemv_fast'"),
    ("awq", {"bits": 8}, "bits=8"),
    ("awq", {"zero_point": False}, "zero_point=False"),
], ids=["gptq-3bit", "gptq-2bit", "gptq-marlin", "gptq-group-100", "awq-gemv_fast", "awq-8bit", "awq-no-zero"])
def test_unsupported_configs_are_named(fp16_dir, tmp_path, fmt, changes, fragment):
    import json

    build = (lambda s, o: gptq_model(s, o, 4, 32, False, False, where="config")) if fmt == "gptq" else \
        (lambda s, o: awq_model(s, o, 32, "gemm"))
    path = build(fp16_dir("llama"), tmp_path / fmt)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QRuntimeError, match=fragment):
        read_checkpoint(path)


def test_config_files_disagree(fp16_dir, tmp_path):
    import json

    path = gptq_model(fp16_dir("llama"), tmp_path / "g", 4, 32, False, False, where="both")
    side = json.loads((path / "quantize_config.json").read_text())
    (path / "quantize_config.json").write_text(json.dumps({**side, "group_size": 64}))
    with pytest.raises(QRuntimeError, match="group_size"):
        read_checkpoint(path)


def test_missing_scales_in_model_names_tensor(fp16_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    path = gptq_model(fp16_dir("llama"), tmp_path / "g", 4, 32, False, False)
    state = load_file(path / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.scales"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(QRuntimeError, match="model.layers.1.mlp.down_proj.scales"):
        read_checkpoint(path)


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs a GPU or Triton's interpreter")
@pytest.mark.parametrize("case", ["gptq-w4-g32-sym-actorder-qwen2", "ct-w8a16-channel-asym-llama"])
def test_converted_model_on_triton_backend(fp16_dir, tmp_path, case):
    """Layouts only converted checkpoints bring to the decode step: GPTQ's act-order permutation of
    the input columns (on qwen2, with its q|k|v bias), and one group per row (per-channel int8).
    Both modes of tests/engine/test_triton_backend.py against the torch backend, in the interpreter.
    A permuted linear cannot form its own input, so the act-order model's step runs unfused
    (separate SwiGLU, combine and norm launches), the per-channel one fused."""
    variant, build, _ = CASES[case]
    ckpt = read_checkpoint(build(fp16_dir(variant), tmp_path / case))
    assert (any(lin.perm is not None for lin in ckpt.linears.values()) if "actorder" in case
            else all(lin.num_groups == 1 for name, lin in ckpt.linears.items() if name != "lm_head"))
    check_logits_and_greedy(ckpt)
    if "actorder" in case:
        check_fp16_decode_steps(ckpt, fused=False)
    else:
        check_fp16_decode_steps(ckpt, qkv_bias=variant == "qwen2")
