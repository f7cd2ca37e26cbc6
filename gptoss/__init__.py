"""gptoss: a readable, faithful PyTorch implementation of OpenAI's GPT-OSS models."""

from gptoss.errors import GptossError
from gptoss.model.config import PRESETS, ModelConfig, preset

__all__ = ["GptossError", "ModelConfig", "PRESETS", "preset"]
