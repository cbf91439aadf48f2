"""Generation machinery: static KV cache, sampler, generation loop."""
