"""Throughput of the CPU kernels alone, beside the machine's read bandwidth.

    python benchmarks/mxfp4_kernel.py [--threads 2]

Decode shapes (one token): the MXFP4 GEMV over 4 experts of the gpt-oss-20b gate_up projection
(5760 x 2880, weights from several layers so that they do not sit in the cache), and the dense GEMVs
of the q projection (4096 x 2880) in bf16 and in int8 blocks, in GB/s of weights read. Prefill shapes:
the same 4 experts with 16 and 64 slots each through the VNNI loop, the AMX tiles (where the CPU has
them) and "dequantize + torch GEMM", in GFLOP/s.
"""

import argparse
import time

import torch

from gptoss.kernels import cpu_kernels
from gptoss.quant import int8


def seconds_per_call(fn, calls: int = 3) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels = cpu_kernels()

    data = torch.ones(2**27, dtype=torch.int64)
    read = data.nbytes / seconds_per_call(data.sum) / 1e9
    print(f"{args.threads} threads: read bandwidth {read:.1f} GB/s")

    E, R, K = 32, 5760, 2880
    g = torch.Generator().manual_seed(0)
    layers = [(torch.randint(0, 256, (E, R, K // 32, 16), dtype=torch.uint8, generator=g),
               torch.randint(115, 130, (E, R, K // 32), dtype=torch.uint8, generator=g)) for _ in range(4)]
    bias = torch.zeros(E, R)
    experts = [3, 7, 11, 20]

    def offsets(slots: int) -> torch.Tensor:
        counts = torch.zeros(E, dtype=torch.long)
        counts[experts] = slots
        return torch.nn.functional.pad(counts.cumsum(0), (1, 0))

    x = torch.randn(4, K).bfloat16()
    gemv = seconds_per_call(lambda: [kernels.moe_matmul(x, b, s, bias, offsets(1)) for b, s in layers]) / len(layers)
    mxfp4_bytes = 4 * R * K * 17 / 32  # 4.25 bits a weight
    print(f"  MXFP4 GEMV, 4 experts x {R} x {K}: {gemv * 1e3:.2f} ms, {mxfp4_bytes / gemv / 1e9:.2f} GB/s of weights "
          f"({mxfp4_bytes / gemv / 1e9 / read:.0%} of read)")

    dense = [torch.randn(4096, K).bfloat16() for _ in range(24)]
    quantized = [int8.quantize(w) for w in dense]
    x1 = torch.randn(1, K).bfloat16()
    for name, fn, nbytes in [
        ("bf16 GEMV", lambda: [kernels.linear_bf16(x1, w, None) for w in dense], 2 * 4096 * K),
        ("int8 GEMV", lambda: [kernels.linear_int8(x1, v, s, None) for v, s in quantized], 4096 * K * 1.125),
        ("torch F.linear bf16", lambda: [torch.nn.functional.linear(x1, w) for w in dense], 2 * 4096 * K),
    ]:
        t = seconds_per_call(fn) / len(dense)
        print(f"  {name}, 4096 x {K}: {t * 1e3:.2f} ms, {nbytes / t / 1e9:.1f} GB/s of weights")

    blocks, scales = layers[0]
    never = 2**62
    branches = [("VNNI loop", (never, never)), ("dequantize + torch GEMM", (never, 1))]
    if kernels.has_amx():
        branches.insert(1, ("AMX tiles", (1, never)))
    for slots in (16, 64):
        xs = torch.randn(4 * slots, K).bfloat16()
        for name, thresholds in branches:
            t = seconds_per_call(lambda: kernels.moe_matmul(xs, blocks, scales, bias, offsets(slots), *thresholds))
            print(f"  {slots} slots on each of 4 experts, {name}: {t * 1e3:.1f} ms, "
                  f"{2 * 4 * slots * R * K / t / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
