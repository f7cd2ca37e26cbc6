"""`gptoss serve`: the OpenAI-compatible HTTP server (see docs/server.md)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from gptoss.cli.options import (add_builtin_tool_options, add_kv_memory_option, add_model_options, browser_backend,
                                kv_memory, load_from_args, parse_bytes, python_limits)


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
    limits = p.add_argument_group("limits and access")
    limits.add_argument("--api-key", default=os.environ.get("GPTOSS_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                             "(default: $GPTOSS_API_KEY; none: open, which is why the default host is loopback)")
    limits.add_argument("--max-queue", type=int, default=256,
                        help="requests that may wait; beyond, 429 with Retry-After (default 256)")
    limits.add_argument("--request-timeout", type=float,
                        help="seconds a request may generate; then it ends as if out of budget (default: none)")
    limits.add_argument("--max-body", default="16MiB", help="largest request body (default 16MiB); larger: 413")
    limits.add_argument("--shutdown-grace", type=float, default=30.0,
                        help="on SIGTERM or Ctrl-C, seconds running requests get to finish (default 30)")
    add_builtin_tool_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import uvicorn

    from gptoss.server import Engine, create_app
    from gptoss.server.hosted import HostedTools
    from gptoss.server.store import ResponseStore, default_store_path
    from gptoss.tools.python_sandbox import PythonSessions

    limits = python_limits(args)
    hosted = HostedTools(browser_backend(args), PythonSessions(limits) if limits else None)
    model = load_from_args(args)
    memory = kv_memory(args, model, args.max_batch, min(args.max_context or model.config.max_context,
                                                        model.config.max_context))
    engine = Engine(model, max_batch=args.max_batch, context=args.max_context, kv_memory=memory,
                    prefix_reuse=not args.no_prefix_cache, max_waiting=args.max_queue)
    name = args.served_model_name or args.model or model.config.name
    cache = engine.cache
    print(f"gptoss serve: {name} on http://{args.host}:{args.port}/v1, up to {engine.max_batch} requests at once "
          f"of up to {engine.context} tokens; KV cache {cache.nbytes / 2**20:.1f} MiB ({cache.num_pages} pages of "
          f"{cache.page_size} tokens), prefix reuse {'off' if args.no_prefix_cache else 'on'}", file=sys.stderr)
    store = ResponseStore(args.store_path or default_store_path(), parse_bytes(args.store_size, "--store-size"))
    print(f"gptoss serve: stored responses in {store.path}", file=sys.stderr)
    web_search = f"through the browser over {args.browser_backend}" if hosted.browser_backend else "off"
    code_interpreter = "through the python sandbox" if hosted.python else "off"
    print(f"gptoss serve: web_search {web_search}, code_interpreter {code_interpreter}", file=sys.stderr)
    app = create_app(engine, name, store, api_key=args.api_key, request_timeout=args.request_timeout,
                     max_body_bytes=parse_bytes(args.max_body, "--max-body"), hosted=hosted)
    # uvicorn handles SIGTERM: it stops accepting, lets running requests finish for the grace period, then
    # closes the rest, and the app's shutdown stops the engine. Afterwards uvicorn raises the signal again for
    # the handler it found installed: this one, so that a drained shutdown exits 0 rather than "killed".
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=args.shutdown_grace)
    return 0
