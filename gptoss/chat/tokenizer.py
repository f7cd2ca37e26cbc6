"""The o200k_harmony tokenizer, built from the vocabulary shipped in this package so it works offline.

tiktoken's own `tiktoken.get_encoding("o200k_harmony")` downloads o200k_base.tiktoken on first use, and
openai-harmony downloads it too unless told where it is. Both would fail on an offline machine, so we
ship the file (gptoss/chat/data/o200k_base.tiktoken) and point both libraries at it.
"""

from __future__ import annotations

import codecs
import functools
import os
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from gptoss.errors import GptossError

VOCAB_DIR = Path(__file__).parent / "data"
VOCAB_FILE = VOCAB_DIR / "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"

# The environment variable openai-harmony reads to find o200k_base.tiktoken instead of downloading it.
HARMONY_VOCAB_ENV = "TIKTOKEN_ENCODINGS_BASE"

# Ids below this are byte-pair tokens that decode to text; every id from here up is a special token.
NUM_TEXT_TOKENS = 199_998

# tiktoken defines o200k_harmony inside a function that also loads the vocabulary from the network
# (tiktoken_ext/openai_public.py), so its pattern and special tokens cannot be imported on their own.
# They are copied here; tests/test_tokenizer.py checks they equal tiktoken's, field for field.
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

_NAMED_SPECIAL_TOKENS = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
    # Inherited by tiktoken from o200k_base; it shares id 200018 with <|reserved_200018|>.
    "<|endofprompt|>": 200018,
}
HARMONY_SPECIAL_TOKENS = _NAMED_SPECIAL_TOKENS | {
    f"<|reserved_{i}|>": i
    for i in (200000, 200001, 200004, 200009, 200010, 200011, *range(200013, 201088))
}
SPECIAL_TOKEN_IDS = frozenset(HARMONY_SPECIAL_TOKENS.values())


class VocabError(GptossError):
    """The shipped tokenizer vocabulary is missing or does not match its checksum."""


def load_tokenizer(vocab_file: Path = VOCAB_FILE) -> tiktoken.Encoding:
    """o200k_harmony exactly as tiktoken defines it, with the byte-pair ranks read from `vocab_file`."""
    try:
        # tiktoken checks the sha256 before parsing, and keeps a copy in its cache dir (see read_file_cached).
        ranks = load_tiktoken_bpe(str(vocab_file), expected_hash=VOCAB_SHA256)
    except OSError as e:  # missing or unreadable file, or an unwritable TIKTOKEN_CACHE_DIR
        raise VocabError(f"cannot read tokenizer vocabulary {vocab_file} (expected sha256 {VOCAB_SHA256}): "
                         f"{e}") from e
    except ValueError as e:  # checksum mismatch
        raise VocabError(f"tokenizer vocabulary {vocab_file} is corrupt: its sha256 is not {VOCAB_SHA256}; "
                         "reinstall gptoss to restore it") from e
    return tiktoken.Encoding(name="o200k_harmony", pat_str=O200K_PATTERN, mergeable_ranks=ranks,
                             special_tokens=HARMONY_SPECIAL_TOKENS)


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """The shared o200k_harmony tokenizer (loading takes about a second, so it is done once)."""
    return load_tokenizer()


def prepare_harmony_vocab() -> Path:
    """Makes openai-harmony read o200k_base.tiktoken from disk instead of downloading it; returns the dir.

    openai-harmony (0.0.8) loads its tokenizer from `$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken` when
    that variable is set (and checks the file's sha256); otherwise it downloads the file into
    `$TIKTOKEN_RS_CACHE_DIR` (default: <tmp>/tiktoken-rs-cache). It reads the variable on every
    `load_harmony_encoding` call, so setting it here, before the call, is enough. A directory the user
    already chose is kept as long as it has the file.
    """
    chosen = os.environ.get(HARMONY_VOCAB_ENV)
    if chosen and (Path(chosen) / VOCAB_FILE.name).is_file():
        return Path(chosen)
    os.environ[HARMONY_VOCAB_ENV] = str(VOCAB_DIR)
    return VOCAB_DIR


class TextDecoder:
    """Generated token ids -> text, token by token. A character whose UTF-8 bytes are split across
    tokens comes out whole, with the token that completes it; bytes that never complete a character
    come out as U+FFFD at `flush()`.

    specials: what a special token (an id from NUM_TEXT_TOKENS up: <|start|>, <|channel|>, the stop
    tokens, ...) contributes: "drop", nothing (gptoss's choice everywhere, as vLLM's default
    skip_special_tokens), or "text", its name ("<|channel|>"). A dropped special token leaves a
    character in progress intact.
    """

    SPECIAL_POLICIES = ("drop", "text")

    def __init__(self, specials: str = "drop"):
        if specials not in self.SPECIAL_POLICIES:
            raise ValueError(f"specials must be one of {self.SPECIAL_POLICIES}, got {specials!r}")
        self.specials = specials
        self._tokenizer = get_tokenizer()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        """The text that `token` completes (often "", for a token ending inside a character)."""
        if 0 <= token < NUM_TEXT_TOKENS:
            return self._utf8.decode(self._tokenizer.decode_single_token_bytes(token))
        if self.specials == "text" and token in SPECIAL_TOKEN_IDS:
            return self._utf8.decode(self._tokenizer.decode_single_token_bytes(token))
        return ""

    def flush(self) -> str:
        """What is left at the end: U+FFFD for a character cut off, else ""."""
        return self._utf8.decode(b"", final=True)
