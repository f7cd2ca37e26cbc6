"""Turning logits into the next token: greedy, or temperature with top-k, top-p and min-p filters, after
OpenAI's logit bias and presence / frequency penalties."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from gptoss.errors import GptossError
from gptoss.model.generation_config import GenerationConfig


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0      # 0 = greedy
    top_k: int | None = None      # keep the k most likely tokens
    top_p: float | None = None    # keep the smallest set whose probability reaches p
    min_p: float | None = None    # drop tokens below min_p x the top token's probability
    seed: int | None = None       # makes sampled runs reproducible
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # added to those tokens' logits
    presence_penalty: float = 0.0   # subtracted once from the logit of every token generated so far
    frequency_penalty: float = 0.0  # subtracted from a token's logit per time it was generated

    def __post_init__(self):
        if self.temperature < 0:
            raise GptossError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise GptossError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GptossError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise GptossError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise GptossError(f"{name} must be in [-2, 2], got {getattr(self, name)}")

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.logit_bias) or self.presence_penalty != 0 or self.frequency_penalty != 0

    def generator(self, device: str | torch.device = "cpu") -> torch.Generator | None:
        """A generator for `sample` on `device` (where the logits live), or None when unseeded."""
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)


def with_defaults(defaults: GenerationConfig, fallback_temperature: float, temperature: float | None = None,
                  top_k: int | None = None, top_p: float | None = None, **rest) -> SamplingParams:
    """SamplingParams from the values a caller gives (None: not given), the checkpoint's
    generation_config.json for those not given, and `fallback_temperature` where neither says (the CLI:
    0, greedy; the OpenAI API: 1). A top_p of 1 cuts nothing."""
    temperature = defaults.default_temperature(fallback_temperature) if temperature is None else temperature
    top_k = defaults.top_k if top_k is None else top_k
    top_p = defaults.top_p if top_p is None else top_p
    return SamplingParams(temperature, top_k, None if top_p == 1 else top_p, **rest)


def adjust(logits: torch.Tensor, params: SamplingParams, generated: Sequence[int] = ()) -> torch.Tensor:
    """logits [1, V] with the logit bias and the penalties for the tokens `generated` so far, as OpenAI
    defines them: logit - presence_penalty * (count > 0) - frequency_penalty * count + bias."""
    if not params.adjusts_logits:
        return logits
    logits = logits.clone()
    counts = Counter(generated)
    if counts:
        ids = torch.tensor(list(counts), device=logits.device)
        n = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
        logits[:, ids] -= params.presence_penalty + params.frequency_penalty * n
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=logits.device)
        logits[:, ids] += torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype, device=logits.device)
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(distribution(logits, params), 1, generator=generator).squeeze(-1)


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [B, V] -> the probabilities [B, V] that sampling draws from (temperature > 0): after
    temperature, top-k, min-p and top-p."""
    # In float64, shifted so that the top logit is 0: a temperature near 0 (down to float64's smallest)
    # then tends to greedy rather than dividing by a temperature that float32 rounds to 0 (NaN).
    logits = logits.double()
    logits = ((logits - logits.max(dim=-1, keepdim=True).values) / params.temperature).float()
    if params.top_k is not None:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if params.min_p is not None:
        probs = probs.masked_fill(probs < params.min_p * probs.max(dim=-1, keepdim=True).values, 0)
    if params.top_p is not None:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token if the mass before it is still short of top_p, and the top token always (a top_p
        # so small that it rounds to 0 in the logits' dtype would drop it too).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p * sorted_probs.sum(-1, keepdim=True)
        drop[..., 0] = False
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0))
    return probs
