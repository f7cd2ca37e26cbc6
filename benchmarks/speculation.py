"""Speculative decoding by prompt lookup against plain decoding, greedy, side by side in one run.

For each prompt: plain decode, prompt-lookup speculation (`--speculate N`), and speculation whose drafts
are always right (the plain run's own continuation, drafted as prompt lookup would if the model copied its
context): the most speculation can give on this machine, whatever the weights. Every run's tokens must
equal the plain run's. Random weights never repeat their context, so there prompt lookup drafts little;
the ceiling row says what a model that copies (rewriting a file, quoting a document) would gain.

    python benchmarks/speculation.py --model /root/ck/20b-8l --tokens 48 --speculate 4 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gptoss import load_model
from gptoss.chat.tokenizer import get_tokenizer
from gptoss.generation.generate import stream
from gptoss.generation.sampling import SamplingParams
from gptoss.generation.speculative import NgramDrafter, Speculation

ROOT = Path(__file__).resolve().parent.parent


def prompts() -> dict[str, list[int]]:
    tokenizer = get_tokenizer()
    code = tokenizer.decode(tokenizer.encode((ROOT / "gptoss/generation/speculative.py").read_text())[:400])
    prose = (ROOT / "docs/server.md").read_text()[:1600]
    return {"code rewrite (400-token file, then its start again)":
            tokenizer.encode(code + "\n\n# The same file with one change:\n" + code[:200]),
            "prose (no repetition)": tokenizer.encode(prose)}


def ceiling(truth: list[int]):
    """A drafter that proposes the true continuation."""
    class Ceiling(NgramDrafter):
        def draft(self, limit: int) -> list[int]:
            done = len(self.tokens) - self.start
            return truth[done:done + limit]

    def make(tokens):
        drafter = Ceiling(tokens)
        drafter.start = len(tokens)
        return drafter

    return make


def timed(model, prompt, tokens, speculation=None) -> tuple[list[int], float]:
    """The tokens, and the seconds from the first (which ends the prefill) to the last: decoding alone."""
    out, first = [], None
    for token in stream(model, prompt, tokens, SamplingParams(), (), speculation=speculation):
        out.append(token)
        first = first or time.perf_counter()
    return out, time.perf_counter() - first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--speculate", type=int, default=4)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    rows = []
    for name, prompt in prompts().items():
        timed(model, prompt, 4)  # warm-up: the weights faulted in, the kernels loaded
        plain, plain_s = timed(model, prompt, args.tokens)
        decoded = args.tokens - 1  # after the first token, which the prefill makes
        row = {"prompt": name, "prompt_tokens": len(prompt), "plain_tok_s": decoded / plain_s}
        for kind, speculation in (("lookup", Speculation(args.speculate)),
                                  ("ceiling", Speculation(args.speculate, ceiling(plain)))):
            out, seconds = timed(model, prompt, args.tokens, speculation)
            row[kind] = {"tok_s": decoded / seconds, "ratio": plain_s / seconds, "identical": out == plain,
                         "tokens_per_pass": speculation.tokens_per_pass, "drafted": speculation.drafted,
                         "accepted": speculation.accepted}
        rows.append(row)
    if args.json:
        print(json.dumps({"model": args.model, "threads": torch.get_num_threads(), "speculate": args.speculate,
                          "rows": rows}))
        return
    print(f"{args.model}, {torch.get_num_threads()} threads, {args.tokens} tokens greedy, drafts of up to "
          f"{args.speculate}")
    for row in rows:
        print(f"{row['prompt']} ({row['prompt_tokens']} prompt tokens): plain {row['plain_tok_s']:.2f} tok/s")
        for kind in ("lookup", "ceiling"):
            r = row[kind]
            print(f"  {kind:<8} {r['tok_s']:.2f} tok/s ({r['ratio']:.2f}x), {r['tokens_per_pass']:.2f} tokens a pass, "
                  f"{r['accepted']}/{r['drafted']} drafted tokens kept, identical: {r['identical']}")


if __name__ == "__main__":
    main()
