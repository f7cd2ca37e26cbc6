"""The MoE experts in PyTorch: the reference that the fused C++ kernel is held to.

An expert's weights are either dense tensors [E, out, in] or MXFP4 (`gptoss.quant.mxfp4.MXFP4Weight`,
blocks and scales); the reference dequantizes one expert at a time, only the experts that are used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gptoss.quant.mxfp4 import MXFP4Weight

ExpertWeight = torch.Tensor | MXFP4Weight  # [E, out, in], dense or packed


@dataclass(frozen=True)
class Activation:
    """The gated activation between an expert's two projections.

    "clamped_swiglu" (GPT-OSS): gate = h[..., 0::2] clamped above at `limit`, linear = h[..., 1::2]
    clamped to +-`limit`, out = gate * sigmoid(alpha * gate) * (linear + 1).
    "swiglu" (Qwen3): silu(gate) * up on the halves [gate | up].
    """

    kind: str
    alpha: float
    limit: float

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """h [N, 2I] -> [N, I]."""
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        gate = h[..., 0::2].clamp(max=self.limit)
        linear = h[..., 1::2].clamp(-self.limit, self.limit)
        return gate * torch.sigmoid(self.alpha * gate) * (linear + 1)


def expert_weight(weight: ExpertWeight, expert: int, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] weight of one expert in `dtype`."""
    if isinstance(weight, MXFP4Weight):
        return weight[expert].dequantize(dtype)
    return weight[expert].to(dtype)


def experts_reference(x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
                      gate_up: ExpertWeight, gate_up_bias: torch.Tensor | None, down: ExpertWeight,
                      down_bias: torch.Tensor | None, activation: Activation) -> torch.Tensor:
    """x [N, H], expert_ids and expert_weights [N, k] -> [N, H], the weighted sum over the k experts."""
    out = torch.zeros_like(x)
    for expert in expert_ids.unique().tolist():
        token, slot = (expert_ids == expert).nonzero(as_tuple=True)
        h = F.linear(x[token], expert_weight(gate_up, expert, x.dtype),
                     None if gate_up_bias is None else gate_up_bias[expert])
        y = F.linear(activation(h), expert_weight(down, expert, x.dtype),
                     None if down_bias is None else down_bias[expert])
        out.index_add_(0, token, y * expert_weights[token, slot, None].to(x.dtype))
    return out
