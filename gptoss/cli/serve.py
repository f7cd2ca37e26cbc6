"""`gptoss serve`: the OpenAI-compatible HTTP server (see docs/server.md)."""

from __future__ import annotations

import sys

from gptoss.cli.options import add_model_options, load_from_args


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API "
                                            "(chat completions, responses, completions)")
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests generated at once; more wait for a free slot (default 8)")
    p.add_argument("--max-context", type=int,
                   help="tokens per request, prompt and completion together (default: the model's context); "
                        "the KV cache holds max-batch rows of this")
    p.add_argument("--served-model-name", help="the model id clients send (default: --model as given)")
    p.set_defaults(func=run)


def run(args) -> int:
    import uvicorn

    from gptoss.server import Engine, create_app

    model = load_from_args(args)
    engine = Engine(model, max_batch=args.max_batch, context=args.max_context)
    name = args.served_model_name or args.model or model.config.name
    print(f"gptoss serve: {name} on http://{args.host}:{args.port}/v1, {engine.max_batch} slots of "
          f"{engine.context} tokens (KV cache {engine.cache.nbytes / 2**20:.1f} MiB)", file=sys.stderr)
    uvicorn.run(create_app(engine, name), host=args.host, port=args.port, log_level="warning")
    return 0
