"""MXFP4, the format GPT-OSS ships its expert weights in.

A block is 32 FP4 (e2m1) values that share one E8M0 scale byte:
    value = FP4_VALUES[nibble] * 2 ** (scale - 127)
The 32 nibbles are packed into 16 bytes, low nibble first: element 2j is byte j & 0xF and element
2j + 1 is byte j >> 4. Blocks run along the input (K) dimension of a weight, so a weight [rows, K]
is stored as blocks [rows, K / 32, 16] (uint8) and scales [rows, K / 32] (uint8): 4.25 bits a weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32  # values per block
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """blocks [..., rows, K/32, 16] uint8, scales [..., rows, K/32] uint8 -> [..., rows, K] in `dtype`.

    Exact: every FP4 value times a power of two is representable in bf16 and fp32.
    """
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    # One lookup per byte: byte b -> (value of its low nibble, value of its high nibble).
    pairs = torch.stack((lut.repeat(16), lut.repeat_interleave(16)), dim=-1)          # [256, 2]
    values = pairs[blocks.int()].view(*blocks.shape[:-1], BLOCK)                       # [..., rows, K/32, 32]
    scale = torch.exp2(scales.float() - SCALE_BIAS).to(dtype).unsqueeze(-1)
    return (values * scale).flatten(-2)                                               # [..., rows, K]


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., rows, K] float -> (blocks, scales), rounding each value to the nearest FP4 step.

    The shared exponent is the smallest that fits the block's largest magnitude within FP4's 6.0,
    as the OCP MX spec prescribes; so quantize(dequantize(b, s)) reproduces the same values.
    """
    *lead, k = weight.shape
    if k % BLOCK:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of {BLOCK}, got {k}")
    w = weight.float().reshape(*lead, k // BLOCK, BLOCK)
    amax = w.abs().amax(dim=-1, keepdim=True)
    # Smallest e with amax / 2**e <= 6; all-zero blocks take the smallest scale.
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-SCALE_BIAS, 127)
    exponent = torch.where(amax > 0, exponent, torch.full_like(exponent, -SCALE_BIAS))
    scaled = w / torch.exp2(exponent)                                 # now within [-6, 6]
    magnitudes = torch.tensor(FP4_VALUES[:8], device=w.device)
    nearest = (scaled.abs().unsqueeze(-1) - magnitudes).abs().argmin(dim=-1)  # 0..7
    codes = (nearest | ((scaled < 0).long() << 3)).to(torch.uint8)   # bit 3 is the sign
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (exponent.squeeze(-1) + SCALE_BIAS).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


@dataclass(frozen=True)
class MXFP4Weight:
    """A weight [..., rows, K] held packed: blocks [..., rows, K/32, 16] and scales [..., rows, K/32] (uint8).
    Indexing picks along the leading dimensions (an expert of [E, rows, K])."""

    blocks: torch.Tensor
    scales: torch.Tensor

    def __getitem__(self, index) -> "MXFP4Weight":
        return MXFP4Weight(self.blocks[index], self.scales[index])

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return dequantize(self.blocks, self.scales, dtype)
