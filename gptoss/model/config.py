"""One dataclass that describes a GPT-OSS-family model.

Every architecture difference is a field here; the model code reads fields, never names. The
defaults are GPT-OSS; the fields from `attention_bias` on also express the models the design notes
compare it with (a Qwen3-MoE block, a Gemma-3-style 5:1 `sliding_pattern`).
`from_hf_config` and `from_original_config` read the two published `config.json` flavours,
`to_hf_config` / `to_original_config` write them back; `from_qwen3_moe_config` reads Qwen3-MoE's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from gptoss.errors import GptossError

SLIDING = "sliding_attention"
FULL = "full_attention"
ROUTERS = ("topk_softmax", "softmax_topk")
EXPERT_ACTIVATIONS = ("clamped_swiglu", "swiglu")


class ConfigError(GptossError):
    """A config.json that is missing a field, contradicts itself, or is not a GPT-OSS config."""


# The largest size a config may name: far beyond any published model, small enough that nothing built from
# a config (the RoPE tables, a KV cache, the model on the meta device) can ask for absurd memory because a
# config.json says so.
SIZE_LIMITS = {"vocab_size": 2**22, "hidden_size": 2**17, "num_layers": 2**11, "num_heads": 2**12,
               "num_kv_heads": 2**12, "head_dim": 2**12, "num_experts": 2**14, "intermediate_size": 2**20,
               "max_context": 2**24, "sliding_window": 2**24, "experts_per_token": 2**14}


@dataclass(frozen=True)
class ModelConfig:
    name: str = "gpt-oss-20b"
    vocab_size: int = 201088               # rows of the embedding and unembedding
    hidden_size: int = 2880                # width of the residual stream
    num_layers: int = 24
    num_heads: int = 64                    # query heads
    num_kv_heads: int = 8                  # key/value heads; query head h reads KV head h // (num_heads // num_kv_heads)
    head_dim: int = 64
    num_experts: int = 32
    experts_per_token: int = 4             # top-k of the router
    intermediate_size: int = 2880          # per expert; its first projection is 2x this (gate and up)
    sliding_window: int = 128              # keys visible to a query on a sliding layer, the query included
    layer_types: tuple[str, ...] = ()      # SLIDING / FULL per layer; empty means "sliding on even layers"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0      # YaRN factor; 1.0 means plain RoPE
    rope_original_context: int = 4096      # context the model was pre-trained at, before YaRN
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_truncate: bool = False            # gpt-oss keeps the YaRN correction range unrounded
    max_context: int = 131072
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # What sets GPT-OSS apart from Qwen3-MoE (its values there in brackets):
    attention_bias: bool = True            # q/k/v/o projections carry biases [False]
    attention_sinks: bool = True           # a learned logit per query head joins the softmax and takes
                                           # attention to nothing [False]
    qk_norm: bool = False                  # an RMSNorm over head_dim on each query and key head, before RoPE [True]
    router: str = "topk_softmax"           # "topk_softmax": softmax over the k largest logits only;
                                           # "softmax_topk": softmax over all experts, keep the k largest [Qwen3]
    normalize_topk: bool = True            # rescale the k kept weights to sum to 1 (Qwen3's norm_topk_prob);
                                           # "topk_softmax" always sums to 1
    router_bias: bool = True               # the router's linear layer has a bias [False]
    expert_activation: str = "clamped_swiglu"  # "clamped_swiglu": swiglu_alpha/limit, "+1" on the linear half,
                                           # gate and linear columns interleaved; "swiglu": silu(gate) * up
                                           # on the [gate | up] halves [Qwen3]
    expert_bias: bool = True               # expert projections carry biases [False]
    tie_embeddings: bool = False           # lm_head reuses the embedding matrix [configurable]
    eos_token_ids: tuple[int, ...] = (200002, 199999, 200012)  # <|return|>, <|endoftext|>, <|call|>
    pad_token_id: int = 199999

    def __post_init__(self):
        types = tuple(self.layer_types) or alternating_layer_types(self.num_layers)
        object.__setattr__(self, "layer_types", types)
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, message: str):
            if not ok:
                raise ConfigError(f"config {self.name!r}: {message}")

        for size, largest in SIZE_LIMITS.items():
            value = getattr(self, size)
            need(isinstance(value, int) and not isinstance(value, bool), f"{size} must be an integer, got {value!r}")
            need(1 <= value <= largest, f"{size} must be within 1..{largest}, got {value}")
        check_geometry(need, self.num_layers, self.layer_types, self.num_heads, self.num_kv_heads, self.sliding_window,
                       self.num_experts, self.experts_per_token)
        need(self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even for RoPE")
        need(isinstance(self.rope_theta, (int, float)) and 1 < self.rope_theta < 1e12,
             f"rope_theta must be within 1..1e12, got {self.rope_theta!r}")
        need(isinstance(self.rope_scaling_factor, (int, float)) and 1 <= self.rope_scaling_factor <= 2**16,
             f"rope scaling factor must be within 1..65536, got {self.rope_scaling_factor!r}")
        need(self.router in ROUTERS, f"router {self.router!r} is not one of {', '.join(ROUTERS)}")
        need(self.normalize_topk or self.router != "topk_softmax",
             "router 'topk_softmax' always normalises its top-k weights: normalize_topk must be True")
        need(self.expert_activation in EXPERT_ACTIVATIONS,
             f"expert_activation {self.expert_activation!r} is not one of {', '.join(EXPERT_ACTIVATIONS)}")

    def require_gpt_oss_block(self, layout: str) -> None:
        """GPT-OSS's config.json files have no keys for the comparison fields: refuse rather than drop them."""
        other = [f"{key}={getattr(self, key)!r}" for key in GPT_OSS_BLOCK if getattr(self, key) != GPT_OSS_BLOCK[key]]
        if other:
            raise ConfigError(f"config {self.name!r}: a {layout} config.json cannot express {', '.join(other)}")

    def with_layers(self, num_layers: int) -> "ModelConfig":
        """The same geometry cut (or extended) to `num_layers`, keeping the alternation."""
        return replace(self, num_layers=num_layers, layer_types=())

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    # ---- Hugging Face config.json -------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, raw: dict, name: str = "hf") -> "ModelConfig":
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "yarn")) not in ("yarn", "default"):
            raise ConfigError(f"unsupported rope_type {rope.get('rope_type')!r}")
        yarn = rope.get("rope_type", rope.get("type", "yarn")) == "yarn"
        eos = raw.get("eos_token_id", cls.eos_token_ids)
        return cls(
            name=name,
            vocab_size=_req(raw, "vocab_size"),
            hidden_size=_req(raw, "hidden_size"),
            num_layers=_req(raw, "num_hidden_layers"),
            num_heads=_req(raw, "num_attention_heads"),
            num_kv_heads=raw.get("num_key_value_heads", raw["num_attention_heads"]),
            head_dim=raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"],
            num_experts=_req(raw, "num_local_experts", "num_experts"),
            experts_per_token=_req(raw, "num_experts_per_tok", "experts_per_token"),
            intermediate_size=_req(raw, "intermediate_size"),
            sliding_window=raw.get("sliding_window") or cls.sliding_window,
            layer_types=tuple(raw.get("layer_types") or ()),
            rms_norm_eps=raw.get("rms_norm_eps", cls.rms_norm_eps),
            rope_theta=rope.get("rope_theta", raw.get("rope_theta", cls.rope_theta)),
            rope_scaling_factor=rope.get("factor", cls.rope_scaling_factor) if yarn else 1.0,
            rope_original_context=rope.get("original_max_position_embeddings", cls.rope_original_context),
            rope_beta_fast=rope.get("beta_fast", cls.rope_beta_fast),
            rope_beta_slow=rope.get("beta_slow", cls.rope_beta_slow),
            rope_truncate=rope.get("truncate", True),  # transformers' default when the key is absent
            max_context=raw.get("max_position_embeddings", cls.max_context),
            swiglu_alpha=raw.get("swiglu_alpha", cls.swiglu_alpha),
            swiglu_limit=raw.get("swiglu_limit", cls.swiglu_limit),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,) if eos is not None else cls.eos_token_ids,
            pad_token_id=raw.get("pad_token_id") if raw.get("pad_token_id") is not None else cls.pad_token_id,
        )

    def to_hf_config(self, quantized: bool = True) -> dict:
        """A config.json in the shape of the published openai/gpt-oss-20b one."""
        self.require_gpt_oss_block("Hugging Face gpt_oss")
        raw = {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "attention_bias": True,
            "attention_dropout": 0.0,
            "eos_token_id": list(self.eos_token_ids),
            "pad_token_id": self.pad_token_id,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initial_context_length": self.rope_original_context,
            "intermediate_size": self.intermediate_size,
            "layer_types": list(self.layer_types),
            "max_position_embeddings": self.max_context,
            "num_attention_heads": self.num_heads,
            "num_experts_per_tok": self.experts_per_token,
            "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.num_kv_heads,
            "num_local_experts": self.num_experts,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            # The published form (rope_theta beside it), which transformers reads in every version since
            # gpt-oss came out; transformers 5 turns it into its rope_parameters.
            "rope_scaling": {
                "rope_type": "yarn" if self.rope_scaling_factor > 1 else "default",
                "factor": self.rope_scaling_factor,
                "beta_fast": self.rope_beta_fast,
                "beta_slow": self.rope_beta_slow,
                "truncate": self.rope_truncate,
                "original_max_position_embeddings": self.rope_original_context,
            },
            "sliding_window": self.sliding_window,
            "swiglu_alpha": self.swiglu_alpha,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": False,
            "vocab_size": self.vocab_size,
        }
        if quantized:
            raw["quantization_config"] = {
                "quant_method": "mxfp4",
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"],
            }
        return raw

    # ---- OpenAI original/config.json ------------------------------------------------------------

    @classmethod
    def from_original_config(cls, raw: dict, name: str = "original") -> "ModelConfig":
        num_layers = _req(raw, "num_hidden_layers")
        # OpenAI's reference code slides on even layers and takes no layer_types key.
        return cls(
            name=name,
            vocab_size=_req(raw, "vocab_size"),
            hidden_size=_req(raw, "hidden_size"),
            num_layers=num_layers,
            num_heads=_req(raw, "num_attention_heads"),
            num_kv_heads=_req(raw, "num_key_value_heads"),
            head_dim=_req(raw, "head_dim"),
            num_experts=_req(raw, "num_experts", "num_local_experts"),  # transformers 5 writes the latter
            experts_per_token=_req(raw, "experts_per_token"),
            intermediate_size=_req(raw, "intermediate_size"),
            sliding_window=_req(raw, "sliding_window"),
            rope_theta=_req(raw, "rope_theta"),
            rope_scaling_factor=_req(raw, "rope_scaling_factor"),
            rope_original_context=_req(raw, "initial_context_length"),
            rope_beta_slow=raw.get("rope_ntk_alpha", cls.rope_beta_slow),
            rope_beta_fast=raw.get("rope_ntk_beta", cls.rope_beta_fast),
            rope_truncate=False,
            max_context=int(raw["initial_context_length"] * raw["rope_scaling_factor"]),
            swiglu_limit=raw.get("swiglu_limit", cls.swiglu_limit),
        )

    def to_original_config(self) -> dict:
        self.require_gpt_oss_block("OpenAI original/")
        if self.layer_types != alternating_layer_types(self.num_layers):
            raise ConfigError("OpenAI's original layout can only express sliding attention on even layers")
        return {
            "num_hidden_layers": self.num_layers,
            "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "sliding_window": self.sliding_window,
            "initial_context_length": self.rope_original_context,
            "rope_theta": self.rope_theta,
            "rope_scaling_factor": self.rope_scaling_factor,
            "rope_ntk_alpha": self.rope_beta_slow,
            "rope_ntk_beta": self.rope_beta_fast,
        }

    # ---- Qwen3-MoE config.json (for the architecture comparison) ---------------------------------

    @classmethod
    def from_qwen3_moe_config(cls, raw: dict, name: str = "qwen3_moe") -> "ModelConfig":
        """A Qwen3-MoE model (transformers' Qwen3MoeConfig.to_dict() or its config.json) as our fields.

        Every layer must be an MoE layer with full attention, as in all published Qwen3-MoE models.
        """
        if raw.get("mlp_only_layers") or raw.get("decoder_sparse_step", 1) != 1:
            raise ConfigError("dense layers between MoE layers are not modelled")
        if raw.get("use_sliding_window"):
            raise ConfigError("Qwen's sliding-window layers are not modelled")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ConfigError(f"unsupported rope_type {rope.get('rope_type')!r}")
        layers, hidden, heads = (_req(raw, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads"))
        eos = raw.get("eos_token_id")
        return cls(
            name=name,
            vocab_size=_req(raw, "vocab_size"),
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or hidden // heads,
            num_experts=_req(raw, "num_experts", "num_local_experts"),  # transformers 5 writes the latter
            experts_per_token=_req(raw, "num_experts_per_tok"),
            intermediate_size=_req(raw, "moe_intermediate_size"),
            layer_types=(FULL,) * layers,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", raw.get("rope_theta", 10000.0)),
            rope_scaling_factor=1.0,
            max_context=raw.get("max_position_embeddings", 32768),
            attention_bias=raw.get("attention_bias", False),
            attention_sinks=False,
            qk_norm=True,
            router="softmax_topk",
            normalize_topk=raw.get("norm_topk_prob", False),
            router_bias=False,
            expert_activation="swiglu",
            expert_bias=False,
            tie_embeddings=raw.get("tie_word_embeddings", False),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,) if eos is not None else (),
            pad_token_id=raw.get("pad_token_id") if raw.get("pad_token_id") is not None else 0,
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        """Reads either flavour of config.json, telling them apart by their keys."""
        path = Path(path)
        raw = read_config_json(path)
        try:
            if "num_local_experts" in raw or raw.get("model_type") == "gpt_oss":
                return cls.from_hf_config(raw, name=path.parent.name)
            if "experts_per_token" in raw and "rope_scaling_factor" in raw:
                return cls.from_original_config(raw, name=path.parent.name)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except (TypeError, ValueError, ArithmeticError, AttributeError) as e:  # a value of the wrong kind
            raise ConfigError(f"{path}: a value has the wrong type or is out of range ({e})") from None
        raise ConfigError(f"{path}: neither a Hugging Face gpt_oss config nor an OpenAI original/ config")


def check_geometry(need: Callable[[bool, str], None], num_layers: int, layer_types: tuple[str, ...], num_heads: int,
                   num_kv_heads: int, sliding_window: int, num_experts: int, experts_per_token: int) -> None:
    """The checks that `ModelConfig` and the comparison's `Architecture` share; `need(ok, message)` raises
    its caller's error when not ok. num_experts 0 means a dense MLP (Architecture only)."""
    need(len(layer_types) == num_layers, f"layer_types has {len(layer_types)} entries for {num_layers} layers")
    need(set(layer_types) <= {SLIDING, FULL}, f"unknown layer type in {sorted(set(layer_types))}")
    need(SLIDING not in layer_types or sliding_window >= 1, f"sliding_window {sliding_window} must be positive")
    need(num_heads % num_kv_heads == 0, f"{num_heads} query heads do not divide into {num_kv_heads} KV heads")
    need(num_experts == 0 or 1 <= experts_per_token <= num_experts,
         f"experts_per_token {experts_per_token} must be within 1..{num_experts}")


def sliding_pattern(num_layers: int, local_per_global: int) -> tuple[str, ...]:
    """`local_per_global` sliding layers, then one full layer, repeated (a cut-off last unit allowed).

    1 is GPT-OSS's 1:1, 5 Gemma 3's 5:1 (layer i full when i + 1 is a multiple of 6, as in
    transformers), 0 full attention everywhere.
    """
    return tuple(FULL if (i + 1) % (local_per_global + 1) == 0 else SLIDING for i in range(num_layers))


def read_config_json(path: Path) -> dict:
    """A JSON config file of a checkpoint (config.json, generation_config.json) as a dict, or a one-line
    ConfigError naming the file."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return raw


def alternating_layer_types(num_layers: int) -> tuple[str, ...]:
    """GPT-OSS's 1:1 pattern: sliding on even layers (0, 2, ...), full attention on odd ones."""
    return sliding_pattern(num_layers, 1)


# The values of the comparison fields that GPT-OSS's own config.json files imply.
GPT_OSS_BLOCK = {name: ModelConfig.__dataclass_fields__[name].default
                 for name in ("attention_bias", "attention_sinks", "qk_norm", "router", "normalize_topk",
                              "router_bias", "expert_activation", "expert_bias", "tie_embeddings")}


def _req(raw: dict, *keys: str):
    for key in keys:
        if key in raw and raw[key] is not None:
            return raw[key]
    raise ConfigError(f"config.json lacks {' / '.join(keys)}")


PRESETS: dict[str, ModelConfig] = {
    "gpt-oss-20b": ModelConfig(name="gpt-oss-20b", num_layers=24, num_experts=32),
    "gpt-oss-120b": ModelConfig(name="gpt-oss-120b", num_layers=36, num_experts=128),
    # Small geometries for tests and the README's first command: real structure, tiny sizes.
    "tiny": ModelConfig(name="tiny", vocab_size=201088, hidden_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, num_experts=4, experts_per_token=2,
                        intermediate_size=64, sliding_window=8, max_context=4096),
    "small": ModelConfig(name="small", vocab_size=201088, hidden_size=256, num_layers=4, num_heads=8,
                         num_kv_heads=2, head_dim=32, num_experts=8, experts_per_token=4,
                         intermediate_size=256, sliding_window=32, max_context=8192),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
