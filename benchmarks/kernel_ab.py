"""Decode speed of the CPU kernels of this tree against those of an earlier commit, in one process.

The earlier commit's kernel sources are taken from git and built as a module of another name; the two
are swapped in before each batch of decode steps, batches interleaved, so the machine's drift falls on
both alike. Only the kernels differ: the same model, weights in memory, cache and prompt.

    python benchmarks/kernel_ab.py --model /root/ck/gpt-oss-20b --baseline 94ad0dc --threads 2
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

from gptoss import load_model
from gptoss.generation.benchmark import decode_seconds, prefill_seconds, read_all_weights
from gptoss.kernels import SOURCES, cpu_kernels, ops

ROOT = Path(__file__).resolve().parent.parent


def baseline_kernels(revision: str):
    """The kernels of `revision`, built as module gptoss_baseline_kernels."""
    folder = Path(tempfile.mkdtemp(prefix="gptoss-baseline-"))
    for source in [*SOURCES, SOURCES[0].with_name("common.h")]:
        relative = source.relative_to(ROOT)
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:{relative}"], check=True,
                              capture_output=True, text=True).stdout
        (folder / source.name).write_text(text)
    return load(name="gptoss_baseline_kernels", sources=[str(folder / s.name) for s in SOURCES],
                extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--baseline", required=True, help="the git revision whose kernels to compare against")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12, help="decode steps a batch")
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kernels = {"this tree": cpu_kernels(), args.baseline: baseline_kernels(args.baseline)}
    model = load_model(args.model)
    read_all_weights(model)
    _, (sequence, logits) = prefill_seconds(model, args.prompt, 512, room=2 * args.pairs * args.steps + 1)
    rates = {name: [] for name in kernels}
    for _ in range(args.pairs):
        for name, module in kernels.items():
            ops._kernels = lambda module=module: module  # the op dispatch's one door to the kernels
            rates[name].append(args.steps / decode_seconds(model, sequence, logits, args.steps))
    medians = {name: sorted(r)[len(r) // 2] for name, r in rates.items()}
    for name, r in rates.items():
        print(f"{name:<12} decode tok/s {' '.join(f'{x:.2f}' for x in r)}  median {medians[name]:.2f}")
    mine, theirs = medians.values()
    print(f"ratio {mine / theirs:.2f}x")


if __name__ == "__main__":
    main()
