"""One forward pass through `load_model`: load time, forward time and the logits' sanity.

    /usr/bin/time -v python benchmarks/forward_pass.py --model DIR --tokens 16
reports peak RSS ("Maximum resident set size") beside the checkpoint's size on disk.
"""

import argparse
import time

import torch

from gptoss import load_model, open_checkpoint


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    size = open_checkpoint(args.model).nbytes
    start = time.perf_counter()
    model = load_model(args.model)
    loaded = time.perf_counter()
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = model(ids)
    done = time.perf_counter()
    print(f"checkpoint {size / 1e9:.2f} GB; load {loaded - start:.1f} s; forward of {args.tokens} tokens "
          f"{done - loaded:.1f} s; logits {tuple(logits.shape)} finite={bool(logits.isfinite().all())} "
          f"std={logits.std():.3f}")


if __name__ == "__main__":
    main()
