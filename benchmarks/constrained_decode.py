"""Decode speed with and without a JSON-schema constraint, side by side in one process.

    python benchmarks/constrained_decode.py --model /root/ck/20b-8l --tokens 64 --threads 2

The same harmony prompt is decoded greedily for --tokens new tokens twice per round, free and with a JSON
schema on the final answer (an array of strings, so the answer can run as long as the budget), alternating
for --rounds rounds. Whatever the random model writes under the grammar (reasoning or the answer), every
token goes through the grammar's mask. Reported: decode tokens per second of each, their ratio, and the
time the grammar took per token (mask and advance) measured inside the constrained runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gptoss.chat import grammar
from gptoss.chat.grammar import Constraint, OutputRules
from gptoss.chat.harmony import Chat, render_for_completion
from gptoss.generation.generate import stream_batch
from gptoss.weights.checkpoint import load_model

SCHEMA = {"type": "object", "required": ["items"], "properties": {"items": {"type": "array", "items": {"type": "string"}}}}


def decode_rate(model, prompt: list[int], tokens: int, rules: OutputRules | None) -> float:
    """New tokens per second after the first (the first includes the prefill)."""
    stamps = []
    for _ in stream_batch(model, [prompt], tokens, rules=rules):
        stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    prompt = render_for_completion(Chat(reasoning_effort="low").user("List some colors as JSON."))
    rules = OutputRules(answer_schema=SCHEMA)
    grammar.lltokenizer(model.config.vocab_size)  # built once, as the server does at start
    decode_rate(model, prompt, 8, None)            # warm-up

    spent = []  # seconds of grammar work per token, measured in the constrained runs
    mask, advance = Constraint.mask, Constraint.advance

    def timed(method):
        def wrapper(self, *a):
            start = time.perf_counter()
            result = method(self, *a)
            spent.append(time.perf_counter() - start)
            return result
        return wrapper

    free, constrained = [], []
    for _ in range(args.rounds):
        free.append(decode_rate(model, prompt, args.tokens, None))
        Constraint.mask, Constraint.advance = timed(mask), timed(advance)
        constrained.append(decode_rate(model, prompt, args.tokens, rules))
        Constraint.mask, Constraint.advance = mask, advance
    f, c = statistics.median(free), statistics.median(constrained)
    per_token_ms = 1000 * sum(spent) / (args.rounds * args.tokens)
    print(f"{args.model}, {torch.get_num_threads()} threads, {args.tokens} tokens, {args.rounds} rounds")
    print(f"free:        {', '.join(f'{r:.2f}' for r in free)} tok/s (median {f:.2f})")
    print(f"constrained: {', '.join(f'{r:.2f}' for r in constrained)} tok/s (median {c:.2f})")
    print(f"ratio constrained / free: {c / f:.3f}; grammar work {per_token_ms:.3f} ms per token")


if __name__ == "__main__":
    main()
