"""The fused MXFP4 CPU kernel equals the reference path, on every branch it has."""

import pytest
import torch

from gptoss.kernels import cpu_kernels
from gptoss.kernels.moe import fused_experts, kernel_applies
from gptoss.model.transformer import Experts
from gptoss.weights import mxfp4
from tests.conftest import tiny_config

kernels = cpu_kernels()
pytestmark = pytest.mark.skipif(kernels is None, reason="the C++ kernels could not be compiled here")


def random_problem(E=5, R=40, K=96, counts=(3, 0, 9, 1, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (E, R, K // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(112, 132, (E, R, K // 32), dtype=torch.uint8, generator=g)
    bias = torch.randn(E, R, generator=g)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), K, generator=g)
    return blocks, scales, bias, counts, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", [(3, 0, 9, 1, 6), (1, 0, 0, 1, 0), (0, 0, 17, 0, 0)])
def test_moe_matmul_equals_dequantized_matmul(dtype, counts):
    """Token counts cover full tiles, remainders of 1-3 slots, single-slot GEMV and empty experts;
    R = 40 leaves a short tile of rows."""
    blocks, scales, bias, counts, x = random_problem(counts=counts)
    offsets = torch.nn.functional.pad(counts.cumsum(0), (1, 0))
    expert_of_slot = torch.repeat_interleave(torch.arange(len(counts)), counts)
    weights = mxfp4.dequantize(blocks, scales, torch.float32)[expert_of_slot]           # [S, R, K]
    x = x.to(dtype)
    expected = torch.einsum("sk,srk->sr", x.float(), weights) + bias[expert_of_slot]
    got = kernels.moe_matmul(x, blocks, scales, bias, offsets)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    # Only the order of fp32 additions differs from the einsum.
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-4 * expected.abs().max().item())


def make_experts(dtype, seed=0):
    cfg = tiny_config(num_experts=6, experts_per_token=3)
    experts = Experts(cfg, quantized=True)
    g = torch.Generator().manual_seed(seed)
    for name, t in experts.named_buffers():
        t.copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8, generator=g) if name.endswith("blocks")
                else torch.randint(118, 124, t.shape, dtype=torch.uint8, generator=g))
    with torch.no_grad():
        experts.gate_up_proj_bias.normal_(0, 0.1, generator=g)
        experts.down_proj_bias.normal_(0, 0.1, generator=g)
    experts.to(dtype)
    n = 11
    x = torch.randn(n, cfg.hidden_size, generator=g).to(dtype)
    logits = torch.randn(n, 6, generator=g)
    top, ids = logits.topk(3)
    return experts, x, ids, top.softmax(-1)


def test_fused_experts_equal_reference_fp32():
    experts, x, ids, w = make_experts(torch.float32)
    assert kernel_applies(experts)
    assert torch.allclose(fused_experts(experts, x, ids, w), experts(x, ids, w), atol=1e-5)


def test_fused_experts_bf16_no_worse_than_reference_bf16():
    """In bf16 the kernel accumulates in fp32 and applies SwiGLU in fp32; the reference rounds to bf16
    in between. Both are judged against an fp32 computation on the same bf16 inputs."""
    experts, x, ids, w = make_experts(torch.bfloat16)
    truth = experts.float()(x.float(), ids, w)
    experts.bfloat16()
    fused = fused_experts(experts, x, ids, w).float()
    reference = experts(x, ids, w).float()
    assert (fused - truth).abs().max() <= (reference - truth).abs().max()


def test_dequantize_bf16_is_exact():
    blocks, scales, *_ = random_problem()
    assert torch.equal(kernels.dequantize_bf16(blocks[2], scales[2]), mxfp4.dequantize(blocks[2], scales[2]))


def test_many_slots_take_the_gemm_branch_and_agree():
    """With 40 tokens on 6 experts top-3, most experts get >= GEMM_MIN_SLOTS slots (dequantize + bf16
    GEMM), some fewer (the fused kernel); the mix must still be no worse than the reference."""
    from gptoss.kernels.moe import GEMM_MIN_SLOTS

    experts, _, _, _ = make_experts(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, experts.down_proj_bias.shape[1], generator=g).bfloat16()
    top, ids = torch.randn(40, 6, generator=g).topk(3)
    ids[:3] = torch.tensor([5, 4, 3])                                # expert 5 stays below the threshold
    ids[3:, :] = torch.randint(0, 5, (37, 1), generator=g).add(torch.arange(3)) % 5
    w = top.softmax(-1)
    counts = torch.bincount(ids.flatten(), minlength=6)
    assert (counts >= GEMM_MIN_SLOTS).any() and ((counts > 0) & (counts < GEMM_MIN_SLOTS)).any()
    truth = experts.float()(x.float(), ids, w)
    experts.bfloat16()
    fused = fused_experts(experts, x, ids, w).float()
    reference = experts(x, ids, w).float()
    assert (fused - truth).abs().max() <= 1.01 * (reference - truth).abs().max()


def test_out_of_range_scales_keep_the_reference_path():
    experts, *_ = make_experts(torch.bfloat16)
    experts.down_proj_scales[0, 0, 0] = 255
    with pytest.warns(UserWarning, match="scales outside"):
        assert not kernel_applies(experts)
