"""`gptoss kv-cache`: the bytes of the KV cache gptoss allocates, for a geometry and context lengths."""

from __future__ import annotations

from gptoss.cli.options import parse_ints
from gptoss.generation.cache import PAGE_SIZE, PREFILL_CHUNK, allocated_kv_bytes
from gptoss.model.config import PRESETS, preset


def register(subparsers) -> None:
    p = subparsers.add_parser("kv-cache", help="bytes of the KV cache for a geometry and context lengths")
    p.add_argument("--preset", default="gpt-oss-20b", choices=sorted(PRESETS))
    p.add_argument("--context", default="4096,32768,131072", help="comma-separated context lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--chunk", type=int, default=PREFILL_CHUNK,
                   help="prefill chunk: sliding layers keep the pages of window - 1 + chunk positions")
    p.add_argument("--page-size", type=int, default=PAGE_SIZE, help=f"positions per page (default {PAGE_SIZE})")
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = preset(args.preset)
    print(f"{cfg.name}: KV cache, bf16, batch {args.batch}, {cfg.num_layers} layers "
          f"({sum(map(cfg.is_sliding, range(cfg.num_layers)))} sliding, window {cfg.sliding_window}), "
          f"pages of {args.page_size}")
    print(f"{'context':>9} {'full layers':>14} {'sliding layers':>15} {'total':>14}")
    for context in parse_ints(args.context, "--context"):
        b = allocated_kv_bytes(cfg, context, args.batch, args.chunk, args.page_size)
        print(f"{context:>9} {b['full_layers'] / 2**20:>10.1f} MiB {b['sliding_layers'] / 2**20:>11.2f} MiB "
              f"{b['total'] / 2**20:>10.1f} MiB   ({b['total']:,} bytes)")
    return 0
