"""Qwen3-MoE weights in our model, to check that the config fields really express that architecture.

transformers' Qwen3MoeForCausalLM names its router `mlp.gate` (ours: `mlp.router`) and already keeps
the experts as ours, `mlp.experts.gate_up_proj` [E, 2I, H] with the gate in the first I rows and
`mlp.experts.down_proj` [E, H, I]; every other name (q_norm and k_norm included) is the same. So the
conversion is one rename, and `ModelConfig.from_qwen3_moe_config` supplies the fields.
"""

from __future__ import annotations

import torch

from gptoss.model.config import ModelConfig
from gptoss.model.transformer import Transformer

QWEN3_RENAMES = {".mlp.gate.weight": ".mlp.router.weight"}


def from_qwen3_moe_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Qwen3MoeForCausalLM state_dict under our parameter names."""
    def ours(name: str) -> str:
        for theirs, mine in QWEN3_RENAMES.items():
            if name.endswith(theirs):
                return name[: -len(theirs)] + mine
        return name

    return {ours(name): tensor for name, tensor in state.items()}


def from_qwen3_moe(hf_model) -> Transformer:
    """Our Transformer holding the weights of a transformers Qwen3MoeForCausalLM (shared, not copied)."""
    cfg = ModelConfig.from_qwen3_moe_config(hf_model.config.to_dict(), name="qwen3_moe")
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(from_qwen3_moe_state_dict(hf_model.state_dict()), strict=True, assign=True)
    if cfg.tie_embeddings:  # assign=True replaced the shared parameter by two tensors: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
