"""The comparison architectures through config fields alone: Qwen3-MoE and a Gemma-3-style 5:1 pattern.

Qwen3-MoE: logit parity with transformers' Qwen3MoeForCausalLM on tiny random configs that differ in
depth, GQA ratio, experts / top-k, top-k renormalisation, attention bias and tied embeddings.
5:1 sliding: the layer types, logit parity with transformers' GptOssForCausalLM (which builds its
masks from the same layer_types on its own), and KV-cached decoding (ring buffers on the 5 sliding
layers) equal to the full forward, for a GPT-OSS and a Qwen3-style block.
"""

import math
from dataclasses import replace

import pytest
import torch

from gptoss import load_model
from gptoss.analysis.architectures import BUILTIN, QWEN3_30B_A3B, Architecture
from gptoss.analysis.compare import params
from gptoss.model.config import FULL, SLIDING, ConfigError, ModelConfig, alternating_layer_types, sliding_pattern
from gptoss.model.transformer import Transformer
from gptoss.weights.qwen3 import from_qwen3_moe
from tests.conftest import random_hf_model, tiny_config
from tests.test_generation import cached_logits

FP32_TOLERANCE = 1e-4

QWEN3_CONFIGS = {
    # name: (Qwen3MoeConfig overrides, sequence length)
    "2L-gqa2-e8k2-norm-untied": (dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                      tie_word_embeddings=False), 17),
    "3L-mqa-e16k4-nonorm-tied": (dict(num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=1,
                                      num_experts=16, num_experts_per_tok=4, norm_topk_prob=False,
                                      tie_word_embeddings=True), 33),
    "4L-mha-e32k8-norm-tied-bias-d32": (dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                             head_dim=32, num_experts=32, num_experts_per_tok=8, norm_topk_prob=True,
                                             tie_word_embeddings=True, attention_bias=True), 25),
}


def random_qwen3_model(seed: int, **overrides):
    """A Qwen3MoeForCausalLM, eager attention, weights scaled like a trained net (1/sqrt(fan_in))."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(**(dict(vocab_size=512, hidden_size=64, head_dim=16, moe_intermediate_size=32,
                                    max_position_embeddings=4096, rope_parameters={"rope_type": "default",
                                                                                   "rope_theta": 10000.0})
                               | overrides))
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied lm_head is the embedding: listed once
            if name.endswith("embed_tokens.weight"):
                p.normal_(0, 1)
            elif name.endswith("norm.weight"):
                p.normal_(1, 0.1)
            elif p.dim() == 1:
                p.normal_(0, 0.1)
            else:  # [out, in], experts [E, out, in]
                p.normal_(0, 1 / math.sqrt(p.shape[-1]))
    return model


@pytest.mark.parametrize("name", QWEN3_CONFIGS)
def test_qwen3_moe_logits_match_transformers(name):
    overrides, seq = QWEN3_CONFIGS[name]
    hf = random_qwen3_model(seed=len(name), **overrides)
    ours = from_qwen3_moe(hf)
    cfg = ours.config
    assert (cfg.attention_sinks, cfg.qk_norm, cfg.router, cfg.expert_activation, cfg.expert_bias) == \
        (False, True, "softmax_topk", "swiglu", False)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == overrides["tie_word_embeddings"]
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    diff = (got - expected).abs().max().item()
    print(f"{name}: fp32 max |logit diff| = {diff:.2e} (logits up to {expected.abs().max():.1f})")
    assert diff < FP32_TOLERANCE
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_qwen3_30b_a3b_built_on_meta_has_the_compare_tools_total():
    cfg = ModelConfig.from_qwen3_moe_config(QWEN3_30B_A3B, "Qwen3-30B-A3B")
    with torch.device("meta"):
        model = Transformer(cfg)
    arch = BUILTIN["Qwen3-30B-A3B"]
    assert Architecture.from_model_config(cfg) == arch
    assert sum(p.numel() for p in model.parameters()) == params(arch).total_count == 30_532_122_624


# ---- Gemma-3-style 5:1 sliding pattern ----------------------------------------------------------

S, F = SLIDING, FULL


def test_sliding_patterns():
    assert sliding_pattern(12, 5) == (S, S, S, S, S, F) * 2
    assert sliding_pattern(8, 5) == (S, S, S, S, S, F, S, S)
    assert sliding_pattern(7, 1) == alternating_layer_types(7) == (S, F, S, F, S, F, S)
    assert sliding_pattern(3, 0) == (F, F, F)
    assert BUILTIN["Gemma-3-27B"].layer_types == sliding_pattern(62, 5)
    assert Architecture.from_model_config(tiny_config(num_layers=12, layer_types=sliding_pattern(12, 5))) \
        .attention_pattern() == "5:1"


def test_5_to_1_pattern_matches_transformers_masks(tmp_path):
    cfg = tiny_config(num_layers=7, sliding_window=4, layer_types=sliding_pattern(7, 5))
    hf = random_hf_model(cfg, seed=3)
    assert hf.config.layer_types == list(cfg.layer_types)
    hf.save_pretrained(tmp_path / "m")
    ours = load_model(tmp_path / "m", dtype=torch.float32)
    assert ours.config.layer_types == cfg.layer_types
    ids = torch.randint(0, cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    print(f"7L 5:1 window 4: fp32 max |logit diff| = {diff:.2e}")
    assert diff < FP32_TOLERANCE


QWEN3_STYLE = dict(attention_bias=False, attention_sinks=False, qk_norm=True, router="softmax_topk",
                   router_bias=False, expert_activation="swiglu", expert_bias=False, tie_embeddings=True)


@pytest.mark.parametrize("block", ["gpt-oss", "qwen3"])
@torch.no_grad()
def test_5_to_1_cached_decode_equals_full_forward(block):
    cfg = tiny_config(num_layers=6, sliding_window=5, layer_types=sliding_pattern(6, 5), rope_scaling_factor=1.0,
                      **(QWEN3_STYLE if block == "qwen3" else {}))
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    for p in model.parameters():
        p.normal_(0, 1 / math.sqrt(p.shape[-1]))
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 9)]
    continuations = [torch.randint(0, cfg.vocab_size, (15,), generator=g).tolist() for _ in prompts]
    for row, got in enumerate(cached_logits(model, prompts, continuations)):  # the rings of 5 - 1 + 4 wrap
        full = model(torch.tensor([prompts[row] + continuations[row]]))[0]
        diff = (got - full).abs().max().item()
        print(f"{block} 5:1, row {row}: max |cached - full| = {diff:.2e}")
        assert diff < 1e-5


# ---- config fields --------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (dict(router="sigmoid"), "router 'sigmoid' is not one of"),
    (dict(normalize_topk=False), "normalize_topk must be True"),
    (dict(expert_activation="gelu"), "expert_activation 'gelu' is not one of"),
])
def test_bad_comparison_fields_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**overrides)


def test_gpt_oss_config_json_refuses_fields_it_cannot_express():
    cfg = tiny_config(**QWEN3_STYLE)
    with pytest.raises(ConfigError, match="cannot express attention_bias=False, attention_sinks=False"):
        cfg.to_hf_config()
    with pytest.raises(ConfigError, match="original/ config.json cannot express"):
        replace(cfg, num_layers=2).to_original_config()
