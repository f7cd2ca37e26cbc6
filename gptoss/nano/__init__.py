"""The nano model: a tiny GPT-OSS trained on synthetic harmony conversations, shipped as the default model."""
