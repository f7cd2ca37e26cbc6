"""`gptoss generate`: raw completion of a text, streamed to the terminal."""

from __future__ import annotations

import sys
import time

from gptoss.cli.options import add_model_options, add_sampling_options, load_from_args, parse_ints, sampling_params
from gptoss.generation.cache import PREFILL_CHUNK, kv_cache_bytes
from gptoss.generation.generate import stream_text
from gptoss.model.config import PRESETS, preset


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="complete a text (no chat format), streaming the tokens")
    p.add_argument("text", help="the text to continue")
    add_model_options(p)
    add_sampling_options(p, max_tokens=64)
    p.set_defaults(func=run_generate)
    register_kv_cache(subparsers)


def run_generate(args) -> int:
    from gptoss.chat.tokenizer import get_tokenizer

    params = sampling_params(args)
    model = load_from_args(args)
    prompt = get_tokenizer().encode(args.text, allowed_special="all")
    sys.stdout.write(args.text)
    start, count = time.perf_counter(), 0
    for token, text in stream_text(model, prompt, args.max_tokens, params, stop_tokens=model.config.eos_token_ids):
        count += token is not None
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(f"[{count} tokens, {count / (time.perf_counter() - start):.1f} tok/s]", file=sys.stderr)
    return 0


def register_kv_cache(subparsers) -> None:
    p = subparsers.add_parser("kv-cache", help="bytes of the KV cache for a geometry and context lengths")
    p.add_argument("--preset", default="gpt-oss-20b", choices=sorted(PRESETS))
    p.add_argument("--context", default="4096,32768,131072", help="comma-separated context lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--chunk", type=int, default=PREFILL_CHUNK, help="prefill chunk: sliding layers keep window - 1 + chunk")
    p.set_defaults(func=run_kv_cache)


def run_kv_cache(args) -> int:
    cfg = preset(args.preset)
    print(f"{cfg.name}: KV cache, bf16, batch {args.batch}, {cfg.num_layers} layers "
          f"({sum(map(cfg.is_sliding, range(cfg.num_layers)))} sliding, window {cfg.sliding_window})")
    print(f"{'context':>9} {'full layers':>14} {'sliding layers':>15} {'total':>14}")
    for context in parse_ints(args.context, "--context"):
        b = kv_cache_bytes(cfg, context, args.batch, args.chunk)
        print(f"{context:>9} {b['full_layers'] / 2**20:>10.1f} MiB {b['sliding_layers'] / 2**20:>11.2f} MiB "
              f"{b['total'] / 2**20:>10.1f} MiB   ({b['total']:,} bytes)")
    return 0
