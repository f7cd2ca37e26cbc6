"""The ops the model calls, and the one place that decides which implementation computes each.

    linear(x, weight, bias)                          weight: a float tensor [N, K] or an Int8Weight
    experts(x, expert_ids, expert_weights, ...)      the MoE expert step: k experts per token, weighted
    attend(q, k, v, q_pos, k_pos, window, sinks)     attention with sinks and a sliding window

Each has a pure-PyTorch reference (F.linear, `experts.experts_reference`, `attention.attend_explicit`)
and faster paths, taken only where they apply (CPU tensors, dtypes, sizes) and only while the C++
kernels are switched on for the caller (`using_kernels`; `Transformer.forward` sets it from the model's
own setting, so a model loaded with `kernels=False` runs the reference throughout):

- linear: bf16 activations with at most GEMV_MAX_ROWS rows (decode) take the bf16 or int8 GEMV kernel,
  which streams each weight row once (bf16 with AMX: up to AMX_GEMV_MAX_ROWS rows); more rows (prefill)
  take torch's GEMM, int8 weights dequantized to bf16 by the kernel first.
- experts: MXFP4 weights with biases and the clamped SwiGLU (GPT-OSS as published), bf16 or fp32
  activations: the whole step in one C++ call. fp32 activations take its exact fp32 loop; bf16 ones
  its VNNI loop (activations rounded to int8 per 8 values), except for experts with many slots in the
  step: from AMX_MIN_SLOTS the AMX tiles, without AMX from GEMM_MIN_SLOTS a dequantized torch GEMM.
- attend: from FLASH_MIN_QUERIES queries (prefill chunks), torch's CPU flash kernel per key block,
  kernels on or off (it is torch's own); fewer bf16 queries (decode) the C++ decode kernel, which
  scores only the visible keys; otherwise, and whenever gradients are needed, the explicit recurrence.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F

from gptoss.kernels import cpu_kernels
from gptoss.kernels.attention import attend_explicit, attend_flash, flash_kernel
from gptoss.kernels.experts import Activation, ExpertWeight, experts_reference
from gptoss.quant.int8 import Int8Weight
from gptoss.quant.mxfp4 import MXFP4Weight

# Rows of activations up to which a bf16 or int8 linear layer is a GEMV (a decode step of a small batch, a
# speculative pass): the kernel reads each weight once for all rows, where torch's GEMM streams slower.
# Where the CPU has AMX (and K is a multiple of 32) a bf16 layer stays a GEMV up to AMX_GEMV_MAX_ROWS, the
# rows past GEMV_MAX_ROWS in AMX tiles (docs/benchmarks.md: 1.2-1.4x torch's GEMM at 6 and 8 rows).
GEMV_MAX_ROWS = 4
AMX_GEMV_MAX_ROWS = 8
# Queries per KV head row from which torch's fused flash kernel beats the explicit recurrence on the CPU.
FLASH_MIN_QUERIES = 16
# Slots of one expert in a step (bf16 models) from which the VNNI loop, whose work grows with the slots,
# gives way: from AMX_MIN_SLOTS to AMX tiles (each weight decoded once to bf16 tiles) where the CPU has
# AMX; without AMX, from GEMM_MIN_SLOTS to one torch GEMM on the dequantized weight. Prefill chunks
# reach them; decode (one slot per expert) never.
AMX_MIN_SLOTS = 8
GEMM_MIN_SLOTS = 32

_kernels_on: contextvars.ContextVar[bool] = contextvars.ContextVar("gptoss_kernels_on", default=False)


@contextlib.contextmanager
def using_kernels(enabled: bool):
    """Within this block the ops may take the C++ kernels (where they compiled); outside, the reference."""
    token = _kernels_on.set(enabled)
    try:
        yield
    finally:
        _kernels_on.reset(token)


def _kernels():
    """The compiled kernels if the caller has them on and they could be built, else None."""
    return cpu_kernels() if _kernels_on.get() else None


def linear(x: torch.Tensor, weight: torch.Tensor | Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear: x [..., K], weight [N, K] -> [..., N]."""
    kernels = _kernels()
    rows = x.numel() // x.shape[-1]
    fast = kernels is not None and x.dtype == torch.bfloat16 and x.is_cpu
    if isinstance(weight, Int8Weight):
        if not fast:
            return F.linear(x, weight.dequantize(x.dtype), bias)
        if rows > GEMV_MAX_ROWS:
            return F.linear(x, kernels.dequantize_int8(weight.values, weight.scales), bias)
        return kernels.linear_int8(x.reshape(rows, x.shape[-1]), weight.values, weight.scales,
                                   bias).view(*x.shape[:-1], weight.values.shape[0])
    gemv_rows = AMX_GEMV_MAX_ROWS if fast and x.shape[-1] % 32 == 0 and kernels.has_amx() else GEMV_MAX_ROWS
    if not fast or rows > gemv_rows or weight.dtype != torch.bfloat16:
        return F.linear(x, weight, bias)
    return kernels.linear_bf16(x.reshape(rows, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


def experts(x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
            gate_up: ExpertWeight, gate_up_bias: torch.Tensor | None, down: ExpertWeight,
            down_bias: torch.Tensor | None, activation: Activation) -> torch.Tensor:
    """x [N, H], expert_ids and expert_weights [N, k] -> [N, H], the weighted sum over each token's k experts.
    gate_up [E, 2I, H] and down [E, H, I], dense or MXFP4; biases [E, 2I] and [E, H] or None."""
    kernels = _kernels()
    fused = (kernels is not None and isinstance(gate_up, MXFP4Weight) and isinstance(down, MXFP4Weight)
             and gate_up_bias is not None and down_bias is not None and activation.kind == "clamped_swiglu"
             and x.is_cpu and gate_up.blocks.is_cpu and x.dtype in (torch.bfloat16, torch.float32))
    if not fused:
        return experts_reference(x, expert_ids, expert_weights, gate_up, gate_up_bias, down, down_bias, activation)
    return kernels.moe_experts(x, expert_ids, expert_weights.float(), gate_up.blocks, gate_up.scales, gate_up_bias,
                               down.blocks, down.scales, down_bias, activation.alpha, activation.limit,
                               AMX_MIN_SLOTS, GEMM_MIN_SLOTS)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
           window: int | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """q [B, Hkv, G, T, D]; k, v [B, S, Hkv, D]; q_pos [B, T]; k_pos [B, S] (negative: empty or padding);
    sinks [Hkv * G] or None -> [B, Hkv, G, T, D] in v's dtype. Query head (h, g) reads KV head h."""
    # The flash kernel's log-sum-exp output has no gradient: training (the study) takes the explicit path.
    inference = not (torch.is_grad_enabled() and q.requires_grad)
    if inference and q.is_cpu:
        if flash_kernel is not None and q.shape[3] >= FLASH_MIN_QUERIES:
            return attend_flash(q, k, v, q_pos, k_pos, window, sinks)
        kernels = _kernels()
        if kernels is not None and q.dtype == k.dtype == v.dtype == torch.bfloat16:
            return kernels.attend_decode(q, k, v, q_pos, k_pos, window or 0, sinks)
    return attend_explicit(q, k, v, q_pos, k_pos, window, sinks)
