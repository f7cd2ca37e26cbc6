"""`gptoss generate`: raw completion of a text, streamed to the terminal."""

from __future__ import annotations

import sys
import time

from gptoss.cli.options import add_model_options, add_sampling_options, load_from_args, sampling_params, speculation
from gptoss.generation.generate import stream_text


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="complete a text (no chat format), streaming the tokens")
    p.add_argument("text", help="the text to continue")
    add_model_options(p)
    add_sampling_options(p, max_tokens=64)
    p.set_defaults(func=run_generate)


def run_generate(args) -> int:
    from gptoss.chat.tokenizer import get_tokenizer

    model = load_from_args(args)
    params = sampling_params(args, model.generation_config)
    prompt = get_tokenizer().encode(args.text, allowed_special="all")
    sys.stdout.write(args.text)
    start, count = time.perf_counter(), 0
    stops, drafts = model.generation_config.eos_token_ids, speculation(args)
    for token, text in stream_text(model, prompt, args.max_tokens, params, stop_tokens=stops, speculation=drafts):
        count += token is not None
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    drafted = f", {drafts.tokens_per_pass:.2f} tokens a pass" if drafts else ""
    print(f"[{count} tokens, {count / (time.perf_counter() - start):.1f} tok/s{drafted}]", file=sys.stderr)
    return 0
