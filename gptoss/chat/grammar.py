"""Constrained decoding of harmony completions, through llguidance.

What the model may write after the prompt's `<|start|>assistant` is one grammar over its tokens, special
tokens included: free messages on the analysis channel (reasoning stays free) and, when tools are
offered, preambles on the commentary channel, then the ending the request asks for:

    final answer     <|channel|>final<|message|> TEXT-or-JSON <|return|>
    function call    <|channel|>commentary to=functions.NAME <|constrain|>json<|message|> ARGS <|call|>

A JSON answer fits the request's schema (`response_format`, Responses `text.format`), a call's ARGS
always fit that tool's `parameters` schema (a freeform tool's text its lark or regex grammar, if it has
one), and `tool_choice` "required" or a named tool removes the final answer from the endings. Calls of
the built-in tools (browser, python) have headers of their own (`_call_header`). llguidance is made for
this: it compiles a schema in milliseconds, computes the mask of allowed tokens over all 201,088 in about
0.2 ms a token (benchmarks/grammar_engines.py compares it with xgrammar), and reads harmony's special
tokens inside the grammar.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass

import llguidance
import llguidance.numpy
import torch

from gptoss.chat.harmony import FunctionTool, TextInput
from gptoss.chat.tokenizer import get_tokenizer
from gptoss.errors import GptossError

ANY_OBJECT = {"type": "object"}
# JSON as json.dumps writes it: one space after ":" and ",", no other whitespace. Free whitespace lets a
# model wander off into blanks for ever (a known failure of grammar-constrained decoding), and gives a
# JSON parser nothing.
JSON_LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def _json(schema: dict) -> str:
    """A schema as llguidance's lark embeds it, with the fixed layout."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_LAYOUT})


class GrammarError(GptossError):
    """A schema or grammar that llguidance cannot compile."""


@functools.cache
def lltokenizer(vocab_size: int) -> llguidance.LLTokenizer:
    """o200k_harmony for llguidance, over the model's `vocab_size` logits (about a second, done once)."""
    enc = get_tokenizer()
    # tiktoken names id 200018 twice (<|endofprompt|>, inherited from o200k_base, and <|reserved_200018|>).
    specials = {name: i for name, i in enc._special_tokens.items() if name != "<|endofprompt|>"}
    return llguidance.LLTokenizer.from_tiktoken(encoder=enc._mergeable_ranks, special_tokens=specials,
                                                pattern=enc._pat_str, eos_token=enc._special_tokens["<|return|>"],
                                                n_vocab=vocab_size)


@dataclass(frozen=True)
class OutputRules:
    """What a completion must look like. answer_schema: JSON schema of the final answer (None: free
    text). tools: the tools it may call, whose inputs must fit their schemas or grammars. tool_choice:
    "auto" (answer or call), "required" (some call), or a recipient ("functions.get_weather") or a
    namespace ("browser") whose calls alone may end the completion."""

    answer_schema: dict | None = None
    tools: tuple[FunctionTool, ...] = ()
    tool_choice: str = "auto"

    @property
    def constrained(self) -> bool:
        return self.answer_schema is not None or bool(self.tools)

    def grammar(self) -> str:
        """The rules as a llguidance grammar (its JSON form): a lark grammar whose endings are the final
        answer and one rule per callable tool, with each freeform tool's own grammar as a sub-grammar."""
        calls = [t for t in self.tools if self.tool_choice in ("auto", "required", t.recipient, t.namespace)]
        endings = [f"call_{i}" for i in range(len(calls))]
        if self.tool_choice == "auto":
            endings.insert(0, "final")
        lines = [
            f"start: {'(analysis | preamble)*' if self.tools else 'analysis*'} ({' | '.join(endings)})",
            'analysis: <|channel|> "analysis" <|message|> TEXT <|end|> <|start|> "assistant"',
            'preamble: <|channel|> "commentary" <|message|> TEXT <|end|> <|start|> "assistant"',
            "TEXT: /(.|\\n)*/",
        ]
        answer = "TEXT" if self.answer_schema is None else _json(self.answer_schema)
        lines.append(f'final: <|channel|> "final" <|message|> {answer} <|return|>')
        grammars = []
        for i, tool in enumerate(calls):
            if tool.text_input is None:
                body = _json(tool.parameters or ANY_OBJECT)
            elif tool.text_input.definition is None:
                body = "TEXT"
            else:
                body = f"@input_{i}"
                grammars.append({"name": f"input_{i}", "lark_grammar": _text_grammar(tool.text_input)})
            lines.append(f"call_{i}: {_call_header(tool)} <|message|> {body} <|call|>")
        return json.dumps({"grammars": [{"name": "completion", "lark_grammar": "\n".join(lines) + "\n"}, *grammars]})


def _call_header(tool: FunctionTool) -> str:
    """A call's header after <|start|>assistant, in lark. The developer's functions as harmony's guide
    writes them (commentary channel, recipient after it, <|constrain|>json for JSON); the built-in tools
    on either channel, with the recipient before or after it (harmony renders it before), "code" or no
    content type."""
    to = f'" to={tool.recipient}"'
    if not tool.builtin:
        constrain = "" if tool.text_input else '" " <|constrain|> "json"'
        return f'<|channel|> "commentary to={tool.recipient}" ' + constrain
    channel = '("analysis" | "commentary")'
    return f'(<|channel|> {channel} {to} | {to} <|channel|> {channel}) (" code")?'


def _text_grammar(text_input: TextInput) -> str:
    """A freeform tool's grammar as a lark grammar of its own: OpenAI's custom tools give lark or a regex."""
    if text_input.syntax == "regex":
        return "start: /" + re.sub(r"(?<!\\)/", r"\\/", text_input.definition) + "/\n"  # unescaped / ends it
    if text_input.syntax == "lark":
        return text_input.definition
    raise GrammarError(f"a tool's grammar syntax must be lark or regex, not {text_input.syntax!r}")


class Constraint:
    """One generation's place in its grammar: `mask` the logits of the next token, `advance` with it."""

    def __init__(self, rules: OutputRules, vocab_size: int):
        tokenizer = lltokenizer(vocab_size)
        self._matcher = llguidance.LLMatcher(tokenizer, rules.grammar(), log_level=0)
        if error := self._matcher.get_error():
            raise GrammarError(f"the output format cannot be compiled: {error}")
        self._bitmask = llguidance.numpy.allocate_token_bitmask(1, tokenizer.vocab_size)  # [1, V / 32] int32
        self._bits = torch.arange(32, dtype=torch.int32)

    def mask(self, logits: torch.Tensor) -> None:
        """logits [1, V]: tokens the grammar does not allow next get -inf, in place. (llguidance.torch
        would do it through torch.compile, which on a CPU compiles C++ on first use.)"""
        llguidance.numpy.fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        words = torch.from_numpy(self._bitmask)                                  # bit i of word w: token 32w + i
        allowed = ((words[..., None] >> self._bits) & 1).view(1, -1)[:, :logits.shape[-1]].bool()
        logits.masked_fill_(~allowed.to(logits.device), float("-inf"))

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise GrammarError(f"token {token} does not fit the output format: {self._matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The completion is complete: nothing more may follow."""
        return self._matcher.is_stopped()
