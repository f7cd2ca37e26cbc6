"""generation_config.json: the stop tokens and sampling defaults a checkpoint asks for.

The published gpt-oss repositories ship one beside config.json:
`{"bos_token_id": 199998, "do_sample": true, "eos_token_id": [200002, 199999, 200012], "pad_token_id": 199999}`.
As in transformers, its `eos_token_id` overrides config.json's (which for openai/gpt-oss-20b is the single
<|return|>, so raw generation would run past <|endoftext|> and <|call|> without it), and its sampling
fields are the defaults that a request's own parameters override.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from gptoss.model.config import ConfigError, ModelConfig, read_config_json

FILE = "generation_config.json"
STARTOFTEXT = 199998   # <|startoftext|>, the published bos_token_id


@dataclass(frozen=True)
class GenerationConfig:
    eos_token_ids: tuple[int, ...]     # generation stops at any of these
    do_sample: bool | None = None      # None: the file does not say (so for every field below)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None           # 0 (transformers: no top-k filter) is kept as None
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    @classmethod
    def for_model(cls, cfg: ModelConfig) -> "GenerationConfig":
        """What a checkpoint without the file gets: config.json's stop tokens, no sampling defaults."""
        return cls(eos_token_ids=cfg.eos_token_ids, pad_token_id=cfg.pad_token_id)

    @classmethod
    def from_json_file(cls, path: str | Path, cfg: ModelConfig) -> "GenerationConfig":
        """The file's fields, checked (token ids, value ranges); a one-line ConfigError naming the file."""
        raw = read_config_json(path)

        def fail(message: str):
            raise ConfigError(f"{path}: {message}")

        def token(value, key: str) -> int:  # as config.json's ids, not bound to the vocabulary (tiny test models)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                fail(f"{key} {value!r} is not a token id")
            return value

        def optional_token(key: str, default: int | None) -> int | None:
            return default if raw.get(key) is None else token(raw[key], key)

        def number(key: str, low: float, high: float, kind=(int, float)):
            value = raw.get(key)
            if value is None:
                return None
            if (isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value)
                    or not low <= value <= high):
                fail(f"{key} must be a number within {low}..{high}, got {value!r}")
            return value

        eos = raw.get("eos_token_id")
        if eos is None:
            eos_ids = cfg.eos_token_ids
        else:
            eos_ids = tuple(token(t, "eos_token_id") for t in (eos if isinstance(eos, list) else [eos]))
        do_sample = raw.get("do_sample")
        if do_sample is not None and not isinstance(do_sample, bool):
            fail(f"do_sample must be true or false, got {do_sample!r}")
        top_k = number("top_k", 0, cfg.vocab_size, kind=int)
        top_p = number("top_p", 0, 1)
        if top_p == 0:
            fail("top_p must be within (0, 1], got 0")
        return cls(
            eos_token_ids=eos_ids,
            do_sample=do_sample,
            temperature=number("temperature", 0, 100),
            top_p=top_p,
            top_k=top_k or None,
            bos_token_id=optional_token("bos_token_id", None),
            pad_token_id=optional_token("pad_token_id", cfg.pad_token_id),
        )

    @classmethod
    def published(cls, cfg: ModelConfig) -> "GenerationConfig":
        """The file as openai/gpt-oss-20b and -120b publish it (for the default config; the stop tokens are
        cfg's own, and <|startoftext|> only where the vocabulary has it)."""
        return cls(eos_token_ids=cfg.eos_token_ids, do_sample=True, pad_token_id=cfg.pad_token_id,
                   bos_token_id=STARTOFTEXT if STARTOFTEXT < cfg.vocab_size else None)

    def to_json(self) -> dict:
        raw = {"bos_token_id": self.bos_token_id, "do_sample": self.do_sample, "eos_token_id": list(self.eos_token_ids),
               "pad_token_id": self.pad_token_id, "temperature": self.temperature, "top_k": self.top_k,
               "top_p": self.top_p}
        return {key: value for key, value in raw.items() if value is not None}

    def default_temperature(self, fallback: float) -> float:
        """The temperature when a request names none: 0 (greedy) where the file says do_sample false, its
        temperature where it gives one, 1.0 (transformers' default) where it only says do_sample true,
        else the caller's own default."""
        if self.do_sample is False:
            return 0.0
        if self.temperature is not None:
            return float(self.temperature)
        return 1.0 if self.do_sample else fallback
