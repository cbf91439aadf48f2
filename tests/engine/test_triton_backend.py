"""The triton backend end to end (in Triton's interpreter on a CPU): same logits and the same greedy
tokens as the torch reference backend on the tiny models."""

import os

import pytest
import torch

from backend_checks import check_fp16_decode_steps, check_logits_and_greedy
from qruntime.converters.gguf import convert as convert_gguf
from qruntime.runtime import read_checkpoint

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or Triton's interpreter",
)


@pytest.mark.parametrize("variant,bits,kv", [("llama", 4, "auto"), ("qwen2", 8, "auto"), ("qwen3", 4, "int8"),
                                             ("llama2", 16, "auto")])
def test_triton_backend_matches_torch_backend(tiny_model_dir, variant, bits, kv):
    check_logits_and_greedy(read_checkpoint(tiny_model_dir(variant), bits=None if bits == 16 else bits,
                                             group_size=32), kv)


@pytest.mark.parametrize("variant,bits", [("llama", 4), ("qwen2", 8), ("qwen3", 4), ("qwen2", 16)])
def test_fp16_decode_steps_match_torch_backend(tiny_model_dir, variant, bits):
    """fp16 activations: the decode step takes the packed GEMVs, or for 16-bit weights the
    dense ones (kernels.gemv_dense), which form their inputs the same way (the fp32 mode of the test
    above does not). Three eager decode steps, each checked against the fp32 torch backend on the
    same prefix: an accumulator (or a deferred norm's sum of squares) left non-zero would show from
    the second step on. The layers' RMSNorms are deferred to the kernels after their GEMVs
    (qwen2's q|k|v bias is then added by flash-decoding, after the norm's scale)."""
    check_fp16_decode_steps(read_checkpoint(tiny_model_dir(variant), bits=None if bits == 16 else bits,
                                             group_size=32), qkv_bias=variant == "qwen2")


@pytest.mark.parametrize("model,ftype", [("llama", "Q4_K_M"), ("qwen2", "Q5_1")])
def test_triton_backend_runs_llama_cpp_files(gguf_zoo, model, ftype):
    """GGUF files keep llama.cpp's codes, in layouts the RTN models above do not have: Q4_K_M's int4
    codes in groups of 32 with float offsets (Q4_K's mins) beside Q6_K's int8 codes in groups of 16;
    Q5_1's 5-bit codes as int8 with float offsets, on qwen2 (q|k|v bias). Both modes of the tests
    above: logits and greedy tokens, and fp16 decode steps. Q4_K_M's v_proj (Q6_K) differs in layout
    from q_proj and k_proj, so q|k|v stay three GEMVs and the attention norm is not deferred: the
    decode step's other path, checked here too."""
    ckpt = convert_gguf(gguf_zoo.file(model, ftype), progress=False)
    assert any(lin.zero_mode == "float" for lin in ckpt.linears.values())
    check_logits_and_greedy(ckpt)
    check_fp16_decode_steps(ckpt, fused=False)


@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_long_prompts_prefill_in_pieces(tiny_model_dir, kv):
    """A prompt longer than the runner's prefill_chunk runs in pieces, each attending to the cache
    the pieces before it wrote: the same logits (every row's, or the last's), the same cache and the
    same greedy tokens as in one piece."""
    import qruntime

    ckpt = read_checkpoint(tiny_model_dir("llama"), bits=4, group_size=32)
    whole = qruntime.Model(ckpt, device="cpu", backend="triton", kv_cache=kv)
    pieces = qruntime.Model(ckpt, device="cpu", backend="triton", kv_cache=kv)
    pieces.runner.prefill_chunk = 5
    ids = torch.arange(3, 16)  # 13 tokens: pieces of 5, 5 and 3
    a, b = whole.runner.prefill(ids, all_logits=True), pieces.runner.prefill(ids, all_logits=True)
    assert a.shape == b.shape == (13, ckpt.config.vocab_size)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5 * a.abs().max().item())
    for name in ("k_cache", "v_cache", "k_scale", "v_scale"):
        x, y = getattr(whole.runner, name), getattr(pieces.runner, name)
        assert (x is None) == (y is None) == (name.endswith("scale") and kv == "auto")
        if x is not None:
            torch.testing.assert_close(y[:, :, :13].float(), x[:, :, :13].float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pieces.runner.prefill(ids), a[-1:], rtol=0, atol=1e-5 * a.abs().max().item())
    whole.eos_ids = pieces.eos_ids = set()
    assert list(pieces.generate_ids(ids.tolist(), 4)) == list(whole.generate_ids(ids.tolist(), 4))


class _DeviceOnlySampler:
    """A Sampler whose torch draws fail: the triton runner must draw with kernels.sampling, keyed
    by the sampler's seed, and never read a token on the host per step."""

    def __init__(self, params):
        from qruntime.engine.sampler import Sampler

        self.params, self.generator = params, Sampler(params, torch.device("cpu")).generator

    def __call__(self, *args):
        raise AssertionError("the triton runner read a sampled token on the host")

    def draw(self, *args):
        raise AssertionError("the triton runner drew with the torch sampler")


@pytest.mark.parametrize("options", [dict(temperature=0.8, top_k=8, top_p=0.9, repetition_penalty=1.3, seed=3),
                                     dict(temperature=1.0, seed=11),
                                     dict(temperature=0.0, repetition_penalty=1.5),
                                     dict(temperature=0.9, top_k=1, seed=5)],
                         ids=["sampled-filtered", "sampled-plain", "greedy-with-penalty", "top-k-1"])
def test_sampling_draws_on_the_device(tiny_model_dir, monkeypatch, options):
    """Sampling (and greedy decoding with a repetition penalty, which the step's own argmax cannot
    serve) draws after each step with kernels.sampling: every token is the reference's draw
    (kernels.reference.sample_token) from that step's logits, seen tokens and Philox step, over more
    steps than one read-back; one seed gives the same tokens again. Where the draw is deterministic
    (greedy with the penalty; top-k 1) the tokens are the torch backend's. The filtered draws take
    the candidates (the 384 words fit a buffer of 512), except top-k 1's, whose buffer is cut to 16
    so that they take the searches."""
    import qruntime
    from qruntime.engine.sampler import SamplingParams
    from qruntime.kernels import reference as R
    from qruntime.kernels import sampling
    from qruntime.kernels.sampling import SamplingPlan

    params = SamplingParams(**options)
    monkeypatch.setattr(sampling, "CAP", 16 if params.top_k == 1 else 512)  # 1024 is slow in the interpreter
    monkeypatch.setenv("QRUNTIME_SAMPLING_CANDIDATES", "1")
    ckpt = read_checkpoint(tiny_model_dir("qwen2"), bits=4, group_size=32)
    fast = qruntime.Model(ckpt, device="cpu", backend="triton")
    runner, prompt = fast.runner, list(range(5, 17))
    seen_at_draws, logits_at_draws, served, draw = [], [], [], runner._draw

    def recording_draw(plan, eager=False):
        logits_at_draws.append(runner.logits[0].clone())
        seen_at_draws.append(runner.seen.clone())
        draw(plan, eager)
        served.append(runner.sampling.drew_from_candidates)

    runner._draw = recording_draw
    sampler = _DeviceOnlySampler(params)
    got = list(runner.generate(prompt, 8, sampler, set(), sync_every=3))
    plan = SamplingPlan.from_params(params, ckpt.config.vocab_size)
    seed = sampler.generator.initial_seed()
    assert got == [R.sample_token(logits, plan, seed, step, seen)
                   for step, (logits, seen) in enumerate(zip(logits_at_draws, seen_at_draws))]
    assert len(logits_at_draws) == 8
    filtered = plan.top_k or plan.top_p < 1.0
    assert served == [bool(filtered) and params.top_k != 1] * 8
    runner._draw = draw
    assert list(runner.generate(prompt, 4, _DeviceOnlySampler(params), set(), sync_every=2)) == got[:4]
    if params.greedy or params.top_k == 1:
        ref = qruntime.Model(ckpt, device="cpu", backend="torch")
        ref.eos_ids = set()
        assert got == list(ref.generate_ids(prompt, 8, SamplingParams(repetition_penalty=params.repetition_penalty)))
    if params.greedy:  # the penalty matters here: without it the tokens differ
        fast.eos_ids = set()
        assert list(fast.generate_ids(prompt, 8, SamplingParams())) != got


@pytest.mark.parametrize("variant,geometry", [
    ("qwen3", dict(head_dim=32)),                                        # Qwen3-0.6B's kind: heads x head_dim = 2 x hidden
    ("llama", dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2)),  # 3 query heads a KV head
    ("qwen2", dict(hidden_size=56, num_attention_heads=7, num_key_value_heads=1)),  # 7 query heads, one KV head
], ids=["q-wider-than-hidden", "gqa-group-3", "gqa-group-7"])
def test_triton_backend_runs_uneven_attention_geometries(tmp_path, variant, geometry):
    """Geometries the tiny models above do not have, which real checkpoints do: q's width unlike the
    hidden size (Qwen3-0.6B / 4B: 16 x 128 or 32 x 128 heads over 1024 or 2560), and GQA groups that
    are not a power of two (Qwen2.5-7B: 28 query heads over 4 KV heads). Both modes: fp32 logits and
    greedy tokens, then fused fp16 decode steps."""
    import tiny_models

    ckpt = read_checkpoint(tiny_models.build_model(tmp_path / variant, variant, **geometry), bits=4, group_size=16)
    cfg = ckpt.config
    assert cfg.num_heads * cfg.head_dim != cfg.hidden_size or (cfg.num_heads // cfg.num_kv_heads) % 2
    check_logits_and_greedy(ckpt)
    check_fp16_decode_steps(ckpt, qkv_bias=variant == "qwen2")


def test_triton_backend_runs_per_channel_weights_of_uneven_width(tmp_path):
    """Per-channel weights (one group a row, GPTQ's group_size -1) over a hidden size that is not a
    power of two: the prefill and decode kernels' K tiles must still be powers of two (prefill took
    min(tile, K) = 96 and failed)."""
    import tiny_models

    geometry = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
    ckpt = read_checkpoint(tiny_models.build_model(tmp_path / "llama", "llama", **geometry), bits=4, group_size=-1)
    assert ckpt.linears["model.layers.0.mlp.gate_proj"].group_size == -1
    check_logits_and_greedy(ckpt)
    check_fp16_decode_steps(ckpt)


@pytest.mark.parametrize("variant,geometry", [
    ("llama", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=24)),
    ("qwen2", dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1, head_dim=20)),  # q|k|v bias
], ids=["llama-24", "qwen2-20"])
def test_triton_backend_pads_heads_that_are_not_a_power_of_two(tmp_path, variant, geometry):
    """A head_dim that is not a power of two (OpenLLaMA 3B's 100; here 24 and 20) runs with heads
    padded to the next one (triton_runner.pad_heads, kernels.rope.padded_head_slots): q|k|v's rows,
    the cache and the RoPE tables padded, the softmax scaled by the real head_dim, the attention's
    output packed back for o_proj. Logits and greedy tokens as the torch backend's (fp16 and int8
    caches), and fused fp16 decode steps (o_proj not merging the splits: flash-decoding's combine
    packs them)."""
    import tiny_models
    import qruntime
    from qruntime.engine.triton_runner import unsupported_reason

    ckpt = read_checkpoint(tiny_models.build_model(tmp_path / variant, variant, **geometry), bits=4, group_size=16)
    assert unsupported_reason(ckpt.config, torch.device("cuda")) is None
    check_logits_and_greedy(ckpt)
    check_logits_and_greedy(ckpt, kv="int8")
    check_fp16_decode_steps(ckpt, fused=False)
    runner = qruntime.Model(ckpt, device="cpu", backend="triton", dtype=torch.float16).runner
    hd = geometry["head_dim"]
    assert runner.head_dim == 32 and runner.k_cache.shape[-1] == 32 and runner.cos.shape[-1] == 16
    assert runner.fused_swiglu and runner.defer_attention_norm and not runner.fused_merge
    assert runner.attn.shape == (1, geometry["num_attention_heads"] * hd)  # o_proj's input, packed
    assert (runner.rope_inputs[0].qkv_bias is not None) == (variant == "qwen2")


def test_qk_norms_over_padded_heads_are_refused_or_left_to_torch(tmp_path):
    """Per-head q/k norms (Qwen3) over heads that would need padding (not a power of two, or under
    16 on a GPU's tensor cores) would average over the padding: backend="triton" says so at load
    and names the backend that runs it; left to choose on a GPU, Model takes the torch backend with
    a warning that says why. No Qwen3 release has such heads (all 128)."""
    import tiny_models
    import qruntime
    from qruntime.engine.triton_runner import unsupported_reason
    from qruntime.errors import UnsupportedArchitectureError
    from qruntime.runtime import _default_backend

    geometry = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=24)
    ckpt = read_checkpoint(tiny_models.build_model(tmp_path / "qwen3", "qwen3", **geometry), bits=4, group_size=32)
    with pytest.raises(UnsupportedArchitectureError, match=r"q/k norms need head_dim to be a power of two, and this model's is 24.*backend='torch'"):
        qruntime.Model(ckpt, device="cpu", backend="triton")
    gpu = torch.device("cuda")
    with pytest.warns(UserWarning, match="power of two.*24.*torch backend"):
        assert _default_backend(gpu, ckpt.config) == "torch"
    ckpt.config.head_dim = 8
    assert unsupported_reason(ckpt.config, torch.device("cpu")) is None
    assert "16 or more" in unsupported_reason(ckpt.config, gpu)
    ckpt.config.head_dim = 128
    assert unsupported_reason(ckpt.config, gpu) is None and _default_backend(gpu, ckpt.config) == "triton"
    assert _default_backend(torch.device("cpu"), ckpt.config) == "torch"
    ckpt.config.qk_norm = False
    ckpt.config.head_dim = 100
    assert unsupported_reason(ckpt.config, gpu) is None


@pytest.mark.parametrize("variant,biases", [("llama", dict(attention_bias=True, mlp_bias=True)),
                                            ("qwen3", dict(attention_bias=True))],
                         ids=["llama-attention-mlp", "qwen3-attention"])
def test_triton_backend_adds_linear_biases(tmp_path, variant, biases):
    """Llama's attention and MLP biases, Qwen3's attention biases (the torch backend matches
    transformers on them: test_hf_parity.py). Llama's gate|up bias keeps the MLP's RMSNorm from being
    deferred past its GEMV, so that model's decode steps take the undeferred path."""
    import tiny_models

    ckpt = read_checkpoint(tiny_models.build_model(tmp_path / variant, variant, **biases), bits=4, group_size=16)
    assert ckpt.linears["model.layers.0.self_attn.o_proj"].bias is not None
    check_logits_and_greedy(ckpt)
    check_fp16_decode_steps(ckpt, fused=variant == "qwen3", qkv_bias=True)
