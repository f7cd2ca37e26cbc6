"""Which prefill chunk suits the server: a long prompt arriving while other requests decode.

    python benchmarks/server_prefill_chunk.py --model /root/ck/20b-8l --chunks 128,256,512 --threads 2

The engine runs in-process (no HTTP). For each chunk size: `--streams` requests with short prompts start
decoding; once all of them have tokens, one request with a `--long`-token prompt arrives. Reported: the
long request's time to its first token (its prefill, shared with the others' decode steps), the longest
gap between two tokens of the running streams while that prefill lasts (how long they freeze), and the
running streams' mean gap outside it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

from gptoss.server.engine import Engine, Generation
from gptoss.weights.checkpoint import load_model


async def run(model, chunk: int, streams: int, long: int, decode_tokens: int) -> dict:
    engine = Engine(model, max_batch=streams + 1, context=long + 64, chunk=chunk).start()
    g = torch.Generator().manual_seed(0)
    short = [Generation(torch.randint(0, 1000, (8 + i,), generator=g).tolist(), decode_tokens) for i in range(streams)]
    times: list[list[float]] = [[] for _ in short]

    async def consume(i: int):
        async for _ in short[i].tokens():
            times[i].append(time.perf_counter())

    tasks = [asyncio.create_task(consume(i)) for i in range(streams)]
    for s in short:
        engine.submit(s)
    while min(len(t) for t in times) < 4:
        await asyncio.sleep(0.01)
    arrival = time.perf_counter()
    big = engine.submit(Generation(torch.randint(0, 1000, (long,), generator=g).tolist(), 1))
    async for _ in big.tokens():
        first = time.perf_counter()
    await asyncio.gather(*tasks)
    engine.close()
    during, outside = [], []
    for t in times:
        for a, b in zip(t, t[1:]):
            (during if b > arrival and a < first else outside).append(b - a)
    return {"chunk": chunk, "ttft_s": first - arrival, "max_gap_during_s": max(during),
            "mean_gap_outside_s": statistics.mean(outside)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--chunks", default="128,256,512")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--long", type=int, default=1024)
    parser.add_argument("--decode-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    print(f"{args.streams} streams decoding, then a {args.long}-token prompt; {torch.get_num_threads()} threads")
    print(f"{'chunk':>6} {'long TTFT s':>12} {'max gap during s':>17} {'mean gap outside s':>19}")
    for chunk in [int(c) for c in args.chunks.split(",")]:
        r = asyncio.run(run(model, chunk, args.streams, args.long, args.decode_tokens))
        print(f"{r['chunk']:>6} {r['ttft_s']:>12.2f} {r['max_gap_during_s']:>17.2f} {r['mean_gap_outside_s']:>19.3f}",
              flush=True)


if __name__ == "__main__":
    main()
