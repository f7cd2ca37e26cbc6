"""`gptoss study`: tiny variants at equal active parameters, trained on the same text on the CPU."""

from __future__ import annotations

import sys
from pathlib import Path

from gptoss.analysis import study
from gptoss.cli.options import parse_list
from gptoss.analysis.study import Settings

DEFAULTS = Settings()


def register(subparsers) -> None:
    names = ", ".join(v.name for v in study.default_variants())
    p = subparsers.add_parser(
        "study", help="train tiny architecture variants at equal active parameters and compare their losses",
        description="Trains tiny byte-level variants of a GPT-OSS-shaped model (wider vs deeper, few large vs "
                    "many small experts, 1:1 vs 5:1 vs no sliding window, sinks and attention bias on or off) "
                    "at equal active parameters per token, on the same text, batches and steps, on the CPU. "
                    f"The default text is {study.TEXT_SOURCE}. Writes OUT/results.md, OUT/results.json and "
                    "OUT/loss_curves.png, and prints the table.")
    p.add_argument("--out", type=Path, default=Path("study"), help="output folder (default: ./study)")
    p.add_argument("--variants", help=f"comma-separated variants to train (default: all: {names})")
    p.add_argument("--text", type=Path, help="train on this text file instead of Python's pydoc_data topics")
    p.add_argument("--steps", type=int, default=DEFAULTS.steps, help=f"training steps (default {DEFAULTS.steps})")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                   help=f"sequences per step (default {DEFAULTS.batch_size})")
    p.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len,
                   help=f"bytes per sequence (default {DEFAULTS.seq_len})")
    p.add_argument("--lr", type=float, default=DEFAULTS.lr, help=f"peak learning rate (default {DEFAULTS.lr})")
    p.add_argument("--eval-every", type=int, default=DEFAULTS.eval_every,
                   help=f"steps between evaluations (default {DEFAULTS.eval_every})")
    p.add_argument("--eval-windows", type=int, default=DEFAULTS.eval_windows,
                   help=f"training and validation windows scored at each evaluation (default {DEFAULTS.eval_windows})")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of the batches and initial weights")
    p.set_defaults(func=run)


def run(args) -> int:
    settings = Settings(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                        eval_every=args.eval_every, eval_windows=args.eval_windows, seed=args.seed)
    names = parse_list(args.variants, "--variants") if args.variants is not None else None
    variants = study.select(study.default_variants(), names)
    results = study.run(variants, study.load_text(args.text), settings, args.out,
                        log=lambda line: print(line, file=sys.stderr, flush=True),
                        source=str(args.text) if args.text else study.TEXT_SOURCE)
    sys.stdout.write(study.render(results))
    print(f"wrote {args.out / 'results.md'}, results.json and loss_curves.png", file=sys.stderr)
    return 0
