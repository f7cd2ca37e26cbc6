"""Logit parity with transformers' GptOssForCausalLM on tiny random configs.

Each config differs in layer count (odd and even), GQA ratio, experts / top-k, window and sequence
length (always longer than the window), batch 2. The HF model is saved with save_pretrained (dense
experts, as transformers writes them) and loaded back through our `load_model`.
"""

import pytest
import torch

from gptoss import load_model
from tests.conftest import random_hf_model, tiny_config

CONFIGS = {
    # name: (config overrides, sequence length)
    "2L-gqa2-e4k2-w8": (dict(num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4, experts_per_token=2,
                             sliding_window=8), 24),
    "3L-mqa-e8k4-w16": (dict(num_layers=3, num_heads=8, num_kv_heads=1, num_experts=8, experts_per_token=4,
                             sliding_window=16), 40),
    "4L-mha-e2k1-w4": (dict(num_layers=4, num_heads=4, num_kv_heads=4, num_experts=2, experts_per_token=1,
                            sliding_window=4), 21),
    "5L-gqa4-e16k4-w32-d32": (dict(num_layers=5, num_heads=8, num_kv_heads=2, head_dim=32, hidden_size=96,
                                   intermediate_size=96, num_experts=16, experts_per_token=4, sliding_window=32), 70),
}

FP32_TOLERANCE = 1e-4


def _pair(name, tmp_path, dtype):
    overrides, seq = CONFIGS[name]
    cfg = tiny_config(**overrides)
    hf = random_hf_model(cfg, seed=len(name))
    hf.save_pretrained(tmp_path / name)
    ours = load_model(tmp_path / name, dtype=dtype)
    ids = torch.randint(0, cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(1))
    return hf, ours, ids


@pytest.mark.parametrize("name", CONFIGS)
def test_fp32_logits_match_transformers(name, tmp_path):
    hf, ours, ids = _pair(name, tmp_path, torch.float32)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    diff = (got - expected).abs().max().item()
    print(f"{name}: fp32 max |logit diff| = {diff:.2e} (logits up to {expected.abs().max():.1f})")
    assert got.shape == (2, ids.shape[1], ours.config.vocab_size)
    assert diff < FP32_TOLERANCE
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("name", CONFIGS)
def test_bf16_error_no_worse_than_transformers_bf16(name, tmp_path):
    """In bf16 both implementations round differently; each is judged against the fp32 reference.

    The largest errors come from routing: bf16 rounding flips the top-k choice of near-tied router
    logits, and a token with other experts gets other logits, as do later tokens that attend to it
    (measured on the 4-layer config: the two tokens off by more than 0.3 are one whose expert flipped
    and one that attends to it; on the 5-layer config 3 of 140 tokens pick other experts in layer 0,
    25 of 140 by layer 4). Which tokens flip is chance: both implementations see a few such outliers,
    in different places, so the largest error measures luck, not precision. The test therefore
    compares the median token: ours (softmax and attention sums in fp32) must be no worse than
    transformers' own bf16 path, with 10% slack; the outliers are printed.
    """
    hf, ours, ids = _pair(name, tmp_path, torch.bfloat16)
    with torch.no_grad():
        reference = hf(ids).logits.float()
        hf_bf16 = hf.to(torch.bfloat16)(ids).logits.float()
        got = ours(ids)
    ours_err = (got - reference).abs().amax(-1)      # [B, T]: worst logit per token
    hf_err = (hf_bf16 - reference).abs().amax(-1)
    print(f"{name}: bf16 |diff| vs fp32 per token, median / max: ours {ours_err.median():.3f} / {ours_err.max():.3f}, "
          f"transformers {hf_err.median():.3f} / {hf_err.max():.3f} (logits up to {reference.abs().max():.1f})")
    assert ours_err.median() <= 1.1 * hf_err.median()
