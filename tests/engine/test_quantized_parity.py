"""RTN int4/int8 models: our logits equal HF transformers running the dequantized packed weights."""

import pytest
import torch

import qruntime
import tiny_models
from qruntime.runtime import read_checkpoint


@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, False), (4, 64, True), (4, -1, False), (8, 128, True), (8, 32, False)])
def test_rtn_logits_equal_dequantized_reference(tiny_model_dir, variant, bits, group_size, symmetric):
    path = tiny_model_dir(variant)
    ckpt = read_checkpoint(path, bits=bits, group_size=group_size, symmetric=symmetric)
    assert all(l.bits == (8 if n == "lm_head" else bits) for n, l in ckpt.linears.items())
    model = qruntime.Model(ckpt, device="cpu", dtype=torch.float32)
    ids = torch.randint(5, tiny_models.VOCAB, (40,), generator=torch.Generator().manual_seed(2))
    ref = tiny_models.reference_logits(path, ckpt, ids)
    err = (model.logits(ids) - ref).abs().max().item()
    assert err < 1e-4, err
    # and quantization did change the model (the reference is not the fp32 model)
    fp = qruntime.load(path, device="cpu").logits(ids)
    assert (fp - ref).abs().max() > 1e-3


def test_lm_head_policy_kept_16_bit(tiny_model_dir):
    path = tiny_model_dir("llama2")
    from qruntime.converters.hf import convert
    from qruntime.quantizers.base import QuantPolicy

    ckpt = convert(path, policy=QuantPolicy(bits=4, group_size=32, lm_head_bits=16), progress=False)
    assert ckpt.linears["lm_head"].bits == 16
    assert ckpt.linears["model.layers.0.mlp.up_proj"].bits == 4
