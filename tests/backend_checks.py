"""Checks of the triton backend against the torch reference backend on one checkpoint, shared by
the engine's tests (tests/engine/test_triton_backend.py) and the converters' (a converted model run
through the triton backend: tests/converters/test_quantized_models.py)."""

import torch

import qruntime


def check_logits_and_greedy(ckpt, kv="auto"):
    """The triton backend's logits over 20 tokens (fp32 activations) within 5e-3 of the torch
    backend's (5e-2 with an int8 KV cache), and the same 6 greedy tokens."""
    ref = qruntime.Model(ckpt, device="cpu", backend="torch")
    fast = qruntime.Model(ckpt, device="cpu", backend="triton", kv_cache=kv)
    ids = list(range(5, 25))
    tol = 0.05 if kv == "int8" else 5e-3  # fp16 tensor-core inputs; int8 KV adds its quantization noise
    a, b = ref.logits(ids), fast.logits(ids)
    assert (a - b).abs().max() < tol * a.abs().max()
    ref.eos_ids = fast.eos_ids = set()
    assert list(fast.generate_ids(ids, 6)) == list(ref.generate_ids(ids, 6))
    report = fast.memory_report()
    assert report["backend"] == "triton" and report["kv_cache_bytes"] > 0


def check_fp16_decode_steps(ckpt, fused: bool = True, qkv_bias: bool = False):
    """Three eager fp16 decode steps of the triton backend, each within 2e-2 of the fp32 torch
    backend on the same prefix, its argmax the next token. fused: the checkpoint's linears allow
    every fusion of the decode step (asserted: SwiGLU in down_proj, the splits merged in o_proj, both
    RMSNorms deferred, and flash-decoding adding q|k|v's bias iff qkv_bias)."""
    ref = qruntime.Model(ckpt, device="cpu", backend="torch", dtype=torch.float32)
    fast = qruntime.Model(ckpt, device="cpu", backend="triton", dtype=torch.float16)
    r = fast.runner
    assert r.xn.dtype == torch.float16
    if fused:
        assert r.fused_swiglu  # down_proj forms silu(gate) * up itself
        assert r.fused_merge and r.attn is None  # o_proj merges the attention splits, zeroes q|k|v and gate|up
        assert r.defer_mlp_norm and r.defer_attention_norm
        assert (r.rope_inputs[0].qkv_bias is not None) == qkv_bias
    ids = list(range(5, 17))
    r.prefill(torch.tensor(ids[:-1]))
    r.token.fill_(ids[-1]); r.pos.fill_(len(ids) - 1); r.seq_len.fill_(len(ids))
    for _ in range(3):
        r.step()  # decode + argmax + advance: logits are for `ids`, the argmax becomes the next token
        expected = ref.logits(ids)[-1]
        assert (r.logits[0] - expected).abs().max() < 2e-2 * expected.abs().max()
        assert int(r.token) == int(torch.argmax(r.logits[0])) and int(r.pos) == len(ids)
        ids.append(int(r.token))
