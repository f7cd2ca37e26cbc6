"""The two checkpoint layouts GPT-OSS is published in, described once.

`model_tensor_specs` lists the tensors our model holds (Hugging Face names, our shapes);
`checkpoint_tensor_specs` lists what a checkpoint directory must contain in each layout, and the
`ORIGINAL_*` tables map OpenAI's `original/` names onto ours. Reading (checkpoint.py) and
writing (random_checkpoint.py) both work from these tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptoss.model.config import ConfigError, ModelConfig
from gptoss.weights import mxfp4

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


def checkpoint_tensor_specs(cfg: ModelConfig, layout: str, quantized_experts: bool) -> dict[str, TensorSpec]:
    """What a checkpoint directory of `layout` holds for `cfg`, by the checkpoint's own names."""
    ours = model_tensor_specs(cfg, quantized_experts)
    if layout == HF:
        if quantized_experts:
            return ours
        # transformers writes dense experts transposed, as [E, in, out].
        return {name: TensorSpec((s.shape[0], s.shape[2], s.shape[1]), s.kind) if is_dense_expert(name) else s
                for name, s in ours.items()}
    if not quantized_experts:
        raise ValueError("OpenAI's original layout stores experts in MXFP4 only")
    specs = {orig: ours[name] for orig, name in ORIGINAL_GLOBAL_NAMES.items()}
    for i in range(cfg.num_layers):
        specs |= {f"block.{i}.{orig}": ours[f"model.layers.{i}.{name}"] for orig, name in ORIGINAL_BLOCK_NAMES.items()}
        qkv_rows = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        specs[f"block.{i}.attn.qkv.weight"] = _float(qkv_rows, cfg.hidden_size)
        specs[f"block.{i}.attn.qkv.bias"] = _float(qkv_rows)
    return specs


def is_dense_expert(name: str) -> bool:
    return name.endswith(("experts.gate_up_proj", "experts.down_proj"))


def is_norm(name: str) -> bool:
    """Norm scales stay fp32 whatever the model dtype, as in both reference implementations."""
    return name.endswith("norm.weight")
