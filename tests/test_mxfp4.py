import pytest
import torch

from gptoss import load_model
from gptoss.quant import mxfp4
from tests.conftest import tiny_config


def random_blocks(shape=(3, 64, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, generator=g),
            torch.randint(110, 140, shape, dtype=torch.uint8, generator=g))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_is_bit_exact_with_transformers(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = random_blocks()
    ours = mxfp4.dequantize(blocks, scales, dtype)                           # [E, rows, K]
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)        # [E, K, rows]
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(ours.view(bits), theirs.transpose(1, 2).contiguous().view(bits))


def test_nibble_order_and_scale():
    # byte 0x71: low nibble 1 (+0.5) is element 0, high nibble 7 (+6.0) element 1; scale 128 doubles.
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x71
    blocks[0, 0, 1] = 0x9F  # low 0xF = -6.0, high 0x9 = -0.5
    values = mxfp4.dequantize(blocks, torch.tensor([[128]], dtype=torch.uint8), torch.float32)
    assert values[0, :4].tolist() == [1.0, 12.0, -12.0, -1.0]
    assert values.shape == (1, 32)


def test_quantize_round_trip():
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    blocks, scales = mxfp4.quantize(w)
    assert blocks.shape == (8, 8, 16) and scales.shape == (8, 8)
    back = mxfp4.dequantize(blocks, scales, torch.float32)
    # Each value lands on the nearest point of its block's grid (the 16 FP4 values times the scale).
    scale = torch.exp2(scales.float() - 127).repeat_interleave(32, dim=-1)          # [8, 256]
    grid = torch.tensor(mxfp4.FP4_VALUES) * scale.unsqueeze(-1)                      # [8, 256, 16]
    assert torch.allclose((back - w).abs(), (grid - w.unsqueeze(-1)).abs().amin(-1))
    # and the scale is the smallest that holds the block's largest magnitude within FP4's 6.0.
    amax = w.view(8, 8, 32).abs().amax(-1)
    assert (amax <= 6 * torch.exp2(scales.float() - 127)).all() and (amax > 3 * torch.exp2(scales.float() - 127)).all()
    # Values already on the grid come back exactly: quantize(dequantize(b, s)) reproduces them.
    exact = mxfp4.dequantize(*random_blocks(), torch.float32)
    assert torch.equal(mxfp4.dequantize(*mxfp4.quantize(exact), torch.float32), exact)


def test_mxfp4_checkpoint_matches_transformers(tmp_checkpoint):
    """A tiny HF checkpoint with MXFP4 experts: transformers dequantizes it on load, we keep it packed."""
    from transformers import GptOssForCausalLM

    cfg = tiny_config(num_layers=3)
    path = tmp_checkpoint(cfg, "hf", seed=3)
    ours = load_model(path, dtype=torch.float32)
    assert ours.model.layers[0].mlp.experts.gate_up_proj_blocks.dtype == torch.uint8  # stays packed
    hf = GptOssForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    print(f"MXFP4 checkpoint, fp32: max |logit diff| = {diff:.2e}")
    assert diff < 1e-4
