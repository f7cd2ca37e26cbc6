"""Options and helpers shared by the `gptoss` subcommands."""

from __future__ import annotations

import sys

import torch

from gptoss.errors import GptossError
from gptoss.generation.sampling import SamplingParams
from gptoss.weights.checkpoint import load_model
from gptoss.weights.hub import resolve_model

DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}


def add_model_options(p) -> None:
    p.add_argument("--model", help="local directory (Hugging Face or original/ layout) or a Hugging Face id such as "
                                   "openai/gpt-oss-20b; default: a small random-weight checkpoint made on first use")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="dense weights and activations (default: as stored)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    p.add_argument("--int8", action="store_true", help="hold the attention projections and the unembedding in int8 "
                                                       "blocks of 32 (1.125 bytes a weight instead of 2)")


def add_sampling_options(p, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--seed", type=int)


def sampling_params(args) -> SamplingParams:
    return SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.seed)


def load_from_args(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    return load_model(resolve_model(args.model), dtype=DTYPES[args.dtype], progress=sys.stderr.isatty(),
                      int8_dense=args.int8)


def parse_list(text: str, option: str) -> list[str]:
    """A comma-separated option's items, blanks dropped; at least one."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise GptossError(f"{option} needs at least one value")
    return items


def parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise GptossError(f"{option} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise GptossError(f"{option} needs positive integers, got {text!r}")
    return values
