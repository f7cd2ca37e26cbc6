"""Tokenizer (o200k_harmony, shipped offline) and the harmony chat format on top of openai-harmony."""

from gptoss.chat.harmony import (Chat, FunctionTool, MessageEnd, MessageStart, ParsedMessage, StreamParser,
                                 TextDelta, get_encoding, parse_completion, render_for_completion,
                                 stop_tokens)
from gptoss.chat.tokenizer import VocabError, get_tokenizer, load_tokenizer, prepare_harmony_vocab

__all__ = ["Chat", "FunctionTool", "MessageEnd", "MessageStart", "ParsedMessage", "StreamParser", "TextDelta",
           "VocabError", "get_encoding", "get_tokenizer", "load_tokenizer", "parse_completion",
           "prepare_harmony_vocab", "render_for_completion", "stop_tokens"]
