"""A conversation replayed against an OpenAI-compatible server: how long each turn takes as it grows.

    gptoss serve --model /root/ck/gpt-oss-20b --threads 2 --port 8000 [--no-prefix-cache] &
    python benchmarks/multi_turn.py --base-url http://127.0.0.1:8000/v1 --turns 8

Turn 1 sends a prompt of --first random token ids to `/v1/completions`; each later turn sends the previous
prompt plus --grow new ids (the reply and the next message of a chat), for --max-tokens new tokens,
greedy, not streamed (after one short warm-up request). A server that keeps what it computed prefills only the new ids; one that does not
prefills the whole conversation every turn. Works against llama.cpp's llama-server as well (its
`/v1/completions` takes token-id prompts and keeps each slot's prompt; `cache_prompt` is on by default).
Prints a line per turn and, with --json, one JSON object at the end.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import openai


def replay(client: openai.OpenAI, model: str, turns: int, first: int, grow: int, max_tokens: int,
           vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    prompt = [rng.randrange(1000, vocab) for _ in range(first)]
    results = []
    for turn in range(1, turns + 1):
        start = time.perf_counter()
        r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
        seconds = time.perf_counter() - start
        details = getattr(r.usage, "prompt_tokens_details", None)
        results.append({"turn": turn, "prompt_tokens": len(prompt), "seconds": seconds,
                        "completion_tokens": r.usage.completion_tokens,
                        "cached_tokens": getattr(details, "cached_tokens", None) if details else None})
        print(f"turn {turn}: prompt {len(prompt):>5} tokens, {seconds:7.2f} s"
              f"{'' if details is None else f', {details.cached_tokens} cached'}", flush=True)
        prompt = prompt + [rng.randrange(1000, vocab) for _ in range(grow)]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--first", type=int, default=600, help="tokens of the first prompt")
    parser.add_argument("--grow", type=int, default=150, help="tokens added each turn")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=199_998, help="token ids are drawn below this (text tokens)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=3600)
    model = client.models.list().data[0].id
    # Warm-up: a short unrelated prompt, so that turn 1 does not pay for reading the weights in.
    client.completions.create(model=model, prompt=[random.Random(-1).randrange(1000, args.vocab) for _ in range(64)],
                              max_tokens=2, temperature=0)
    results = replay(client, model, args.turns, args.first, args.grow, args.max_tokens, args.vocab, args.seed)
    total = sum(r["seconds"] for r in results)
    print(f"total {total:.2f} s; turn {args.turns} / turn 2 = {results[-1]['seconds'] / results[1]['seconds']:.2f}")
    if args.json:
        print(json.dumps({"base_url": args.base_url, "model": model, "turns": results, "total_s": total}))


if __name__ == "__main__":
    main()
