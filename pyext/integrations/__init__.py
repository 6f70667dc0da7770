"""Drop-in use of kxops operators inside other libraries' models, one module per library.

- `kxops.integrations.transformers.apply_kxops_rope(model)`: Hugging Face Llama, Qwen2, Qwen3, Qwen2-VL and
  Qwen3-VL attention rotates q and k with `kxops.rope_qk`.

Nothing here is imported by `import kxops`; each module imports its library when it is imported.
"""
