"""`gptoss bench`: prefill and decode speed of a checkpoint, as a table or one JSON object."""

from __future__ import annotations

import json
from pathlib import Path

from gptoss.cli.options import DTYPES, add_model_options, parse_ints
from gptoss.generation.benchmark import run_benchmark
from gptoss.generation.cache import PREFILL_CHUNK
from gptoss.weights.hub import resolve_model


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure load time, prefill and decode tokens/s, GB/s and peak RSS")
    add_model_options(p)
    p.add_argument("--prompt-lens", default="128,512", help="comma-separated prompt lengths for prefill")
    p.add_argument("--gen", type=int, default=32, help="tokens to decode after the last prompt")
    p.add_argument("--chunk", type=int, default=PREFILL_CHUNK, help="prefill chunk size")
    p.add_argument("--reference", action="store_true", help="pure-PyTorch reference path instead of the kernels")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    result = run_benchmark(resolve_model(args.model), parse_ints(args.prompt_lens, "--prompt-lens"), args.gen,
                           threads=args.threads, chunk=args.chunk, kernels=not args.reference,
                           dtype=DTYPES[args.dtype], int8_dense=args.int8)
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
    for name, value in rows:
        print(f"  {name:<18} {value}")
    return 0
