"""The two checkpoint layouts GPT-OSS is published in, described once.

`model_tensor_specs` lists the tensors our model holds (Hugging Face names, our shapes).
`checkpoint_plan` lists what a checkpoint directory holds in each layout, tensor by tensor, with how
each maps onto ours: the same tensor under another name (OpenAI's `original/` names, the `ORIGINAL_*`
tables), several of ours fused along rows (original/'s attn.qkv), or ours transposed (transformers'
dense experts). Reading and validating (checkpoint.py) and writing (random_checkpoint.py) all work
from that plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from gptoss.model.config import ConfigError, ModelConfig
from gptoss.quant import mxfp4

HF, ORIGINAL = "hf", "original"
LAYOUTS = (HF, ORIGINAL)


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    kind: str  # "float" (bf16 / fp16 / fp32 accepted) or "uint8" (MXFP4 blocks and scales)


def _float(*shape: int) -> TensorSpec:
    return TensorSpec(tuple(shape), "float")


def _mxfp4(experts: int, rows: int, cols: int) -> dict[str, TensorSpec]:
    if cols % mxfp4.BLOCK:
        raise ConfigError(f"MXFP4 experts need hidden_size and intermediate_size divisible by {mxfp4.BLOCK}, "
                          f"got a width of {cols}")
    groups = cols // mxfp4.BLOCK
    return {"blocks": TensorSpec((experts, rows, groups, 16), "uint8"),
            "scales": TensorSpec((experts, rows, groups), "uint8")}


def model_tensor_specs(cfg: ModelConfig, quantized_experts: bool) -> dict[str, TensorSpec]:
    """The tensors of `Transformer(cfg, quantized_experts)`, by state_dict name, experts as [E, out, in]."""
    V, H, E, I = cfg.vocab_size, cfg.hidden_size, cfg.num_experts, cfg.intermediate_size
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    specs = {"model.embed_tokens.weight": _float(V, H), "model.norm.weight": _float(H), "lm_head.weight": _float(V, H)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        specs |= {
            p + "input_layernorm.weight": _float(H),
            p + "self_attn.q_proj.weight": _float(q_rows, H), p + "self_attn.q_proj.bias": _float(q_rows),
            p + "self_attn.k_proj.weight": _float(kv_rows, H), p + "self_attn.k_proj.bias": _float(kv_rows),
            p + "self_attn.v_proj.weight": _float(kv_rows, H), p + "self_attn.v_proj.bias": _float(kv_rows),
            p + "self_attn.o_proj.weight": _float(H, q_rows), p + "self_attn.o_proj.bias": _float(H),
            p + "self_attn.sinks": _float(cfg.num_heads),
            p + "post_attention_layernorm.weight": _float(H),
            p + "mlp.router.weight": _float(E, H), p + "mlp.router.bias": _float(E),
            p + "mlp.experts.gate_up_proj_bias": _float(E, 2 * I),
            p + "mlp.experts.down_proj_bias": _float(E, H),
        }
        for name, (rows, cols) in {"gate_up_proj": (2 * I, H), "down_proj": (H, I)}.items():
            if quantized_experts:
                specs |= {f"{p}mlp.experts.{name}_{part}": spec for part, spec in _mxfp4(E, rows, cols).items()}
            else:
                specs[f"{p}mlp.experts.{name}"] = _float(E, rows, cols)
    return specs


# OpenAI original/ name -> our name, per block (prefix "block.N." -> "model.layers.N.") and global.
ORIGINAL_GLOBAL_NAMES = {
    "embedding.weight": "model.embed_tokens.weight",
    "norm.scale": "model.norm.weight",
    "unembedding.weight": "lm_head.weight",
}
ORIGINAL_BLOCK_NAMES = {
    "attn.norm.scale": "input_layernorm.weight",
    "attn.sinks": "self_attn.sinks",
    "attn.out.weight": "self_attn.o_proj.weight",
    "attn.out.bias": "self_attn.o_proj.bias",
    "mlp.norm.scale": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.router.weight",
    "mlp.gate.bias": "mlp.router.bias",
    "mlp.mlp1_weight.blocks": "mlp.experts.gate_up_proj_blocks",
    "mlp.mlp1_weight.scales": "mlp.experts.gate_up_proj_scales",
    "mlp.mlp1_bias": "mlp.experts.gate_up_proj_bias",
    "mlp.mlp2_weight.blocks": "mlp.experts.down_proj_blocks",
    "mlp.mlp2_weight.scales": "mlp.experts.down_proj_scales",
    "mlp.mlp2_bias": "mlp.experts.down_proj_bias",
}
# original/ fuses q, k and v row-wise into attn.qkv: rows [q | k | v].
ORIGINAL_FUSED_QKV = {"attn.qkv.weight": "weight", "attn.qkv.bias": "bias"}


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as a checkpoint stores it (`name`, `spec`) and the tensors of ours it holds: one, or
    several stacked along rows (`rows` of each), or one transposed from [E, in, out] to [E, out, in]."""

    name: str
    spec: TensorSpec
    ours: tuple[str, ...]
    rows: tuple[int, ...] = ()
    transposed: bool = False

    def to_ours(self, stored: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """(our name, tensor) for each of ours, as views of the stored tensor (nothing is copied)."""
        if self.transposed:
            yield self.ours[0], stored.transpose(1, 2)
        elif self.rows:
            yield from zip(self.ours, stored.split(list(self.rows)))
        else:
            yield self.ours[0], stored

    def from_ours(self, ours: list[torch.Tensor]) -> torch.Tensor:
        """The stored tensor made from ours (in the order of `self.ours`)."""
        if self.transposed:
            return ours[0].transpose(1, 2)
        return torch.cat(ours) if self.rows else ours[0]


def checkpoint_plan(cfg: ModelConfig, layout: str, quantized_experts: bool) -> list[StoredTensor]:
    """What a checkpoint directory of `layout` holds for `cfg`, in a natural order."""
    ours = model_tensor_specs(cfg, quantized_experts)
    if layout == HF:
        # transformers' save_pretrained writes dense experts as [E, in, out]; we keep [E, out, in].
        return [StoredTensor(name, TensorSpec((s.shape[0], s.shape[2], s.shape[1]), s.kind), (name,), transposed=True)
                if is_dense_expert(name) else StoredTensor(name, s, (name,)) for name, s in ours.items()]
    if not quantized_experts:
        raise ValueError("OpenAI's original layout stores experts in MXFP4 only")
    plan = [StoredTensor(orig, ours[name], (name,)) for orig, name in ORIGINAL_GLOBAL_NAMES.items()]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        plan += [StoredTensor(f"block.{i}.{orig}", ours[p + name], (p + name,)) for orig, name in ORIGINAL_BLOCK_NAMES.items()]
        for orig, kind in ORIGINAL_FUSED_QKV.items():
            parts = tuple(f"{p}self_attn.{proj}_proj.{kind}" for proj in "qkv")
            rows = tuple(ours[n].shape[0] for n in parts)
            plan.append(StoredTensor(f"block.{i}.{orig}", _float(sum(rows), *ours[parts[0]].shape[1:]), parts, rows))
    return plan


def checkpoint_tensor_specs(cfg: ModelConfig, layout: str, quantized_experts: bool) -> dict[str, TensorSpec]:
    """What a checkpoint directory of `layout` holds for `cfg`, by the checkpoint's own names."""
    return {t.name: t.spec for t in checkpoint_plan(cfg, layout, quantized_experts)}


def is_dense_expert(name: str) -> bool:
    return name.endswith(("experts.gate_up_proj", "experts.down_proj"))


def is_norm(name: str) -> bool:
    """Norm scales stay fp32 whatever the model dtype, as in both reference implementations."""
    return name.endswith("norm.weight")
