"""gptoss: a readable, faithful PyTorch implementation of OpenAI's GPT-OSS models."""

from gptoss.errors import GptossError
from gptoss.model.config import PRESETS, ModelConfig, preset
from gptoss.model.transformer import Transformer
from gptoss.weights.checkpoint import CheckpointError, load_model, open_checkpoint

__all__ = ["CheckpointError", "GptossError", "ModelConfig", "PRESETS", "Transformer", "load_model",
           "open_checkpoint", "preset"]
