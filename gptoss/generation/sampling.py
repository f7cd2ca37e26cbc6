"""Turning logits into the next token: greedy, or temperature with top-k, top-p and min-p filters."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptoss.errors import GptossError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0      # 0 = greedy
    top_k: int | None = None      # keep the k most likely tokens
    top_p: float | None = None    # keep the smallest set whose probability reaches p
    min_p: float | None = None    # drop tokens below min_p x the top token's probability
    seed: int | None = None       # makes sampled runs reproducible

    def __post_init__(self):
        if self.temperature < 0:
            raise GptossError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise GptossError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GptossError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise GptossError(f"min_p must be in [0, 1], got {self.min_p}")

    def generator(self, device: str | torch.device = "cpu") -> torch.Generator | None:
        """A generator for `sample` on `device` (where the logits live), or None when unseeded."""
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k is not None:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if params.min_p is not None:
        probs = probs.masked_fill(probs < params.min_p * probs.max(dim=-1, keepdim=True).values, 0)
    if params.top_p is not None:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token if the mass before it is still short of top_p (so the top token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p * sorted_probs.sum(-1, keepdim=True)
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
