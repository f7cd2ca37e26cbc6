"""Attention with per-head sinks and a sliding window, over key blocks with an online softmax.

Keys are visited in blocks of `KEY_BLOCK`, keeping a running maximum, denominator and weighted sum
per query (the flash-attention recurrence), so a chunk of queries against a long context never holds
a [T, S] score matrix or mask for the whole context. The sink enters as the recurrence's starting
state: a column of logit `sink` with no value vector, exactly the extra softmax column of the
reference formulation.
"""

from __future__ import annotations

import math

import torch

KEY_BLOCK = 1024


def visible_keys(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """q_pos [B, T], k_pos [B, S] -> bool [B, T, S]: causal, banded to `window` keys on sliding layers.

    A negative key position marks an empty cache slot or padding: never visible.
    """
    q, k = q_pos.unsqueeze(-1), k_pos.unsqueeze(-2)
    visible = (k <= q) & (k >= 0)
    if window is not None:
        visible &= q - k < window  # q - window + 1 <= k <= q: `window` keys, the query's own included
    return visible


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
           window: int | None, sinks: torch.Tensor | None, key_block: int = KEY_BLOCK) -> torch.Tensor:
    """q [B, Hkv, G, T, D]; k, v [B, S, Hkv, D]; q_pos [B, T]; k_pos [B, S]; sinks [Hkv * G] or None
    -> [B, Hkv, G, T, D] in v's dtype. Query head (h, g) reads KV head h. Scores and sums are fp32.

    The G query heads of a KV head and their T positions form one [G * T, D] matrix, so each key block
    is one batched matmul over B * Hkv (a matmul that broadcast K over G would be many tiny GEMMs).
    """
    B, Hkv, G, T, D = q.shape
    queries = q.reshape(B, Hkv, G * T, D).float() * (1 / math.sqrt(D))
    if sinks is None:
        running_max = queries.new_full((B, Hkv, G * T, 1), float("-inf"))
        denominator = queries.new_zeros((B, Hkv, G * T, 1))
    else:
        running_max = sinks.float().view(1, Hkv, G, 1, 1).expand(B, Hkv, G, T, 1).reshape(B, Hkv, G * T, 1)
        denominator = torch.ones_like(running_max)  # exp(sink - running_max)
    out = queries.new_zeros((B, Hkv, G * T, D))
    for start in range(0, k.shape[1], key_block):
        kb = k[:, start:start + key_block].permute(0, 2, 3, 1).float()         # [B, Hkv, D, S']
        vb = v[:, start:start + key_block].permute(0, 2, 1, 3).float()         # [B, Hkv, S', D]
        scores = queries @ kb                                                   # [B, Hkv, G * T, S']
        visible = visible_keys(q_pos, k_pos[:, start:start + key_block], window)   # [B, T, S']
        scores.view(B, Hkv, G, T, -1).masked_fill_(~visible[:, None, None], float("-inf"))
        new_max = torch.maximum(running_max, scores.amax(-1, keepdim=True))
        safe_max = new_max.masked_fill(new_max == float("-inf"), 0)  # rows with nothing visible yet
        weights = torch.exp(scores - safe_max)
        correction = torch.exp(running_max - safe_max)
        denominator = denominator * correction + weights.sum(-1, keepdim=True)
        out = out * correction + weights @ vb  # fp32: bf16 values are rounded only once, at the end
        running_max = new_max
    # Queries that see nothing (padding, with no sink) get zeros rather than 0 / 0.
    return (out / denominator.clamp(min=1e-30)).view(B, Hkv, G, T, D).to(v.dtype)
