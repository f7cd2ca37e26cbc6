"""Attention with per-head sinks and a sliding window, over key blocks, in PyTorch.

Keys are visited in blocks of `KEY_BLOCK`, so a chunk of queries against a long context never holds a
[T, S] score matrix or mask for the whole context. Two ways through the blocks (`gptoss.kernels.ops.attend`
chooses between them and the C++ decode kernel):

- `attend_explicit`, the reference, written out: a running maximum, denominator and weighted sum per
  query (the flash-attention recurrence), the sink entering as the recurrence's starting state: a
  column of logit `sink` with no value vector, exactly the extra softmax column of the reference
  formulation. Used for decode (a few queries), where it is the faster, and for training.
- `attend_flash`, for prefill chunks: torch's fused CPU flash-attention kernel per key block, which
  also returns each query's log-sum-exp; the blocks and the sink are then combined by those
  log-sum-exps (the sink is one more "block" with log-sum-exp `sink` and output 0).
"""

from __future__ import annotations

import math

import torch

KEY_BLOCK = 1024
# torch's fused CPU flash-attention kernel (with the log-sum-exp output that merging blocks needs);
# None in a torch build without it.
flash_kernel = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def visible_keys(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """q_pos [B, T], k_pos [B, S] -> bool [B, T, S]: causal, banded to `window` keys on sliding layers.

    A negative key position marks an empty cache slot or padding: never visible.
    """
    q, k = q_pos.unsqueeze(-1), k_pos.unsqueeze(-2)
    visible = (k <= q) & (k >= 0)
    if window is not None:
        visible &= q - k < window  # q - window + 1 <= k <= q: `window` keys, the query's own included
    return visible


def attend_explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
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


def attend_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                 window: int | None, sinks: torch.Tensor | None, key_block: int = KEY_BLOCK) -> torch.Tensor:
    """`attend_explicit`'s contract through torch's fused CPU flash-attention kernel, one call per key block. The kernel
    wants as many KV heads as query heads, so each block's keys and values are repeated G times."""
    B, Hkv, G, T, D = q.shape
    queries = q.reshape(B, Hkv * G, T, D)
    outputs, lse = [], []
    for start in range(0, k.shape[1], key_block):
        kb = k[:, start:start + key_block].transpose(1, 2).repeat_interleave(G, dim=1).to(q.dtype)  # [B, Hq, S', D]
        vb = v[:, start:start + key_block].transpose(1, 2).repeat_interleave(G, dim=1).to(q.dtype)
        visible = visible_keys(q_pos, k_pos[:, start:start + key_block], window)[:, None]  # [B, 1, T, S']
        mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
        out, block_lse = flash_kernel(queries, kb, vb, attn_mask=mask, scale=1 / math.sqrt(D))
        # A query that sees nothing in this block gets an undefined row from the kernel: weight 0 here.
        blind = ~visible.any(-1)                                                        # [B, 1, T]
        outputs.append(out.float().masked_fill_(blind[..., None], 0.0))
        lse.append(block_lse.masked_fill(blind, float("-inf")))
    lse = torch.stack(lse)                                                             # [blocks, B, Hq, T]
    sink = (sinks.float().view(1, -1, 1) if sinks is not None else lse.new_tensor(float("-inf"))).expand(lse.shape[1:])
    top = torch.maximum(lse.amax(0), sink)
    top = top.masked_fill(top == float("-inf"), 0)  # queries that see nothing at all
    weights = torch.exp(lse - top)
    denominator = weights.sum(0) + torch.exp(sink - top)
    out = sum(o * w[..., None] for o, w in zip(outputs, weights))
    return (out / denominator.clamp(min=1e-30)[..., None]).view(B, Hkv, G, T, D).to(v.dtype)
