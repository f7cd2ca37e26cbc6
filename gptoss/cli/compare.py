"""`gptoss compare`: GPT-OSS beside Qwen3 and Gemma 3, in parameters, KV cache, FLOPs and bytes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gptoss.analysis.architectures import BUILTIN, resolve
from gptoss.analysis.compare import plot, render, report
from gptoss.cli.options import parse_ints, parse_list

DEFAULT_CONTEXTS = "4096,32768,131072"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="compare architectures: parameters, KV cache, FLOPs and bytes per token",
        description="Architecture arithmetic from published configurations: parameters total and active "
                    "per token by part, KV-cache bytes with sliding layers capped at their window, "
                    "FLOPs per decoded token and weight bytes read per token in bf16, MXFP4 and int8. "
                    "Prints markdown tables (or JSON); --plot also draws KV memory and active parameters.")
    p.add_argument("--models", default=",".join(BUILTIN),
                   help=f"comma-separated built-in names ({', '.join(BUILTIN)}) or config.json paths "
                        "(gpt_oss, OpenAI original, qwen3_moe, gemma3, gemma3_text); default: all built-ins")
    p.add_argument("--context", default=DEFAULT_CONTEXTS,
                   help=f"comma-separated context lengths in tokens (default {DEFAULT_CONTEXTS})")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="also write the plot to this file")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of tables")
    p.set_defaults(func=run)


def run(args) -> int:
    archs = [resolve(spec) for spec in parse_list(args.models, "--models")]
    contexts = parse_ints(args.context, "--context")
    rep = report(archs, contexts)
    sys.stdout.write(json.dumps(rep, indent=2) + "\n" if args.json else render(rep))
    if args.plot:
        plot(archs, contexts, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
