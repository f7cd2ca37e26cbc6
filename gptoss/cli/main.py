"""`gptoss`: one command, a subcommand per job. Bad input ends in one line on stderr, not a traceback."""

from __future__ import annotations

import argparse
import sys

from gptoss.errors import GptossError
from gptoss.cli import bench, chat, checkpoint_commands, compare, generate, kv_cache, serve, study, train_nano


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptoss", description="GPT-OSS models in plain PyTorch")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in (checkpoint_commands, generate, kv_cache, chat, serve, bench, compare, study, train_nano):
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (GptossError, OSError) as e:  # bad input, or a file that cannot be read or written
        print(f"gptoss: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
