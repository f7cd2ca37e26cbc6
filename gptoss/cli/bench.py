"""`gptoss bench`: prefill and decode speed of a checkpoint, as a table or one JSON object."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

from gptoss.cli.options import DTYPES, add_model_options, load_for_ranks, parse_ints
from gptoss.generation.benchmark import (bytes_per_decoded_token, decode_seconds, gemm_tflop_s,
                                        matmul_flops_per_token, pass_seconds, prefill_seconds, read_all_weights,
                                        read_bandwidth_gb_s)
from gptoss.generation.cache import PREFILL_CHUNK
from gptoss.kernels import cpu_kernels
from gptoss.weights.hub import resolve_model


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure load time, prefill and decode tokens/s, GB/s and peak RSS")
    add_model_options(p)
    p.add_argument("--prompt-lens", default="128,512", help="comma-separated prompt lengths for prefill")
    p.add_argument("--gen", type=int, default=32, help="tokens to decode after the last prompt")
    p.add_argument("--chunk", type=int, default=PREFILL_CHUNK, help="prefill chunk size")
    p.add_argument("--reference", action="store_true", help="pure-PyTorch reference path instead of the kernels")
    p.add_argument("--speculate", type=int, default=0, metavar="N",
                   help="also time forward passes of 2 .. N + 1 tokens at the decode position: what verifying a "
                        "speculative draft of 1 .. N tokens costs against a decode step")
    p.add_argument("--limits", action="store_true",
                   help="also measure the machine's limits in the same run: read bandwidth (torch sum over 1 GiB) "
                        "and the bf16 GEMM ceiling (torch, 512 x 2880 -> 5760), and each figure against them")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    result = run_benchmark(resolve_model(args.model), parse_ints(args.prompt_lens, "--prompt-lens"), args.gen,
                           threads=args.threads, chunk=args.chunk, kernels=not args.reference,
                           dtype=DTYPES[args.dtype], int8_dense=args.int8, speculate=args.speculate,
                           limits=args.limits)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model {Path(result['model']).name}: {result['dtype']}, {result['threads']} threads, "
          f"{'fused kernels' if result['kernels'] else 'reference path'}"
          f"{', int8 attention and unembedding' if result['int8_dense'] else ''}")
    rows = [("load", f"{result['load_s']:.2f} s (opened in {result['map_s']:.2f} s, then every weight read)")]
    rows += [(f"prefill pp{n}", f"{v:.1f} tok/s") for n, v in result["prefill_tok_s"].items()]
    rows += [(f"decode tg{args.gen}", f"{result['decode_tok_s']:.2f} tok/s"),
             ("decode bandwidth", f"{result['decode_gb_s']:.1f} GB/s ({result['decode_gb_per_token']:.3f} GB/token)"),
             ("peak RSS", f"{result['peak_rss_gb']:.2f} GB")]
    if args.limits:
        rows += [("read bandwidth", f"{result['read_gb_s']:.1f} GB/s: decode at {result['decode_of_bandwidth']:.2f} x"),
                 ("bf16 GEMM ceiling", f"{result['gemm_tflop_s']:.2f} TFLOP/s: prefill at "
                                       + ", ".join(f"pp{n} {v:.2f} x" for n, v in result["prefill_of_gemm"].items()))]
    step = result["pass_s"].get("1")
    rows += [(f"pass of {n} tokens", f"{v * 1e3:.0f} ms, {v / step:.2f} x a one-token pass")
             for n, v in result["pass_s"].items() if n != "1"]
    for name, value in rows:
        print(f"  {name:<18} {value}")
    return 0


def run_benchmark(path, prompt_lens: list[int], gen: int, threads: int | None = None, chunk: int = PREFILL_CHUNK,
                  kernels: bool = True, dtype: torch.dtype | None = None, int8_dense: bool = False,
                  speculate: int = 0, limits: bool = False) -> dict:
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    model = load_for_ranks(path, speculate, dtype=dtype, kernels=kernels, int8_dense=int8_dense)
    map_s = time.perf_counter() - start
    read_all_weights(model)
    load_s = time.perf_counter() - start
    prefill_seconds(model, min(prompt_lens + [chunk]), chunk, seed=1)  # warm-up: faults the mapped weights in
    prefill = {}
    for length in prompt_lens:
        seconds, (sequence, logits) = prefill_seconds(model, length, chunk, room=gen + speculate + 1)
        prefill[str(length)] = length / seconds
    decode_s = decode_seconds(model, sequence, logits, gen)
    passes = {str(n): pass_seconds(model, sequence, n) for n in range(1, speculate + 2)} if speculate else {}
    per_token = bytes_per_decoded_token(model)
    measured = {}
    if limits:  # after the model's figures, in the same process and threads
        bandwidth, tflops, flops = read_bandwidth_gb_s(), gemm_tflop_s(), matmul_flops_per_token(model.config)
        measured = {"read_gb_s": bandwidth, "decode_of_bandwidth": per_token * gen / decode_s / 1e9 / bandwidth,
                    "gemm_tflop_s": tflops,
                    "prefill_of_gemm": {n: v * flops / 1e12 / tflops for n, v in prefill.items()}}
    return {
        "model": str(path),
        "threads": torch.get_num_threads(),
        "kernels": model.kernels and cpu_kernels() is not None,
        "dtype": str(model.dtype).removeprefix("torch."),
        "int8_dense": int8_dense,
        "load_s": load_s,
        "map_s": map_s,
        "prefill_tok_s": prefill,
        "decode_tok_s": gen / decode_s,
        "decode_gb_per_token": per_token / 1e9,
        "decode_gb_s": per_token * gen / decode_s / 1e9,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "pass_s": passes,
        **measured,
    }
