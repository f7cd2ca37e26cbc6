"""The CPU kernels equal the reference path, on every branch they have: the tests of the kernel functions
run on the build for this CPU and on the portable AVX2 build (-march=x86-64-v3) that a CPU without
AVX-512 gets, so both sets of code paths are tested on every x86 machine."""

import platform
import shutil
from unittest import mock

import pytest
import torch

from gptoss.kernels import build, cpu_kernels, ops
from gptoss.model.transformer import Experts
from gptoss.quant import int8, mxfp4
from gptoss.weights.checkpoint import load_model
from tests.conftest import tiny_config

COMPILER = shutil.which("c++") is not None
pytestmark = pytest.mark.skipif(not COMPILER, reason="no C++ compiler here")


def test_the_kernels_compile_wherever_a_compiler_is():
    assert cpu_kernels() is not None, "the C++ kernels did not build for this CPU (see the warning for why)"


@pytest.fixture(scope="module", params=["native", "x86-64-v3"])
def kernels(request):
    if request.param == "native":
        return cpu_kernels() or pytest.fail("the C++ kernels did not build for this CPU")
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the portable build is x86's")
    return build("gptoss_cpu_kernels_x86_64_v3", march=request.param)


def random_problem(E=5, R=40, K=96, counts=(3, 0, 9, 1, 6), seed=0, scale_range=(112, 132)):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (E, R, K // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(*scale_range, (E, R, K // 32), dtype=torch.uint8, generator=g)
    bias = torch.randn(E, R, generator=g)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), K, generator=g)
    return blocks, scales, bias, counts, x


def q8(x: torch.Tensor) -> torch.Tensor:
    """What the VNNI kernel multiplies for bf16 activations: each group of 8 values rounded to int8 steps
    of absmax / 127 (q = round(x * (127 / absmax)), ties to even, as the kernel computes it)."""
    blocks = x.float().view(*x.shape[:-1], -1, 8)
    amax = blocks.abs().amax(-1, keepdim=True)
    q = torch.round(blocks * (torch.tensor(127.0) / amax)).nan_to_num(0.0)
    return (q * (amax / 127)).view(x.shape)


def expected_moe_matmul(x, blocks, scales, bias, counts):
    expert_of_slot = torch.repeat_interleave(torch.arange(len(counts)), counts)
    weights = mxfp4.dequantize(blocks, scales, torch.float32)[expert_of_slot]           # [S, R, K]
    return torch.einsum("sk,srk->sr", x, weights) + bias[expert_of_slot]


@pytest.mark.parametrize("K", [96, 160, 256])
@pytest.mark.parametrize("counts", [(3, 0, 9, 1, 6), (1, 0, 0, 1, 0), (0, 0, 17, 0, 0)])
def test_moe_matmul_equals_dequantized_matmul(kernels, counts, K):
    """Token counts cover full tiles, remainders of 1-3 slots, single-slot GEMV and empty experts;
    K = 96, 160, 256 are 3, 5, 8 blocks: a lone partial 64-byte step, full steps plus a partial one,
    full steps only. fp32 activations take the exact path; bf16 ones the VNNI path (where the CPU has
    it), which multiplies int8-rounded activations, so it must equal the same sum over q8(x)."""
    blocks, scales, bias, counts, x = random_problem(counts=counts, K=K)
    offsets = torch.nn.functional.pad(counts.cumsum(0), (1, 0))
    for got, expected in [
        (kernels.moe_matmul(x, blocks, scales, bias, offsets), expected_moe_matmul(x, blocks, scales, bias, counts)),
        (kernels.moe_matmul(x.bfloat16(), blocks, scales, bias, offsets),
         expected_moe_matmul(q8(x.bfloat16()) if kernels.has_vnni() else x.bfloat16().float(), blocks, scales, bias, counts)),
    ]:
        assert got.dtype == torch.float32 and got.shape == expected.shape
        # Only the order of fp32 additions differs from the einsum.
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("scale,x_scale", [(1, 2.0**120), (252, 2.0**-120)])
def test_moe_matmul_extreme_scales(kernels, scale, x_scale):
    """E8M0 scales 1 and 252 (2^-126, and 2^125, the largest at which 6 x scale is a finite fp32), with
    activations that keep the products normal floats:
    the weight scale is still applied exactly on both paths."""
    blocks, scales, bias, counts, x = random_problem(E=2, R=8, K=160, counts=(2, 1))
    scales.fill_(scale)
    x *= x_scale
    bias.zero_()
    offsets = torch.nn.functional.pad(counts.cumsum(0), (1, 0))
    for xs, ref in [(x, x), (x.bfloat16(), q8(x.bfloat16()) if kernels.has_vnni() else x.bfloat16().float())]:
        got = kernels.moe_matmul(xs, blocks, scales, bias, offsets)
        expected = expected_moe_matmul(ref, blocks, scales, bias, counts)
        assert 1e-3 < expected.abs().max() < 1e6
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("N,K", [(37, 2880), (8, 100), (5, 31), (32, 64)])
def test_linear_bf16_is_correctly_rounded(kernels, M, N, K):
    """The GEMV kernel accumulates in fp32 and rounds once, as F.linear does: every output is the bf16
    rounding of the fp32 sum up to fp32 summation order, so within one bf16 step. Up to 4 rows vdpbf16ps;
    5 to 16 rows AMX tiles, where the CPU has them and K is a multiple of 32 (N = 37: a last tile of 5
    rows), else a clear refusal."""
    g = torch.Generator().manual_seed(M * 1000 + N)
    x, w, b = (torch.randn(*shape, generator=g).bfloat16() for shape in ((M, K), (N, K), (N,)))
    if M > 4 and not (kernels.has_amx() and K % 32 == 0):
        with pytest.raises(RuntimeError, match="more than 4 rows need AMX"):
            kernels.linear_bf16(x, w, b)
        return
    for bias in (b, None):
        truth = x.double() @ w.double().T + (0 if bias is None else bias.double())
        got = kernels.linear_bf16(x, w, bias)
        assert got.dtype == torch.bfloat16 and got.shape == (M, N)
        ulp = torch.finfo(torch.bfloat16).eps * truth.abs().clamp(min=1e-3)
        assert ((got.double() - truth).abs() <= ulp).all()
        assert (got == truth.bfloat16()).float().mean() > 0.95


def test_linear_bf16_rows_do_not_depend_on_the_batch(kernels):
    """Each row of a GEMV of up to 4 rows is that row's one-row GEMV bit for bit (a speculative pass of up
    to 4 tokens computes each position as a decode step would); the AMX tiles (5 to 8 rows) sum in an
    order of their own, the same for every M."""
    g = torch.Generator().manual_seed(7)
    x, w, b = torch.randn(8, 2880, generator=g).bfloat16(), torch.randn(50, 2880, generator=g).bfloat16(), torch.randn(50, generator=g).bfloat16()
    alone = torch.cat([kernels.linear_bf16(x[m:m + 1], w, b) for m in range(4)])
    for M in range(2, 5):
        assert torch.equal(kernels.linear_bf16(x[:M], w, b), alone[:M])
    if kernels.has_amx():
        tiles = kernels.linear_bf16(x, w, b)
        for M in range(5, 8):
            assert torch.equal(kernels.linear_bf16(x[:M], w, b), tiles[:M])


def fused_experts(experts, x, ids, w):
    """The experts module through ops with the kernels on; fails if ops falls back to the reference."""
    with ops.using_kernels(True), mock.patch.object(ops, "experts_reference",
                                                    side_effect=AssertionError("the reference path ran")):
        return experts(x, ids, w)


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
    assert torch.allclose(fused_experts(experts, x, ids, w), experts(x, ids, w), atol=1e-5)


def test_fused_experts_bf16_error_against_reference_bf16():
    """In bf16 the kernel multiplies int8-rounded activations (one scale per 8 values; llama.cpp's route
    with finer scales), accumulates in fp32 and applies SwiGLU in fp32; the reference rounds to bf16 in
    between. Both are judged against an fp32 computation on the same bf16 inputs, by RMS error over
    several draws (a single maximum swings 0.5x-3x from draw to draw): int8 steps of absmax / 127 over 8
    values cost about 1.4x the RMS error of bf16 rounding here (1.1x-1.7x per draw), and must stay
    under 2x."""
    fused_err, reference_err = 0.0, 0.0
    for seed in range(6):
        experts, x, ids, w = make_experts(torch.bfloat16, seed=seed)
        truth = experts.float()(x.float(), ids, w)
        experts.bfloat16()
        fused_err += (fused_experts(experts, x, ids, w).float() - truth).pow(2).sum().item()
        reference_err += (experts(x, ids, w).float() - truth).pow(2).sum().item()
    ratio = (fused_err / reference_err) ** 0.5
    print(f"RMS error vs fp32: fused / reference bf16 = {ratio:.2f}")
    assert ratio < 2


def test_dequantize_bf16_is_exact(kernels):
    blocks, scales, *_ = random_problem()
    assert torch.equal(kernels.dequantize_bf16(blocks[2], scales[2]), mxfp4.dequantize(blocks[2], scales[2]))


@pytest.mark.parametrize("branch", ["amx", "gemm"])
def test_moe_matmul_many_slot_branches(kernels, branch):
    """Experts with many slots: the AMX branch multiplies bf16 activations by the exact bf16 weights with
    fp32 accumulation (so it equals that product up to summation order); the dequantize + torch GEMM
    branch rounds its output to bf16 (so it equals it within one bf16 step). R = 40 leaves a short
    tile of rows, 37 slots a short tile of slots, 5 slots an expert left to the VNNI loop."""
    if branch == "amx" and not kernels.has_amx():
        pytest.skip("no AMX on this machine")
    blocks, scales, bias, counts, x = random_problem(counts=(5, 0, 37, 16, 0), K=96)
    offsets = torch.nn.functional.pad(counts.cumsum(0), (1, 0))
    thresholds = (8, 2**62) if branch == "amx" else (2**62, 8)
    got = kernels.moe_matmul(x.bfloat16(), blocks, scales, bias, offsets, *thresholds)
    exact = expected_moe_matmul(x.bfloat16().float(), blocks, scales, bias, counts)
    loop = expected_moe_matmul(q8(x.bfloat16()) if kernels.has_vnni() else x.bfloat16().float(), blocks, scales, bias, counts)
    many = torch.repeat_interleave(counts >= 8, counts)
    scale = exact.abs().max().item()
    assert torch.allclose(got[~many], loop[~many], rtol=1e-5, atol=1e-5 * scale)
    step = 2.0 ** -8 if branch == "gemm" else 1e-5
    assert torch.allclose(got[many], exact[many], rtol=step, atol=1e-5 * scale)


def test_prefill_sized_steps_agree_with_the_reference(monkeypatch):
    """fused_experts with 40 tokens on 6 experts top-3 (most experts past the many-slot thresholds, one
    below): the mix of branches stays within the fused kernel's bound of the reference's error."""
    from gptoss.kernels import ops

    experts, _, _, _ = make_experts(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, experts.down_proj_bias.shape[1], generator=g).bfloat16()
    top, ids = torch.randn(40, 6, generator=g).topk(3)
    ids[:3] = torch.tensor([5, 4, 3])                                # expert 5 stays below the thresholds
    ids[3:, :] = torch.randint(0, 5, (37, 1), generator=g).add(torch.arange(3)) % 5
    w = top.softmax(-1)
    counts = torch.bincount(ids.flatten(), minlength=6)
    assert (counts >= 16).any() and ((counts > 0) & (counts < 8)).any()
    truth = experts.float()(x.float(), ids, w)
    experts.bfloat16()
    reference = experts(x, ids, w).float()
    for amx, gemm in [(ops.AMX_MIN_SLOTS, 2**62), (2**62, 16)]:
        monkeypatch.setattr(ops, "AMX_MIN_SLOTS", amx)
        monkeypatch.setattr(ops, "GEMM_MIN_SLOTS", gemm)
        fused = fused_experts(experts, x, ids, w).float()
        assert (fused - truth).norm() < 2 * (reference - truth).norm()


@pytest.mark.parametrize("M", [1, 2, 4])
@pytest.mark.parametrize("N,K", [(37, 2880), (8, 96), (5, 64)])
def test_linear_int8_equals_its_emulation(kernels, M, N, K):
    """The int8 GEMV multiplies int8-rounded activations (groups of 8, as q8 does) by the int8 weights,
    accumulates in fp32 and rounds once to bf16: within one bf16 step of that product. K = 96 ends in a
    half step of 32."""
    g = torch.Generator().manual_seed(M * 1000 + N)
    x, w, b = torch.randn(M, K, generator=g).bfloat16(), torch.randn(N, K, generator=g), torch.randn(N, generator=g).bfloat16()
    values, scales = int8.quantize(w)
    xs = q8(x) if kernels.has_vnni() else x.float()
    for bias in (b, None):
        expected = xs.double() @ int8.dequantize(values, scales, torch.float32).double().T + (0 if bias is None else bias.double())
        got = kernels.linear_int8(x, values, scales, bias)
        assert got.dtype == torch.bfloat16 and got.shape == (M, N)
        step = torch.finfo(torch.bfloat16).eps * expected.abs().clamp(min=1e-3)
        assert ((got.double() - expected).abs() <= step).all()


def test_dequantize_int8_is_exact(kernels):
    values, scales = int8.quantize(torch.randn(50, 96, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(kernels.dequantize_int8(values, scales), int8.dequantize(values, scales, torch.bfloat16))


def test_int8_dense_layers_cost_little_accuracy(tmp_checkpoint):
    """The int8 format of the attention projections and the unembedding, against an fp32 forward of the
    same checkpoint: per-token relative logit error (median over 96 prefill + 16 decode positions, the
    median because a bf16 rounding that flips a near-tied expert choice moves a few tokens a lot in
    either model). int8 blocks round weights to steps of absmax / 127, coarser than bf16's 8 bits: on
    this tiny geometry (dot products of 64 values) int8 costs 1.7-1.9x the bf16 model's error over five
    seeds, on the gpt-oss-20b geometry 1.02x (docs/benchmarks.md); it must stay under 2.5x."""
    path = tmp_checkpoint(tiny_config(num_layers=2))
    ids = torch.randint(0, 500, (1, 112), generator=torch.Generator().manual_seed(0))

    def per_token_logits(model):
        from gptoss.generation.cache import KVCache

        tokens = ids[0].tolist()
        with torch.inference_mode():
            cache = KVCache.for_tokens(model.config, len(tokens), dtype=model.dtype)
            sequence = cache.sequence()
            prefill = model(ids[:, :96], cache=cache.batch([sequence], [tokens[:96]]))[0]        # a prefill chunk: GEMMs
            decode = [model(ids[:, i:i + 1], cache=cache.batch([sequence], [tokens[i:i + 1]]))[0]
                      for i in range(96, 112)]                                                      # decode: GEMV kernels
        return torch.cat([prefill] + decode).float()

    truth = per_token_logits(load_model(path, dtype=torch.float32, kernels=False))
    errors = {}
    for name, int8_dense, kernels_on in (("bf16", False, True), ("int8", True, True), ("int8, no kernels", True, False)):
        got = per_token_logits(load_model(path, int8_dense=int8_dense, kernels=kernels_on))
        errors[name] = ((got - truth).norm(dim=-1) / truth.norm(dim=-1)).median().item()
    print("median per-token relative logit error vs fp32:", {name: round(e, 4) for name, e in errors.items()})
    assert errors["int8"] < 2.5 * errors["bf16"] and errors["int8, no kernels"] < 2.5 * errors["bf16"]
