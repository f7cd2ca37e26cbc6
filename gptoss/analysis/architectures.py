"""Architectures described for arithmetic, not for running.

An `Architecture` holds what decides a model's size and per-token cost: widths, depth, heads,
experts, which layers slide, and the small extras (biases, sinks, QK-norm, sandwich norms) that a
parameter count must include to land exactly on the published totals. Its fields are `ModelConfig`'s
where the two overlap (same names, same checks: `check_geometry`); it also describes dense models
(num_experts 0) and shared experts, which ModelConfig does not run. GPT-OSS and Qwen3-MoE come
from our `ModelConfig` (which runs both), Gemma 3 from its own reader; the built-ins are excerpts of
the published config.json files, read by the same loader that reads a user's config.json, so they
also exercise the loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gptoss.errors import GptossError
from gptoss.model.config import (FULL, PRESETS, SLIDING, ConfigError, ModelConfig, check_geometry, read_config_json,
                                 sliding_pattern)


class ArchitectureError(GptossError):
    """A model name that is not built in, or a config.json this module cannot describe."""


@dataclass(frozen=True)
class Architecture:
    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int                       # query heads
    num_kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...]         # SLIDING / FULL per layer
    sliding_window: int                  # positions a sliding layer sees and caches; unused if none slides
    num_experts: int                     # 0: a dense MLP instead of experts
    experts_per_token: int               # routed experts per token; 0 when dense
    intermediate_size: int               # width of one expert, or of the dense MLP
    shared_expert_intermediate: int      # width of an always-on expert beside the routed ones; 0: none
    attention_bias: bool                 # q/k/v/o projections carry biases
    attention_sinks: bool                # one learned sink logit per query head
    qk_norm: bool                        # an RMSNorm over head_dim on queries and on keys
    norms_per_layer: int                 # hidden-wide RMSNorms per block: 2 pre-norm, 4 "sandwich"
    expert_bias: bool                    # expert (or dense MLP) projections carry biases
    router_bias: bool
    tie_embeddings: bool                 # the unembedding reuses the embedding table

    def __post_init__(self):
        object.__setattr__(self, "layer_types", tuple(self.layer_types))

        def need(ok: bool, message: str):
            if not ok:
                raise ArchitectureError(f"architecture {self.name!r}: {message}")

        check_geometry(need, self.num_layers, self.layer_types, self.num_heads, self.num_kv_heads, self.sliding_window,
                       self.num_experts, self.experts_per_token)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def num_sliding(self) -> int:
        return self.layer_types.count(SLIDING)

    @property
    def num_full(self) -> int:
        return self.layer_types.count(FULL)

    def attention_pattern(self) -> str:
        """Sliding to full layers in the repeating unit: "1:1" for GPT-OSS, "5:1" for Gemma 3.

        The unit is the shortest prefix that the layer types repeat (a cut-off last unit allowed),
        so Gemma 3's 62 layers still read as 5:1 although 52:10 is what they add up to.
        """
        if not self.num_sliding:
            return "full only"
        if not self.num_full:
            return "sliding only"
        types = self.layer_types
        period = next(p for p in range(1, len(types) + 1)
                      if all(t == types[i % p] for i, t in enumerate(types)))
        unit = types[:period]
        return f"{unit.count(SLIDING)}:{unit.count(FULL)}"

    @classmethod
    def from_model_config(cls, config: ModelConfig, name: str | None = None) -> Architecture:
        """What our model builds for `config`: GPT-OSS, or whatever its comparison fields make of it."""
        return cls(
            name=name or config.name,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            layer_types=config.layer_types,
            sliding_window=config.sliding_window if SLIDING in config.layer_types else 0,
            num_experts=config.num_experts,
            experts_per_token=config.experts_per_token,
            intermediate_size=config.intermediate_size,
            shared_expert_intermediate=0,
            attention_bias=config.attention_bias,
            attention_sinks=config.attention_sinks,
            qk_norm=config.qk_norm,
            norms_per_layer=2,
            expert_bias=config.expert_bias,
            router_bias=config.router_bias,
            tie_embeddings=config.tie_embeddings,
        )

    @classmethod
    def from_config_dict(cls, raw: dict, name: str) -> Architecture:
        """Reads a Hugging Face config.json of a model type in `_READERS` (Qwen3-MoE, Gemma 3)."""
        if raw.get("model_type") == "gemma3":  # multimodal wrapper: the language model is text_config
            raw = {"model_type": "gemma3_text", **raw.get("text_config", {})}
        model_type = raw.get("model_type")
        if model_type not in _READERS:
            raise ArchitectureError(f"{name}: model_type {model_type!r} is not one of {', '.join(SUPPORTED_TYPES)}")
        return _READERS[model_type](raw, name)


def _req(raw: dict, key: str, name: str):
    if raw.get(key) is None:
        raise ArchitectureError(f"{name}: config.json lacks {key}")
    return raw[key]


def _qwen3_moe(raw: dict, name: str) -> Architecture:
    """Qwen3-MoE: read as our model runs it (`ModelConfig.from_qwen3_moe_config`)."""
    try:
        return Architecture.from_model_config(ModelConfig.from_qwen3_moe_config(raw, name), name)
    except ConfigError as e:
        raise ArchitectureError(f"{name}: {e}") from None


# transformers' Gemma3TextConfig defaults: the published Gemma 3 config.json files leave these out
# (google/gemma-3-27b-it states no vocab_size), so the released models are built with them.
_GEMMA3_TEXT_DEFAULTS = {"vocab_size": 262_208, "sliding_window": 4096, "sliding_window_pattern": 6,
                         "tie_word_embeddings": True, "attention_bias": False}


def _gemma3_text(raw: dict, name: str) -> Architecture:
    """Gemma 3's language model: dense gated MLP, QK-norm, 4 norms per block, tied, 5:1 local:global.

    Layer i is global (full) when (i + 1) is a multiple of the pattern length, as in transformers.
    """
    raw = {**_GEMMA3_TEXT_DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
    layers = _req(raw, "num_hidden_layers", name)
    pattern = raw.get("_sliding_window_pattern") or raw["sliding_window_pattern"]
    layer_types = raw.get("layer_types") or sliding_pattern(layers, pattern - 1)
    heads = _req(raw, "num_attention_heads", name)
    return Architecture(
        name=name,
        vocab_size=raw["vocab_size"],
        hidden_size=_req(raw, "hidden_size", name),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=_req(raw, "head_dim", name),
        layer_types=layer_types,
        sliding_window=raw["sliding_window"],
        num_experts=0,
        experts_per_token=0,
        intermediate_size=_req(raw, "intermediate_size", name),
        shared_expert_intermediate=0,
        attention_bias=raw["attention_bias"],
        attention_sinks=False,
        qk_norm=True,
        norms_per_layer=4,
        expert_bias=False,
        router_bias=False,
        tie_embeddings=raw["tie_word_embeddings"],
    )


_READERS = {"qwen3_moe": _qwen3_moe, "gemma3_text": _gemma3_text}
SUPPORTED_TYPES = ("gpt_oss", "OpenAI original/config.json", "qwen3_moe", "gemma3", "gemma3_text")


def load_config_json(path: str | Path) -> Architecture:
    """Any supported config.json (or a folder holding one), named after its folder.

    GPT-OSS configs (Hugging Face gpt_oss, or OpenAI's original/ layout, which has no model_type)
    go through `ModelConfig.from_json_file`, so they are read exactly as the model code reads them.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    name = path.parent.name if path.name == "config.json" else path.stem
    raw = read_config_json(path)
    if raw.get("model_type") in (None, "gpt_oss"):
        return Architecture.from_model_config(ModelConfig.from_json_file(path), name=name)
    return Architecture.from_config_dict(raw, name)


# ---- Published configurations -------------------------------------------------------------------
# Excerpts of the published config.json files: the keys that set size and cost, values as released.

# huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json. The model card: "30.5B in total and 3.3B
# activated", "Non-Embedding: 29.9B"; 48 layers; 32 query and 4 KV heads; 128 experts, 8 activated.
QWEN3_30B_A3B = {
    "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "attention_bias": False,
    "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False,
    "tie_word_embeddings": False,
}

# huggingface.co/Qwen/Qwen3-235B-A22B/blob/main/config.json. The model card: "235B in total and 22B
# activated", "Non-Embedding: 234B"; 94 layers; 64 query and 4 KV heads; 128 experts, 8 activated.
QWEN3_235B_A22B = {
    **QWEN3_30B_A3B, "hidden_size": 4096, "num_hidden_layers": 94, "num_attention_heads": 64,
    "moe_intermediate_size": 1536,
}

# huggingface.co/google/gemma-3-27b-it/blob/main/config.json: its text_config (the SigLIP vision
# tower and projector of the multimodal model are not described). vocab_size, the 5:1 pattern and
# tied embeddings are the transformers defaults above; the release's module print-out shows the
# 262208 x 5376 embedding, 62 layers, q/k/v 4096/2048/2048 wide and q/k norms of 128.
GEMMA3_27B = {
    "model_type": "gemma3",
    "text_config": {
        "model_type": "gemma3_text", "hidden_size": 5376, "intermediate_size": 21504,
        "num_hidden_layers": 62, "num_attention_heads": 32, "num_key_value_heads": 16,
        "head_dim": 128, "sliding_window": 1024,
    },
}

BUILTIN: dict[str, Architecture] = {
    "gpt-oss-20b": Architecture.from_model_config(PRESETS["gpt-oss-20b"]),
    "gpt-oss-120b": Architecture.from_model_config(PRESETS["gpt-oss-120b"]),
    "Qwen3-30B-A3B": Architecture.from_config_dict(QWEN3_30B_A3B, "Qwen3-30B-A3B"),
    "Qwen3-235B-A22B": Architecture.from_config_dict(QWEN3_235B_A22B, "Qwen3-235B-A22B"),
    "Gemma-3-27B": Architecture.from_config_dict(GEMMA3_27B, "Gemma-3-27B"),
}


def resolve(spec: str) -> Architecture:
    """A built-in name (any case) or the path of a config.json or of the folder holding one."""
    by_lower = {name.lower(): arch for name, arch in BUILTIN.items()}
    if spec.lower() in by_lower:
        return by_lower[spec.lower()]
    if Path(spec).exists():
        return load_config_json(spec)
    raise ArchitectureError(f"unknown model {spec!r}: not a config.json path nor one of {', '.join(BUILTIN)}")
