"""Int8 blocks: the optional format of the dense linear layers (attention projections, unembedding),
chosen at load time (`load_model(..., int8_dense=True)`, `gptoss ... --int8`).

Each row of a weight [N, K] is cut into blocks of 32 values that share one fp32 scale, absmax / 127;
a value is stored as round(w / scale), an int8 in [-127, 127]. 1.125 bytes a weight instead of bf16's
2, so a gpt-oss-20b decode step reads 2.64 GB instead of 3.71 (the experts stay MXFP4). The experts'
activations are already rounded to int8 by the fused kernel; this rounds the dense weights as well,
like llama.cpp's Q8_0 (which has one fp16 scale per 32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32


def quantize(weight: torch.Tensor, rows_at_once: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float, K a multiple of 32 -> (values int8 [N, K], scales fp32 [N, K/32]). Rows are done
    `rows_at_once` at a time, so an unembedding matrix never exists in fp32 all at once."""
    n, k = weight.shape
    if k % BLOCK:
        raise ValueError(f"int8 blocks need an input size divisible by {BLOCK}, got {k}")
    values = torch.empty(n, k, dtype=torch.int8, device=weight.device)
    scales = torch.empty(n, k // BLOCK, dtype=torch.float32, device=weight.device)
    for start in range(0, n, rows_at_once):
        blocks = weight[start:start + rows_at_once].float().view(-1, k // BLOCK, BLOCK)
        scales[start:start + rows_at_once] = blocks.abs().amax(-1) / 127
        step = scales[start:start + rows_at_once].clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(-1)
        values[start:start + rows_at_once] = torch.round(blocks / step).view(-1, k).to(torch.int8)
    return values, scales


def dequantize(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    n, k = values.shape
    return (values.float().view(n, k // BLOCK, BLOCK) * scales.unsqueeze(-1)).view(n, k).to(dtype)


@dataclass(frozen=True)
class Int8Weight:
    """A weight [N, K] held as int8 blocks: values int8 [N, K] and scales fp32 [N, K/32]."""

    values: torch.Tensor
    scales: torch.Tensor

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> "Int8Weight":
        return cls(*quantize(weight))

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return dequantize(self.values, self.scales, dtype)
