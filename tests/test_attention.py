"""Blocked attention (the explicit online softmax, and torch's flash kernel combined by log-sum-exp)
equals the direct formulation with the sink column."""

import math

import pytest
import torch

from gptoss.kernels import cpu_kernels
from gptoss.kernels import attention
from gptoss.kernels.attention import attend_explicit, attend_flash, visible_keys


def direct(q, k, v, q_pos, k_pos, window, sinks):
    """The textbook form: full [T, S] scores, mask, the sink as one more softmax column, dropped after."""
    B, Hkv, G, T, D = q.shape
    kk, vv = k.permute(0, 2, 1, 3).unsqueeze(2).double(), v.permute(0, 2, 1, 3).unsqueeze(2).double()
    scores = (q.double() @ kk.transpose(-1, -2)) / math.sqrt(D)
    scores = scores.masked_fill(~visible_keys(q_pos, k_pos, window)[:, None, None], float("-inf"))
    if sinks is not None:
        column = sinks.double().view(1, Hkv, G, 1, 1).expand(B, Hkv, G, T, 1)
        probs = torch.cat((scores, column), -1).softmax(-1)[..., :-1]
    else:
        probs = scores.softmax(-1).nan_to_num(0.0)
    return probs @ vv


WAYS = [attend_explicit] + ([attend_flash] if attention.flash_kernel is not None else [])


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("with_sinks", [True, False])
def test_blocked_equals_direct(window, with_sinks, way):
    g = torch.Generator().manual_seed(0)
    B, Hkv, G, T, S, D = 2, 2, 3, 6, 23, 8
    q = torch.randn(B, Hkv, G, T, D, generator=g)
    k, v = torch.randn(B, S, Hkv, D, generator=g), torch.randn(B, S, Hkv, D, generator=g)
    sinks = torch.randn(Hkv * G, generator=g) if with_sinks else None
    k_pos = torch.stack([torch.arange(S), torch.arange(S).roll(7)])      # row 1: a ring that wrapped
    k_pos[1, :4] = -1                                                    # and some empty slots
    q_pos = torch.stack([torch.arange(S - T, S), torch.tensor([-1, 15, 16, 17, 18, 19])])  # a padding query
    expected = direct(q, k, v, q_pos, k_pos, window, sinks)
    for block in (4, 7, 1024):                                           # several blocks, uneven, one block
        got = way(q, k, v, q_pos, k_pos, window, sinks, key_block=block)
        assert torch.allclose(got.double(), expected, atol=1e-6), block
    assert got[1, :, :, 0].abs().max() == 0                              # padding sees nothing: zeros


@pytest.mark.skipif(attention.flash_kernel is None, reason="this torch has no CPU flash-attention kernel")
def test_flash_in_bf16_no_worse_than_explicit_by_much():
    """In bf16 the flash kernel rounds each block's output to bf16 before the blocks are combined: one
    extra rounding over the explicit path's single one, so up to about twice its error, never more."""
    g = torch.Generator().manual_seed(1)
    B, Hkv, G, T, S, D = 1, 2, 4, 64, 300, 64
    q = torch.randn(B, Hkv, G, T, D, generator=g)
    k, v = torch.randn(B, S, Hkv, D, generator=g), torch.randn(B, S, Hkv, D, generator=g)
    sinks = torch.randn(Hkv * G, generator=g)
    q_pos, k_pos = torch.arange(S - T, S)[None], torch.arange(S)[None]
    for window in (None, 32):
        truth = direct(q.bfloat16(), k.bfloat16(), v.bfloat16(), q_pos, k_pos, window, sinks.bfloat16())
        args = (q.bfloat16(), k.bfloat16(), v.bfloat16(), q_pos, k_pos, window, sinks.bfloat16())
        flash_err = (attend_flash(*args, key_block=128).double() - truth).abs().max()
        explicit_err = (attend_explicit(*args, key_block=128).double() - truth).abs().max()
        print(f"window {window}: max error flash {flash_err:.5f}, explicit {explicit_err:.5f}")
        assert flash_err <= 2.5 * explicit_err


@pytest.mark.skipif(cpu_kernels() is None, reason="the C++ kernels could not be compiled here")
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("with_sinks", [True, False])
def test_decode_kernel_equals_direct(window, with_sinks):
    """The C++ decode kernel (bf16 in, fp32 inside, one rounding out) against the direct formulation on
    the same bf16 inputs: no worse than the explicit path, which also rounds once. Keys and values are
    views into larger buffers, as the KV cache hands them over; a ring that wrapped, empty slots, a
    padding query."""
    g = torch.Generator().manual_seed(2)
    B, Hkv, G, T, S, D = 2, 2, 3, 6, 23, 64
    q = torch.randn(B, Hkv, G, T, D, generator=g).bfloat16()
    k = torch.randn(B, S + 4, Hkv, D, generator=g).bfloat16()[:, :S]
    v = torch.randn(B, S + 4, Hkv, D, generator=g).bfloat16()[:, :S]
    sinks = torch.randn(Hkv * G, generator=g).bfloat16() if with_sinks else None
    k_pos = torch.stack([torch.arange(S), torch.arange(S).roll(7)])
    k_pos[1, :4] = -1
    q_pos = torch.stack([torch.arange(S - T, S), torch.tensor([-1, 15, 16, 17, 18, 19])])
    expected = direct(q, k, v, q_pos, k_pos, window, sinks)
    got = cpu_kernels().attend_decode(q, k, v, q_pos, k_pos, window or 0, sinks)
    explicit = attend_explicit(q, k, v, q_pos, k_pos, window, sinks)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    assert (got.double() - expected).abs().max() <= 1.25 * (explicit.double() - expected).abs().max()
    assert got[1, :, :, 0].abs().max() == 0                              # padding sees nothing: zeros
