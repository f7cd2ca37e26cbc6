"""The CPU kernels as the model calls them: the MoE experts through the fused MXFP4 kernels, and the
dense linear layers (bf16, or the optional int8 blocks) through GEMV kernels at decode. Each falls back
to plain PyTorch where the kernels do not apply."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptoss.kernels import cpu_kernels
from gptoss.weights import int8


def kernel_applies(experts) -> bool:
    """Whether `experts` (a gptoss Experts module) can take the fused kernel: MXFP4 with biases and the
    clamped SwiGLU (as GPT-OSS ships them), on the CPU."""
    return (experts.quantized and experts.gate_up_proj_bias is not None and experts.activation == "clamped_swiglu"
            and experts.gate_up_proj_blocks.device.type == "cpu" and cpu_kernels() is not None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear, with the bf16 GEMV kernel for a few rows of bf16 activations on the CPU (decode)."""
    kernels = cpu_kernels()
    rows = x.numel() // x.shape[-1]
    if kernels is None or rows > 4 or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or not x.is_cpu:
        return F.linear(x, weight, bias)
    return kernels.linear_bf16(x.reshape(rows, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


def linear_int8(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear with an int8-block weight (gptoss.weights.int8): the int8 GEMV kernel for a few rows of
    bf16 activations on the CPU; otherwise the weight dequantized to x's dtype (by the kernel for bf16)."""
    kernels = cpu_kernels()
    rows = x.numel() // x.shape[-1]
    if kernels is None or x.dtype != torch.bfloat16 or not x.is_cpu:
        return F.linear(x, int8.dequantize(values, scales, x.dtype), bias)
    if rows > 4:
        return F.linear(x, kernels.dequantize_int8(values, scales), bias)
    return kernels.linear_int8(x.reshape(rows, x.shape[-1]), values, scales, bias).view(*x.shape[:-1], values.shape[0])


# Where an expert's slots in a step (bf16 models) stop going through the VNNI loop, whose work grows with
# the slots: from AMX_MIN_SLOTS the AMX path (where the CPU has AMX) decodes each weight once to bf16
# tiles; without AMX, from GEMM_MIN_SLOTS the weight is dequantized to bf16 for one torch GEMM. Prefill
# chunks hit them; decode (one slot per expert) never.
AMX_MIN_SLOTS = 8
GEMM_MIN_SLOTS = 32


def fused_experts(experts, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
    """Same contract as Experts.forward: x [N, H], expert_ids / expert_weights [N, k] -> [N, H]."""
    return cpu_kernels().moe_experts(
        x, expert_ids, expert_weights.float(),
        experts.gate_up_proj_blocks, experts.gate_up_proj_scales, experts.gate_up_proj_bias,
        experts.down_proj_blocks, experts.down_proj_scales, experts.down_proj_bias,
        experts.alpha, experts.limit, AMX_MIN_SLOTS, GEMM_MIN_SLOTS)
