"""`gptoss make-checkpoint` (random weights of a real geometry), `gptoss inspect` (what a checkpoint holds) and
`gptoss pull` (download what we load from the Hugging Face Hub)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from gptoss.errors import GptossError
from gptoss.model.config import PRESETS, ModelConfig, preset
from gptoss.weights.checkpoint import open_checkpoint
from gptoss.weights.hub import REPO_ID, download
from gptoss.weights.layout import LAYOUTS
from gptoss.weights.random_checkpoint import write_random_checkpoint


def register(subparsers) -> None:
    p = subparsers.add_parser("make-checkpoint", help="write a random-weight checkpoint of a real geometry",
                              description="Writes random weights in the real tensor names, shapes and dtypes "
                                          "(MXFP4 experts), streaming tensor by tensor.")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", default="gpt-oss-20b", choices=sorted(PRESETS))
    source.add_argument("--config", type=Path, help="a config.json (either flavour) to take the geometry from")
    p.add_argument("--out", type=Path, required=True, help="directory to write")
    p.add_argument("--layers", type=int, help="keep only this many layers (the alternation is kept)")
    p.add_argument("--layout", choices=LAYOUTS, default="hf", help="Hugging Face (default) or OpenAI original/")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=make_checkpoint)

    p = subparsers.add_parser("inspect", help="check a checkpoint directory and print what it holds")
    p.add_argument("model", type=Path)
    p.set_defaults(func=inspect)

    p = subparsers.add_parser("pull", help="download a model from the Hugging Face Hub (only what gptoss loads)",
                              description="Downloads the Hugging Face layout of a repository (config.json, "
                                          "generation_config.json, the safetensors and their index; not original/ "
                                          "or metal/) into the Hugging Face cache, resuming an interrupted download, "
                                          "and prints the directory. Later --model REPO finds it there, offline too.")
    p.add_argument("repo", help="a Hugging Face repo id, e.g. openai/gpt-oss-20b")
    p.add_argument("--revision", help="branch, tag or commit (default: main)")
    p.set_defaults(func=pull)


def make_checkpoint(args) -> int:
    cfg: ModelConfig = ModelConfig.from_json_file(args.config) if args.config else preset(args.preset)
    if args.layers is not None:
        if args.layers < 1:
            raise GptossError(f"--layers must be at least 1, got {args.layers}")
        cfg = cfg.with_layers(args.layers)
    start = time.perf_counter()
    out = write_random_checkpoint(cfg, args.out, layout=args.layout, seed=args.seed,
                                  progress=lambda msg: print(msg, file=sys.stderr))
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {cfg.name} ({cfg.num_layers} layers, {args.layout} layout, seed {args.seed}) to {out}: "
          f"{size / 1e9:.2f} GB in {time.perf_counter() - start:.1f} s")
    return 0


def inspect(args) -> int:
    ckpt = open_checkpoint(args.model)
    cfg = ckpt.config
    experts = "MXFP4" if ckpt.quantized else "dense"
    print(f"{ckpt.directory}: {ckpt.layout} layout, {len(ckpt.tensors)} tensors, {ckpt.nbytes / 1e9:.2f} GB, "
          f"experts {experts}, other weights {ckpt.float_dtype}")
    print(f"  {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} query / {cfg.num_kv_heads} KV heads "
          f"x {cfg.head_dim}, {cfg.num_experts} experts top-{cfg.experts_per_token}, vocab {cfg.vocab_size}, "
          f"window {cfg.sliding_window}, context {cfg.max_context}")
    gen = ckpt.generation_config
    sampling = ", ".join(f"{k} {v}" for k, v in (("do_sample", gen.do_sample), ("temperature", gen.temperature),
                                                 ("top_p", gen.top_p), ("top_k", gen.top_k)) if v is not None)
    print(f"  stops at tokens {list(gen.eos_token_ids)}; sampling defaults: {sampling or 'none'}")
    return 0


def pull(args) -> int:
    if not REPO_ID.match(args.repo):
        raise GptossError(f"{args.repo}: not a Hugging Face repo id (owner/name)")
    print(download(args.repo, revision=args.revision))
    return 0
