"""`gptoss serve`: the OpenAI-compatible HTTP server (see docs/server.md)."""

from __future__ import annotations

import sys
from pathlib import Path

from gptoss.cli.options import add_kv_memory_option, add_model_options, kv_memory, load_from_args, parse_bytes


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API "
                                            "(chat completions, responses, completions)")
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests generated at once; more wait their turn (default 8)")
    p.add_argument("--max-context", type=int,
                   help="tokens per request, prompt and completion together (default: the model's context, "
                        "or what the KV memory holds if less)")
    add_kv_memory_option(p)
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="compute every prompt whole instead of reusing cached prefixes (for comparison)")
    p.add_argument("--store-path", type=Path, help="SQLite file of stored responses (Responses API `store`, "
                                                   "`previous_response_id`; default: ~/.cache/gptoss/responses.sqlite3)")
    p.add_argument("--store-size", default="256MiB", help="stored responses beyond this many bytes are dropped, "
                                                          "oldest first (default 256MiB)")
    p.add_argument("--served-model-name", help="the model id clients send (default: --model as given)")
    p.set_defaults(func=run)


def run(args) -> int:
    import uvicorn

    from gptoss.server import Engine, create_app
    from gptoss.server.store import ResponseStore, default_store_path

    model = load_from_args(args)
    memory = kv_memory(args, model, args.max_batch, min(args.max_context or model.config.max_context,
                                                        model.config.max_context))
    engine = Engine(model, max_batch=args.max_batch, context=args.max_context, kv_memory=memory,
                    prefix_reuse=not args.no_prefix_cache)
    name = args.served_model_name or args.model or model.config.name
    cache = engine.cache
    print(f"gptoss serve: {name} on http://{args.host}:{args.port}/v1, up to {engine.max_batch} requests at once "
          f"of up to {engine.context} tokens; KV cache {cache.nbytes / 2**20:.1f} MiB ({cache.num_pages} pages of "
          f"{cache.page_size} tokens), prefix reuse {'off' if args.no_prefix_cache else 'on'}", file=sys.stderr)
    store = ResponseStore(args.store_path or default_store_path(), parse_bytes(args.store_size, "--store-size"))
    print(f"gptoss serve: stored responses in {store.path}", file=sys.stderr)
    uvicorn.run(create_app(engine, name, store), host=args.host, port=args.port, log_level="warning")
    return 0
