"""`gptoss train-nano`: trains the nano model (the default model) on the synthetic harmony tasks on the CPU."""

from __future__ import annotations

import sys
from pathlib import Path

from gptoss.nano.train import Settings, plot_curve, train

DEFAULTS = Settings()


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-nano", help="train the nano model on synthetic harmony conversations and write its checkpoint",
        description="Trains a tiny GPT-OSS (sinks, alternating sliding window, top-2 MoE with clamped SwiGLU, the "
                    "o200k_harmony vocabulary) on seeded synthetic harmony conversations (arithmetic with digit-by-"
                    "digit reasoning, weather and calculator tool calls, JSON answers) and Python's documentation "
                    "prose, then writes OUT/model.safetensors (experts in MXFP4), config.json, "
                    "generation_config.json, training.json and loss.png. See docs/nano.md.")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--steps", type=int, default=DEFAULTS.steps, help=f"training steps (default {DEFAULTS.steps})")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                   help=f"rows per step (default {DEFAULTS.batch_size})")
    p.add_argument("--lr", type=float, default=DEFAULTS.lr, help=f"peak learning rate (default {DEFAULTS.lr})")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of the data and the initial weights")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                        warmup_steps=min(DEFAULTS.warmup_steps, max(1, args.steps // 10)))
    record = train(settings, args.out, log=lambda line: print(line, file=sys.stderr, flush=True),
                   progress=True)
    plot_curve(record, args.out / "loss.png")
    print(f"wrote {args.out / 'model.safetensors'} and loss.png", file=sys.stderr)
    return 0
