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

from gptoss.chat.grammar import OutputRules
from gptoss.chat.harmony import (Chat, MessageEnd, StreamParser, TextDelta, render_for_completion, render_tool_result,
                                 stop_tokens)
from gptoss.cli.options import (add_builtin_tool_options, add_kv_memory_option, add_model_options, add_sampling_options,
                                browser_backend, kv_memory, load_from_args, python_limits, sampling_params,
                                speculation)
from gptoss.errors import GptossError
from gptoss.generation.cache import KVCache
from gptoss.generation.generate import stream
from gptoss.generation.speculative import Speculation
from gptoss.tools.browser import Browser
from gptoss.tools.builtin import BuiltinTools
from gptoss.tools.python_sandbox import PythonSandbox

DIM, RESET = "\033[2m", "\033[0m"


def register(subparsers) -> None:
    p = subparsers.add_parser("chat", help="interactive chat in the harmony format")
    add_model_options(p)
    add_sampling_options(p, max_tokens=1024)
    p.add_argument("--reasoning", choices=("low", "medium", "high"), default="medium", help="reasoning effort")
    p.add_argument("--show-reasoning", action="store_true", help="print the model's reasoning, dimmed")
    p.add_argument("--system", help="developer instructions (harmony's developer message)")
    p.add_argument("--prompt", help="answer this one message and exit, instead of reading turns from the terminal")
    add_kv_memory_option(p)
    add_builtin_tool_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    backend, limits = browser_backend(args), python_limits(args)
    model = load_from_args(args)
    params = sampling_params(args, model.generation_config)
    cache = KVCache.for_bytes(model.config, kv_memory(args, model, 1, model.config.max_context), dtype=model.dtype,
                              device=model.device, kv_heads=model.kv_heads)
    tools = BuiltinTools(Browser(backend) if backend else None, PythonSandbox(limits) if limits else None)
    rules = OutputRules(tools=tuple(tools.functions())) if tools.functions() else None

    def new_chat() -> Chat:
        return Chat(reasoning_effort=args.reasoning, developer_instructions=args.system, builtin_tools=tools.configs())

    chat = new_chat()
    if args.prompt is None:
        print(f"{DIM}gptoss chat: /reset clears the conversation, /exit leaves{RESET}", flush=True)
        lines = iter(lambda: input("> "), None)  # until input() raises EOFError
    else:
        lines = iter([args.prompt])
    try:
        converse(model, chat, new_chat, tools, rules, cache, params, speculation(args), args, lines)
    finally:
        if tools.python is not None:
            tools.python.close()
    return 0


def converse(model, chat: Chat, new_chat, tools: BuiltinTools, rules: OutputRules | None, cache: KVCache, params,
             drafts: Speculation | None, args, lines) -> None:
    """The read-answer loop over the user's `lines`, until /exit or their end. `drafts`: --speculate's state,
    kept across turns so that its draft length adapts."""
    while True:
        try:
            line = next(lines).strip()
        except (EOFError, StopIteration):
            if args.prompt is None:
                print()
            return
        if line == "/exit":
            return
        if line == "/reset":
            chat = new_chat()
            print(f"{DIM}[conversation cleared]{RESET}", flush=True)
            continue
        if not line:
            continue
        prompt = render_for_completion(chat.user(line))
        turns = len(chat.turns) - 1
        reused = len(cache.cached_prefix(prompt)) * cache.page_size
        count, start = 0, time.perf_counter()
        try:
            while True:  # one completion, and one more after each call of a built-in tool
                parser, generated = StreamParser(), []
                for token in stream(model, prompt, args.max_tokens - count, params, stop_tokens=stop_tokens(),
                                    cache=cache, rules=rules, speculation=drafts):
                    generated.append(token)
                    for event in parser.feed(token):
                        show(event, args.show_reasoning)
                for event in parser.end():
                    show(event, args.show_reasoning)
                count += len(generated)
                chat.add(parser.messages)
                call = parser.messages[-1] if parser.messages else None
                if call is None or not tools.handles(call.recipient) or count >= args.max_tokens:
                    break
                answer = tools.run(call.recipient, call.text)
                sys.stdout.write(f"{DIM}{answer}{RESET}\n")
                chat.builtin_result(call.recipient, answer)
                prompt = prompt + generated + render_tool_result(call.recipient, answer)
        except GptossError as e:  # the conversation outgrew the context or the KV memory
            del chat.turns[turns:]
            print(f"\n{DIM}[{e}; /reset starts over]{RESET}", flush=True)
            continue
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
