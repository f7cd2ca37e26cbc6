"""Static KV-cache buffers: the full context on full-attention layers, a ring on sliding ones.

A sliding layer's query at position q sees keys q - window + 1 .. q. While a chunk of up to `chunk`
tokens is written, its first query still needs the `window - 1` keys before the chunk, so a ring of
`window - 1 + chunk` slots always holds every key any query of the chunk can see, whatever the
context length. Position p lives in slot p on full layers and p % ring on sliding ones.

Each row of the batch has its own positions. A negative position marks padding (left-padded prompts
of different lengths): it is written to a spare last slot that is never visible, so padding never
overwrites a real key.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from gptoss.errors import GptossError
from gptoss.model.config import ModelConfig


# Prompts are prefilled in chunks of this many tokens. A chunk decodes each MXFP4 expert weight it routes
# to once for all its tokens, so bigger chunks amortise that decoding (llama.cpp's default micro-batch is
# 512 as well); sliding layers keep window - 1 + chunk slots.
PREFILL_CHUNK = 512


class ContextError(GptossError):
    """More tokens than the model's context or the cache can hold."""


@dataclass(frozen=True)
class CacheGeometry:
    """Slots per layer kind for a config, a context length and the largest chunk written at once."""

    full_slots: int
    sliding_slots: int
    num_full: int
    num_sliding: int

    @classmethod
    def of(cls, cfg: ModelConfig, context: int, chunk: int) -> "CacheGeometry":
        num_sliding = sum(cfg.is_sliding(i) for i in range(cfg.num_layers))
        return cls(full_slots=context, sliding_slots=min(context, cfg.sliding_window - 1 + chunk),
                   num_full=cfg.num_layers - num_sliding, num_sliding=num_sliding)


def allocated_kv_bytes(cfg: ModelConfig, context: int, batch: int = 1, chunk: int = PREFILL_CHUNK,
                       dtype_bytes: int = 2) -> dict:
    """The K and V bytes a KVCache allocates for `batch` sequences of `context` tokens, per layer kind and in
    total (sliding layers: window - 1 + chunk slots; `gptoss.analysis.compare.windowed_kv_bytes` is the
    textbook figure, exactly the window)."""
    geo = CacheGeometry.of(cfg, context, chunk)
    per_slot = 2 * cfg.num_kv_heads * cfg.head_dim * dtype_bytes * batch  # K and V
    full = geo.num_full * geo.full_slots * per_slot
    sliding = geo.num_sliding * geo.sliding_slots * per_slot
    return {"full_layers": full, "sliding_layers": sliding, "total": full + sliding}


class KVCache:
    def __init__(self, cfg: ModelConfig, batch: int, context: int, chunk: int = PREFILL_CHUNK,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
        if context > cfg.max_context:
            raise ContextError(f"a cache of {context} tokens exceeds the model's context of {cfg.max_context}")
        self.context, self.chunk = context, chunk
        geo = CacheGeometry.of(cfg, context, chunk)
        self.slots = [geo.sliding_slots if cfg.is_sliding(i) else geo.full_slots for i in range(cfg.num_layers)]
        shape = (batch, cfg.num_kv_heads, cfg.head_dim)
        # One spare slot at the end of each buffer takes the writes of padding tokens.
        self.keys = [torch.zeros(batch, n + 1, *shape[1:], dtype=dtype, device=device) for n in self.slots]
        self.values = [torch.zeros_like(k) for k in self.keys]
        # Which position each slot holds (-1: empty), one buffer per distinct slot count.
        self.slot_positions = {n: torch.full((batch, n + 1), -1, dtype=torch.long, device=device)
                               for n in set(self.slots)}
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # next position of each row
        self._write_slots: dict[int, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))

    def next_positions(self, num_tokens: int) -> torch.Tensor:
        """[B, T]: the positions that continue each row."""
        return self.lengths[:, None] + torch.arange(num_tokens, device=self.lengths.device)

    def begin(self, positions: torch.Tensor) -> None:
        """Called once per forward with the new tokens' positions [B, T] (negative = padding)."""
        if positions.shape[1] > self.chunk and min(self.slots) < self.context:
            raise ValueError(f"chunk of {positions.shape[1]} tokens exceeds the cache's chunk size {self.chunk}")
        if int(positions.max()) >= self.context:
            raise ContextError(f"position {int(positions.max())} is past the cache's context of {self.context} tokens")
        padding = positions < 0
        self._write_slots = {}
        for n, slot_positions in self.slot_positions.items():
            slots = torch.where(padding, n, positions % n)
            slot_positions.scatter_(1, slots, positions.masked_fill(padding, -1))
            self._write_slots[n] = slots
        torch.maximum(self.lengths, positions.max(dim=1).values + 1, out=self.lengths)  # in place: see rows()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Writes k, v [B, T, Hkv, D] of `layer`; returns its keys, values [B, S, Hkv, D] and their positions [B, S]."""
        n = self.slots[layer]
        slots = self._write_slots[n]
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.keys[layer][rows, slots] = k.to(self.keys[layer].dtype)
        self.values[layer][rows, slots] = v.to(self.values[layer].dtype)
        # Full layers: only the slots written so far; sliding: the whole ring. The spare slot is left out.
        used = min(n, int(self.lengths.max()))
        return self.keys[layer][:, :used], self.values[layer][:, :used], self.slot_positions[n][:, :used]

    def rows(self, start: int, stop: int) -> "KVCache":
        """The cache of rows start..stop-1, sharing this cache's buffers: what it writes lands here.

        A server keeps one row per request: it prefills a new request alone through `rows(i, i + 1)`,
        decodes the busy rows through `rows(0, last busy + 1)`, and frees a row with `rows(i, i + 1).reset()`.
        Slicing the batch dimension gives views, so nothing is copied.
        """
        view = copy.copy(self)
        view.keys = [k[start:stop] for k in self.keys]
        view.values = [v[start:stop] for v in self.values]
        view.slot_positions = {n: p[start:stop] for n, p in self.slot_positions.items()}
        view.lengths = self.lengths[start:stop]
        view._write_slots = {}
        return view

    def reset(self) -> None:
        self.lengths.zero_()
        for slot_positions in self.slot_positions.values():
            slot_positions.fill_(-1)
