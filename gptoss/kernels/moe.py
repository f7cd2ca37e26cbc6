"""The MoE experts through the fused MXFP4 kernel: slots sorted by expert, two grouped matmuls."""

from __future__ import annotations

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
    return all(SAFE_SCALES[0] <= int(s.min()) and int(s.max()) <= SAFE_SCALES[1]
               for s in (experts.gate_up_proj_scales, experts.down_proj_scales))


def fused_experts(experts, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
    """Same contract as Experts.forward: x [N, H], expert_ids / expert_weights [N, k] -> [N, H]."""
    kernels = cpu_kernels()
    N, k = expert_ids.shape
    flat = expert_ids.flatten()                                     # slot s = token * k + j
    order = flat.argsort(stable=True)                               # slots grouped by expert
    token = order // k
    counts = torch.bincount(flat, minlength=experts.gate_up_proj_blocks.shape[0])
    offsets = F.pad(counts.cumsum(0), (1, 0))                       # [E + 1]
    h = kernels.moe_matmul(x[token], experts.gate_up_proj_blocks, experts.gate_up_proj_scales,
                           experts.gate_up_proj_bias, offsets)      # [S, 2I] fp32
    y = kernels.moe_matmul(experts.swiglu(h).to(x.dtype), experts.down_proj_blocks, experts.down_proj_scales,
                           experts.down_proj_bias, offsets)         # [S, H] fp32
    y = y * expert_weights.flatten()[order, None]
    return torch.zeros(N, y.shape[1]).index_add_(0, token, y).to(x.dtype)
