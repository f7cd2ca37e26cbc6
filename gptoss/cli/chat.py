"""`gptoss chat`: an interactive harmony conversation in the terminal.

The final answer streams as it is generated; the reasoning (analysis channel) streams dimmed when
--show-reasoning asks for it. The conversation is kept across turns (earlier reasoning is dropped from
the prompt after a final answer, as harmony prescribes), and so is the KV cache: a turn computes only
what follows the part of its prompt that the previous turns already computed. `/reset` starts over and
`/exit` leaves.
"""

from __future__ import annotations

import sys
import time

from gptoss.chat.harmony import Chat, MessageEnd, StreamParser, TextDelta, render_for_completion, stop_tokens
from gptoss.errors import GptossError
from gptoss.cli.options import (add_kv_memory_option, add_model_options, add_sampling_options, kv_memory,
                                load_from_args, sampling_params)
from gptoss.generation.cache import KVCache
from gptoss.generation.generate import stream

DIM, RESET = "\033[2m", "\033[0m"


def register(subparsers) -> None:
    p = subparsers.add_parser("chat", help="interactive chat in the harmony format")
    add_model_options(p)
    add_sampling_options(p, max_tokens=1024)
    p.add_argument("--reasoning", choices=("low", "medium", "high"), default="medium", help="reasoning effort")
    p.add_argument("--show-reasoning", action="store_true", help="print the model's reasoning, dimmed")
    p.add_argument("--system", help="developer instructions (harmony's developer message)")
    add_kv_memory_option(p)
    p.set_defaults(func=run)


def run(args) -> int:
    model = load_from_args(args)
    params = sampling_params(args, model.generation_config)
    cache = KVCache.for_bytes(model.config, kv_memory(args, model, 1, model.config.max_context), dtype=model.dtype,
                              device=model.device)
    new_chat = lambda: Chat(reasoning_effort=args.reasoning, developer_instructions=args.system)  # noqa: E731
    chat = new_chat()
    stops = stop_tokens()
    print(f"{DIM}gptoss chat: /reset clears the conversation, /exit leaves{RESET}", flush=True)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return 0
        if line == "/exit":
            return 0
        if line == "/reset":
            chat = new_chat()
            print(f"{DIM}[conversation cleared]{RESET}", flush=True)
            continue
        if not line:
            continue
        prompt = render_for_completion(chat.user(line))
        reused = len(cache.cached_prefix(prompt)) * cache.page_size
        parser, count, start = StreamParser(), 0, time.perf_counter()
        try:
            for token in stream(model, prompt, args.max_tokens, params, stop_tokens=stops, cache=cache):
                count += 1
                for event in parser.feed(token):
                    show(event, args.show_reasoning)
        except GptossError as e:  # the conversation outgrew the context or the KV memory
            chat.turns.pop()
            print(f"\n{DIM}[{e}; /reset starts over]{RESET}", flush=True)
            continue
        for event in parser.end():
            show(event, args.show_reasoning)
        chat.add(parser.messages)
        print(f"\n{DIM}[prompt {len(prompt)} tokens ({reused} cached), {count} new, "
              f"{count / (time.perf_counter() - start):.1f} tok/s]"
              f"{RESET}", flush=True)


def show(event, show_reasoning: bool) -> None:
    """Final-channel text as it comes; reasoning dimmed if asked; tool calls named; the rest hidden."""
    if isinstance(event, TextDelta):
        if event.recipient:
            sys.stdout.write(f"{DIM}{event.text}{RESET}")
        elif event.channel == "final":
            sys.stdout.write(event.text)
        elif show_reasoning:
            sys.stdout.write(f"{DIM}{event.text}{RESET}")
        sys.stdout.flush()
    elif isinstance(event, MessageEnd) and event.message.recipient:
        sys.stdout.write(f"{DIM}[tool call to {event.message.recipient}]{RESET}\n")
