"""Throughput of the fused MXFP4 kernel alone, beside the machine's read bandwidth.

    python benchmarks/mxfp4_kernel.py [--threads 2]

Decode shape: 4 experts of the gpt-oss-20b gate_up projection (5760 x 2880), one slot each, with
weights from several layers so that they do not sit in the cache.
"""

import argparse
import time

import torch

from gptoss.kernels import cpu_kernels


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = torch.ones(2**27, dtype=torch.int64)
    data.sum()
    start = time.perf_counter()
    for _ in range(3):
        data.sum()
    read = 3 * data.nbytes / (time.perf_counter() - start) / 1e9

    kernels = cpu_kernels()
    E, R, K = 32, 5760, 2880
    g = torch.Generator().manual_seed(0)
    layers = [(torch.randint(0, 256, (E, R, K // 32, 16), dtype=torch.uint8, generator=g),
               torch.randint(115, 130, (E, R, K // 32), dtype=torch.uint8, generator=g)) for _ in range(4)]
    bias = torch.zeros(E, R)
    counts = torch.zeros(E, dtype=torch.long)
    counts[[3, 7, 11, 20]] = 1
    offsets = torch.nn.functional.pad(counts.cumsum(0), (1, 0))
    x = torch.randn(4, K).bfloat16()
    for blocks, scales in layers:
        kernels.moe_matmul(x, blocks, scales, bias, offsets)
    start, calls = time.perf_counter(), 0
    for _ in range(3):
        for blocks, scales in layers:
            kernels.moe_matmul(x, blocks, scales, bias, offsets)
            calls += 1
    seconds = (time.perf_counter() - start) / calls
    weight_bytes = 4 * R * K * 17 / 32  # 4.25 bits a weight
    print(f"{args.threads} threads: read bandwidth {read:.1f} GB/s; MXFP4 GEMV {seconds * 1e3:.2f} ms per call, "
          f"{weight_bytes / seconds / 1e9:.2f} GB/s of weights ({weight_bytes / seconds / 1e9 / read:.0%} of read)")


if __name__ == "__main__":
    main()
