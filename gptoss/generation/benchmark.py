"""What `gptoss bench` measures on a loaded model: prefill and decode speed, bytes per decoded token."""

from __future__ import annotations

import itertools
import time

import torch

from gptoss.generation.cache import KVCache, Sequence
from gptoss.model.transformer import Transformer


def bytes_per_decoded_token(model: Transformer) -> int:
    """Weight bytes one decode step reads: everything but the embedding table (one row of it) and the
    experts (the routed top-k of each layer, assumed distinct). The KV cache is not counted."""
    cfg, total = model.config, 0
    for name, t in model.state_dict().items():
        if name == "model.embed_tokens.weight":
            total += t[0].nbytes
        elif ".mlp.experts." in name:
            total += t.nbytes * cfg.experts_per_token // cfg.num_experts
        else:
            total += t.nbytes
    return total


@torch.inference_mode()
def read_all_weights(model: Transformer) -> None:
    """Touches one byte of every 4 KiB page of every weight. The weights are memory-mapped and a fresh
    process reads them from disk (or the page cache) on first use: after this, timings hold no disk reads,
    and the load time compares with a loader that reads the whole file (llama.cpp without mmap)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_contiguous() and t.numel():
            t.detach().reshape(-1).view(torch.uint8)[::4096].sum()


def matmul_flops_per_token(cfg) -> int:
    """Multiply-add FLOPs (2 per weight) of one token's matrix products: attention projections, router, the
    top-k experts and the unembedding (attention's own scores, which grow with the context, not counted)."""
    H, D = cfg.hidden_size, cfg.head_dim
    attention = H * (cfg.num_heads + 2 * cfg.num_kv_heads) * D + cfg.num_heads * D * H
    experts = cfg.experts_per_token * 3 * H * cfg.intermediate_size
    return 2 * (cfg.num_layers * (attention + H * cfg.num_experts + experts) + cfg.vocab_size * H)


def _best_seconds(work, repeats: int) -> float:
    """The fastest of `repeats` runs of `work()`: the machine at its least disturbed."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth_gb_s(nbytes: int = 2**30, repeats: int = 5) -> float:
    """The machine's read bandwidth as torch sees it: the best of `repeats` sums over a float32 tensor of
    `nbytes` (1 GiB: far past every cache), in GB/s."""
    data = torch.ones(nbytes // 4, dtype=torch.float32)
    return nbytes / _best_seconds(data.sum, repeats) / 1e9


def gemm_tflop_s(rows: int = 512, inner: int = 2880, outer: int = 5760, repeats: int = 5) -> float:
    """torch's bf16 GEMM at the shape of a 512-token chunk through gpt-oss-20b's widest projection
    (2880 -> 5760, an expert's gate and up): the best of `repeats`, in TFLOP/s."""
    x, w = torch.randn(rows, inner).bfloat16(), torch.randn(outer, inner).bfloat16()
    torch.nn.functional.linear(x, w)  # warm-up
    return 2 * rows * inner * outer / _best_seconds(lambda: torch.nn.functional.linear(x, w), repeats) / 1e12


@torch.inference_mode()
def prefill_seconds(model: Transformer, length: int, chunk: int, seed: int = 0,
                    room: int = 0) -> tuple[float, tuple[Sequence, torch.Tensor]]:
    """Seconds to prefill `length` random tokens, and the sequence in its cache and the last logits, with
    `room` tokens left in the cache to decode."""
    ids = torch.randint(0, model.config.vocab_size, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    cache = KVCache.for_tokens(model.config, length + room, chunk=chunk, dtype=model.dtype, device=model.device,
                               kv_heads=model.kv_heads)
    sequence = cache.sequence()
    start = time.perf_counter()
    for s in range(0, length, chunk):
        piece = ids[s:s + chunk]
        logits = model(torch.tensor([piece], device=model.device), cache=cache.batch([sequence], [piece]), last_only=True)
    return time.perf_counter() - start, (sequence, logits)


@torch.inference_mode()
def decode_seconds(model: Transformer, sequence: Sequence, logits: torch.Tensor, steps: int) -> float:
    token = int(logits[0, -1].argmax())
    start = time.perf_counter()
    for _ in range(steps):
        logits = model(torch.tensor([[token]], device=model.device), cache=sequence.cache.batch([sequence], [[token]]),
                       last_only=True)
        token = int(logits[0, -1].argmax())
    return time.perf_counter() - start


@torch.inference_mode()
def pass_seconds(model: Transformer, sequence: Sequence, tokens: int, repeats: int = 3) -> float:
    """Median seconds of one forward pass of `tokens` new tokens at the end of `sequence` (a speculative
    verifying pass of a draft of `tokens` - 1), cut back out of the cache after each."""
    ids = torch.randint(0, model.config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(tokens)).tolist()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(torch.tensor([ids], device=model.device), cache=sequence.cache.batch([sequence], [ids]))
        times.append(time.perf_counter() - start)
        sequence.truncate(sequence.length - tokens)
    return sorted(times)[len(times) // 2]
