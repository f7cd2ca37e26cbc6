"""Throughput of a running `gptoss serve` under N concurrent streaming clients.

    gptoss serve --max-batch 16 &                      # the small random model, or --model M
    python benchmarks/server_throughput.py --clients 1,4,16 --max-tokens 64

Each client streams one completion (`/v1/completions`) with a prompt of its own length (so prefills
differ) and a fixed token budget; a random-weight model practically never writes an end-of-text token,
so every stream makes --max-tokens tokens. Prints, per client count: tokens made by all streams
together (counted by the server, `usage`), wall time from the first request to the last token,
tokens/s over all streams, and the mean time to the first token. Raw completions rather than chat: a
random model's harmony is malformed, and the chat parser holds such text back until it gives up on
the header, which would make the time to first token measure the parser rather than the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import openai


async def one_stream(client: openai.AsyncOpenAI, model: str, words: int, max_tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds to the first text) of one streamed completion."""
    start, first = time.perf_counter(), None
    stream = await client.completions.create(model=model, prompt="tell me a story " * words, max_tokens=max_tokens,
                                             temperature=0, stream=True, stream_options={"include_usage": True})
    tokens = 0
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return tokens, first if first is not None else time.perf_counter() - start


async def measure(client: openai.AsyncOpenAI, model: str, clients: int, max_tokens: int) -> dict:
    start = time.perf_counter()
    results = await asyncio.gather(*(one_stream(client, model, 2 + 2 * i, max_tokens) for i in range(clients)))
    wall = time.perf_counter() - start
    tokens = sum(t for t, _ in results)
    return {"clients": clients, "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "mean_ttft_s": sum(f for _, f in results) / clients}


async def main(args) -> None:
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=3600)
    model = (await client.models.list()).data[0].id
    await one_stream(client, model, 4, 4)  # warm-up: first-call costs are not throughput
    print(f"{model} at {args.base_url}, {args.max_tokens} tokens per stream")
    print(f"{'clients':>7} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'mean TTFT s':>12}")
    for n in args.clients:
        r = await measure(client, model, n, args.max_tokens)
        print(f"{r['clients']:>7} {r['tokens']:>7} {r['seconds']:>8.2f} {r['tokens_per_s']:>9.1f} "
              f"{r['mean_ttft_s']:>12.2f}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--clients", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=128)
    asyncio.run(main(parser.parse_args()))
