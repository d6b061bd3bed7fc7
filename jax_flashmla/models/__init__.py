"""Models built on jax_flashmla's attention.

- `jax_flashmla.models.deepseek`: DeepSeek-V2/V3 decoders (and V3's relatives: R1, V3.1,
  Kimi-K2) from Hugging Face checkpoints; needs Flax, and `safetensors` to load.
- `jax_flashmla.models.hf`: Hugging Face configs, safetensors shards and FP8 weight blocks in
  NumPy (no torch).

Nothing is imported here, so `import jax_flashmla.models.hf` needs no Flax.
"""
