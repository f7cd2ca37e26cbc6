"""gptoss: a readable, faithful PyTorch implementation of OpenAI's GPT-OSS models."""

from gptoss.chat.tokenizer import get_tokenizer
from gptoss.errors import GptossError
from gptoss.generation.generate import generate, stream, stream_text
from gptoss.model.config import PRESETS, ModelConfig, preset
from gptoss.model.transformer import Transformer
from gptoss.weights.checkpoint import CheckpointError, load_model, open_checkpoint

__all__ = ["CheckpointError", "GptossError", "ModelConfig", "PRESETS", "Transformer", "generate", "get_tokenizer",
           "load_model", "open_checkpoint", "preset", "stream", "stream_text"]
