"""`qruntime demo`: the whole pipeline on one machine, offline.

With no model given it writes a tiny random Llama-3-style checkpoint (transformers' own classes,
`save_pretrained`, a small BPE tokenizer with a chat template) so that convert -> load -> generate
runs anywhere. The same builder makes the test suite's fixtures.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

TINY_VOCAB = 384
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "hello world, this is a tiny tokenizer for tests.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "quantized inference runtimes read int4 weights and dequantize them on the fly.",
    "Grüße aus München! 你好，世界。 こんにちは",
] * 20

TINY_COMMON = dict(
    vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6,
)

# variant -> (transformers config class, extra config fields)
TINY_VARIANTS = {
    "llama": ("LlamaConfig", dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
        rope_theta=500000.0, tie_word_embeddings=True)),
    "llama2": ("LlamaConfig", dict(rope_theta=10000.0, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(rope_theta=1000000.0, tie_word_embeddings=False, use_sliding_window=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=16, rope_theta=1000000.0, tie_word_embeddings=True)),
}


def build_tiny_tokenizer(out: Path):
    """A byte-level BPE tokenizer trained on a few lines, saved with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_tiny_model(out: Path, variant: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32,
                     with_tokenizer: bool = True, **overrides) -> Path:
    """Writes a tiny random `variant` checkpoint to `out` with save_pretrained; returns `out`."""
    import transformers

    cls_name, extra = TINY_VARIANTS[variant]
    cfg = getattr(transformers, cls_name)(**{**TINY_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype)
    # wider weights than transformers' init, so logits are far from flat and greedy choices are stable
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    model.generation_config.eos_token_id = [2, 4]
    model.save_pretrained(out)
    if with_tokenizer:
        build_tiny_tokenizer(out)
    return Path(out)


def run_demo(model_path: str | None, bits: int = 4, prompt: str = "hello world", max_new_tokens: int = 32) -> None:
    """Converts `model_path` (or a tiny random model) to the packed format, loads it, generates."""
    import qruntime
    from qruntime.convert import convert_checkpoint
    from qruntime.inspect import format_report, inspect_model

    with tempfile.TemporaryDirectory(prefix="qruntime-demo-") as tmp:
        src = Path(model_path) if model_path else build_tiny_model(Path(tmp) / "tiny-llama")
        if not model_path:
            print(f"no model given: built a tiny random Llama at {src} (its text is gibberish)", file=sys.stderr)
        out = convert_checkpoint(src, Path(tmp) / f"packed-w{bits}", bits=bits)
        print(format_report(inspect_model(out)).split("\n\nlinear")[0])
        model = qruntime.load(out)
        print(f"\nprompt: {prompt!r}\noutput: ", end="")
        stats = qruntime.GenerationStats()
        for delta in model.generate(prompt, max_new_tokens=max_new_tokens, stream=True, temperature=0, stats=stats):
            print(delta, end="", flush=True)
        report = model.memory_report()
        print(f"\n\n{stats.summary()}")
        print(f"weights {report['weights_bytes'] / 2**20:.2f} MiB, KV cache {report['kv_cache_bytes'] / 2**20:.2f} MiB "
              f"({report['max_seq_len']} positions) on {report['device']}, {report['backend']} backend")
