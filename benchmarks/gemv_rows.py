"""The bf16 GEMV kernel against torch's F.linear for 1 to 8 rows of activations, interleaved in one process.

    python benchmarks/gemv_rows.py --threads 2

Weights of the unembedding's and a query projection's shape (gpt-oss-20b); GB/s of weights read, best
of 4 interleaved rounds. Up to 4 rows the kernel is its vdpbf16ps loop, from 5 rows its AMX tiles (on a
CPU without AMX it refuses more than 4 rows, and only torch is timed there).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from gptoss.kernels import cpu_kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kernels = cpu_kernels()
    print(f"AMX: {kernels.has_amx()}")
    for N, K in [(201088, 2880), (4096, 2880)]:
        w = torch.randn(N, K).bfloat16()
        reps = 3 if N > 100_000 else 200
        for M in range(1, 9):
            x = torch.randn(M, K).bfloat16()
            calls = {"torch": lambda: F.linear(x, w)}
            if M <= 4 or kernels.has_amx():
                calls["kernel"] = lambda: kernels.linear_bf16(x, w, None)
            best = {name: float("inf") for name in calls}
            for _ in range(4):
                for name, call in calls.items():
                    call()
                    start = time.perf_counter()
                    for _ in range(reps):
                        call()
                    best[name] = min(best[name], (time.perf_counter() - start) / reps)
            rates = "  ".join(f"{name} {w.nbytes / s / 1e9:5.1f} GB/s" for name, s in best.items())
            print(f"[{N} x {K}] {M} rows: {rates}", flush=True)


if __name__ == "__main__":
    main()
