"""Architecture arithmetic: parameter counts, KV-cache sizes, FLOPs and bytes per token.

`architectures` describes models (GPT-OSS from our `ModelConfig`, Qwen3 and Gemma 3 from their
published config.json files); `compare` does the arithmetic and renders it (`gptoss compare`).
"""
