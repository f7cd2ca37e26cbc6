"""The MoE experts through the fused MXFP4 kernel: slots sorted by expert, two grouped matmuls."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from gptoss.kernels import cpu_kernels

# The AVX-512 path scales bf16 weights by adding to their exponent field, which stays exact while the
# result is a normal bf16 number: E8M0 scales 2..252 (real checkpoints sit near 120).
SAFE_SCALES = (2, 252)


def kernel_applies(experts) -> bool:
    """Whether `experts` (a gptoss Experts module) can take the fused kernel: MXFP4 with biases (as
    GPT-OSS ships them), on the CPU, in range."""
    if not experts.quantized or experts.gate_up_proj_bias is None:
        return False
    if experts.gate_up_proj_blocks.device.type != "cpu" or cpu_kernels() is None:
        return False
    in_range = all(SAFE_SCALES[0] <= int(s.min()) and int(s.max()) <= SAFE_SCALES[1]
                   for s in (experts.gate_up_proj_scales, experts.down_proj_scales))
    if not in_range:
        warnings.warn(f"gptoss: MXFP4 scales outside {SAFE_SCALES[0]}..{SAFE_SCALES[1]}: these experts keep the "
                      f"(slower) reference path")
    return in_range


# Experts with at least this many slots in a step take "dequantize to bf16, then a bf16 GEMM" instead of
# the fused kernel: decoding the weight once costs about what the fused kernel spends on ~10 slots, and
# torch's GEMM (oneDNN, AMX where the CPU has it) is far faster per token. Prefill chunks hit it; decode never.
GEMM_MIN_SLOTS = 16


def fused_experts(experts, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
    """Same contract as Experts.forward: x [N, H], expert_ids / expert_weights [N, k] -> [N, H]."""
    N, k = expert_ids.shape
    flat = expert_ids.flatten()                                     # slot s = token * k + j
    order = flat.argsort(stable=True)                               # slots grouped by expert
    token = order // k
    counts = torch.bincount(flat, minlength=experts.gate_up_proj_blocks.shape[0])
    h = _project(experts, "gate_up_proj", x[token], counts)        # [S, 2I] fp32
    y = _project(experts, "down_proj", experts.swiglu(h).to(x.dtype), counts)  # [S, H] fp32
    y = y * expert_weights.flatten()[order, None]
    return torch.zeros(N, y.shape[1]).index_add_(0, token, y).to(x.dtype)


def _project(experts, name: str, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """xs [S, in] sorted by expert (counts [E] slots each) through weight `name` plus its bias -> [S, out] fp32."""
    kernels = cpu_kernels()
    blocks, scales, bias = (getattr(experts, f"{name}_{part}") for part in ("blocks", "scales", "bias"))
    gemm = (counts >= GEMM_MIN_SLOTS) if xs.dtype == torch.bfloat16 else torch.zeros_like(counts, dtype=torch.bool)
    if not gemm.any():
        return kernels.moe_matmul(xs, blocks, scales, bias, F.pad(counts.cumsum(0), (1, 0)))
    starts = F.pad(counts.cumsum(0), (1, 0)).tolist()
    out = torch.empty(xs.shape[0], blocks.shape[1])
    for e in gemm.nonzero().flatten().tolist():
        rows = slice(starts[e], starts[e + 1])
        out[rows] = F.linear(xs[rows], kernels.dequantize_bf16(blocks[e], scales[e]), bias[e].to(xs.dtype)).float()
    small = torch.repeat_interleave(~gemm, counts)                 # slots of the other experts
    if small.any():
        rest = counts.masked_fill(gemm, 0)
        out[small] = kernels.moe_matmul(xs[small], blocks, scales, bias, F.pad(rest.cumsum(0), (1, 0)))
    return out
