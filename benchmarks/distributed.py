"""Per-rank memory, bytes sent per decoded token and decode speed of a model split over torchrun's ranks.

    torchrun --standalone --nproc-per-node N benchmarks/distributed.py --model DIR [--gen 16 --threads 1]

Every rank prints one JSON line: its peak RSS (and its resident anonymous and file-backed memory, the
latter the mapped checkpoint pages), and, from its counted collectives (`Parallel.traffic`) over the decode
steps only, the calls and payload bytes per decoded token, in all and per layer. Rank 0 adds prefill and
decode tokens/s. Without torchrun it measures the single process.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from gptoss.distributed import Parallel
from gptoss.generation.benchmark import decode_seconds, prefill_seconds
from gptoss.generation.lockstep import Driver, follow
from gptoss.weights.checkpoint import load_model


def resident() -> dict:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) * 1024 / 2**30 for k in ("RssAnon", "RssFile")}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--gen", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    parallel = Parallel.from_environment()
    start = time.perf_counter()
    model = load_model(args.model, parallel=parallel)
    load_s = time.perf_counter() - start
    result = {"rank": parallel.rank, "ranks": parallel.size, "load_s": round(load_s, 2)}
    if parallel.rank == 0:
        driven = Driver(model, parallel) if parallel.size > 1 else model
        seconds, (sequence, logits) = prefill_seconds(driven, args.prompt, args.prompt, room=args.gen + 1)
        before = parallel.traffic.copy()
        decode_s = decode_seconds(driven, sequence, logits, args.gen)
        decode_traffic = parallel.traffic - before
        if parallel.size > 1:
            driven.stop()
        result |= {"prefill_tok_s": round(args.prompt / seconds, 2), "decode_tok_s": round(args.gen / decode_s, 3)}
        per_token = {k: v / args.gen for k, v in decode_traffic.items()}
        # Each layer all-reduces its attention and its experts' partial sums; the embedding one more.
        embedding = model.config.hidden_size * 4 if parallel.size > 1 else 0
        result |= {"per_token": per_token, "all_reduce_bytes_per_layer":
                   (per_token.get("all_reduce bytes", 0) - embedding) / model.config.num_layers}
    else:  # the followers run the same collectives as rank 0, so only rank 0 reports them
        follow(model, parallel)
        parallel.close()
    result |= {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
               **{k + "_gib": round(v, 3) for k, v in resident().items()}}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
