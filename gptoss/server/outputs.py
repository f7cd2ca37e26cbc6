"""Generated tokens -> the API's objects: one "output" per endpoint, fed token by token.

Streaming sends what an output returns as server-sent events; non-streaming sums the same pieces up,
so the two always agree. Harmony messages map onto the API as vLLM maps them: the analysis channel is
the reasoning (`reasoning_content` in chat, reasoning items in responses), a message with a recipient
(`functions.NAME`, `NAMESPACE.NAME`) is a tool call, and everything else is the answer's text. A call
of a freeform tool is a custom tool call; in responses, a call of a built-in tool the server runs is a
web_search_call (browser) or code_interpreter_call (python) item, completed once the server has run it.

Log-probabilities, when asked for, come with the text they belong to: in chat and responses those of
the answer's tokens (not the reasoning's, nor the message headers'), in completions those of every token.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping

from gptoss.chat.harmony import FUNCTIONS, FunctionTool, MessageEnd, MessageStart, StreamParser, TextDelta
from gptoss.chat.tokenizer import NUM_TEXT_TOKENS, TextDecoder, get_tokenizer
from gptoss.server.engine import TokenLogprobs
from gptoss.server.prompts import encrypt_reasoning
from gptoss.tools.builtin import BROWSER


def token_entry(token: int, logprob: float) -> dict:
    """A token as OpenAI's logprobs show it: its text (bytes that are not whole UTF-8 shown escaped), its
    bytes and its log-probability."""
    raw = get_tokenizer().decode_single_token_bytes(token)
    return {"token": raw.decode("utf-8", errors="backslashreplace"), "logprob": logprob, "bytes": list(raw)}


def logprob_entry(lp: TokenLogprobs) -> dict:
    """Chat's and responses' entry: the token and its likeliest alternatives."""
    return {**token_entry(lp.token, lp.logprob), "top_logprobs": [token_entry(t, v) for t, v in lp.top]}


class StopStrings:
    """Cuts text at the first stop string. Text that may be the start of one is held back until it is not."""

    def __init__(self, stops: list[str]):
        self.stops, self.held, self.hit = stops, "", False

    def feed(self, text: str) -> str:
        """The text that is safe to send now."""
        text = self.held + text
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.hit, self.held = True, ""
            return text[:min(cuts)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


def kind_of(channel: str | None, recipient: str | None, tools: Mapping[str, FunctionTool] = {}) -> str:
    """Where a harmony message goes in the API: "function_call", "custom_tool_call" (a freeform tool),
    "web_search_call" or "code_interpreter_call" (a built-in tool among `tools`, by recipient, which the
    server runs), "reasoning", or "text" (the answer). A recipient that is not among `tools` (the model
    may address anything when no tool constrains it) is a function call by that name."""
    if recipient:
        tool = tools.get(recipient)
        if tool is not None and tool.builtin:
            return "web_search_call" if tool.namespace == BROWSER else "code_interpreter_call"
        return "custom_tool_call" if tool is not None and tool.text_input is not None else "function_call"
    return "reasoning" if channel == "analysis" else "text"


def split_recipient(recipient: str) -> tuple[str, str | None]:
    """"functions.get_weather" -> ("get_weather", None); "crm.lookup" -> ("lookup", "crm")."""
    namespace, _, name = recipient.partition(".")
    if not name:
        return recipient, None
    return name, None if namespace == FUNCTIONS else namespace


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


class Output:
    """What one endpoint makes of the tokens of one generation: feed() each token, end() once.

    Both return the pieces to stream (chunk deltas or events); `stopped` turns True when a stop string
    ends the answer early, so the generation can be cancelled.
    """

    def __init__(self):
        self.completion_tokens = 0
        self.reasoning_tokens = 0   # tokens of analysis messages (usage's reasoning_tokens)
        self.in_reasoning = False
        self.stopped = False

    def feed(self, token: int, logprobs: TokenLogprobs | None = None) -> list:
        self.completion_tokens += 1
        self.reasoning_tokens += self.in_reasoning
        return self._feed(token, logprobs)

    def _feed(self, token: int, logprobs: TokenLogprobs | None) -> list:
        raise NotImplementedError

    def end(self) -> list:
        raise NotImplementedError


class ChatOutput(Output):
    """Harmony events -> chat.completion.chunk deltas: content, reasoning_content, tool_calls."""

    def __init__(self, stops: list[str], tools: list[FunctionTool] | tuple[FunctionTool, ...] = ()):
        super().__init__()
        self.parser, self.stop, self.tool_calls = StreamParser(), StopStrings(stops), 0
        self.tools = {t.recipient: t for t in tools}
        self.call_field = "function"  # of the call in progress: "function" (arguments) or "custom" (input)
        self.answer = AnswerLogprobs()

    def _feed(self, token: int, logprobs: TokenLogprobs | None) -> list[dict]:
        deltas = self._deltas(self.parser.feed(token))
        self.answer.attach(token, logprobs, [d for d in deltas if "content" in d])
        return deltas

    def end(self) -> list[dict]:
        deltas = self._deltas(self.parser.end())
        if tail := self.stop.flush():
            deltas.append({"content": tail})
        self.answer.attach(None, None, [d for d in deltas if "content" in d])
        return deltas

    def _deltas(self, events) -> list[dict]:
        deltas = []
        for event in events:
            if isinstance(event, MessageStart) and event.recipient:
                custom = kind_of(event.channel, event.recipient, self.tools) == "custom_tool_call"
                self.call_field, text_field = ("custom", "input") if custom else ("function", "arguments")
                name, _ = split_recipient(event.recipient)
                deltas.append({"tool_calls": [{"index": self.tool_calls, "id": new_id("call_"), "type": self.call_field,
                                               self.call_field: {"name": name, text_field: ""}}]})
                self.tool_calls += 1
            elif isinstance(event, MessageStart):
                self.answer.in_answer = kind_of(event.channel, event.recipient) == "text"
                self.in_reasoning = kind_of(event.channel, event.recipient) == "reasoning"
            elif isinstance(event, MessageEnd):
                self.answer.in_answer = self.in_reasoning = False
            if isinstance(event, TextDelta) and not self.stopped:
                kind = kind_of(event.channel, event.recipient)
                if kind == "function_call":
                    text_field = "input" if self.call_field == "custom" else "arguments"
                    deltas.append({"tool_calls": [{"index": self.tool_calls - 1,
                                                   self.call_field: {text_field: event.text}}]})
                elif kind == "reasoning":
                    deltas.append({"reasoning_content": event.text})
                elif text := self.stop.feed(event.text):
                    deltas.append({"content": text})
                self.stopped = self.stop.hit
        return deltas

    def finish_reason(self, engine_reason: str) -> str:
        if self.tool_calls and engine_reason != "length":  # a call cut off by the budget is not a call
            return "tool_calls"
        return "stop" if self.stopped else engine_reason

    @staticmethod
    def message(deltas: list[dict]) -> dict:
        """The whole assistant message the deltas add up to (their logprobs apart: `ChatOutput.logprobs`)."""
        content, reasoning, calls = [], [], []
        for delta in deltas:
            content.append(delta.get("content", ""))
            reasoning.append(delta.get("reasoning_content", ""))
            for call in delta.get("tool_calls", []):
                if "id" in call:
                    calls.append({**call, call["type"]: dict(call[call["type"]])})
                else:
                    whole = calls[call["index"]]
                    for key, text in call[whole["type"]].items():
                        whole[whole["type"]][key] += text
        for call in calls:
            del call["index"]
        return {"role": "assistant", "content": "".join(content) or (None if calls else ""),
                "reasoning_content": "".join(reasoning) or None, "tool_calls": calls or None}

    @staticmethod
    def logprobs(deltas: list[dict]) -> dict:
        return {"content": [entry for delta in deltas for entry in delta.get("logprobs", [])], "refusal": None}


class AnswerLogprobs:
    """Hands the answer's tokens' log-probabilities to the text pieces they produce. A token may complete
    no character (its bytes wait for the next), so entries wait for the next piece of answer text."""

    def __init__(self):
        self.in_answer = False
        self.pending: list[dict] = []

    def attach(self, token: int | None, logprobs: TokenLogprobs | None, pieces: list[dict]) -> list[dict]:
        """After feeding `token`: if it is answer text, its entry joins the waiting ones; they all go to the
        last of `pieces` (dicts whose "logprobs" list they join), if any. Returns the entries handed over."""
        if logprobs is not None and token is not None and token < NUM_TEXT_TOKENS and self.in_answer:
            self.pending.append(logprob_entry(logprobs))
        if not (pieces and self.pending):
            return []
        handed, self.pending = self.pending, []
        pieces[-1]["logprobs"] = pieces[-1].get("logprobs", []) + handed
        return handed


class CompletionOutput(Output):
    """Tokens -> pieces {"text", "tokens"} (`TextDecoder`: a character split across tokens comes out whole,
    special tokens carry no text), cut at the first stop string; "tokens" lists the TokenLogprobs of the
    tokens the piece completes, when asked for."""

    def __init__(self, stops: list[str], eos_tokens: tuple[int, ...]):
        super().__init__()
        self.eos = frozenset(eos_tokens)
        self.decoder = TextDecoder()
        self.stop = StopStrings(stops)
        self.pending: list[TokenLogprobs] = []

    def _feed(self, token: int, logprobs: TokenLogprobs | None) -> list[dict]:
        if token in self.eos or self.stopped:  # the end-of-text token is not part of the text
            return []
        if logprobs is not None:
            self.pending.append(logprobs)
        text = self.stop.feed(self.decoder.feed(token))
        self.stopped = self.stop.hit
        return self._piece(text)

    def end(self) -> list[dict]:
        if self.stopped:
            return []
        return self._piece(self.stop.feed(self.decoder.flush()) + self.stop.flush())

    def _piece(self, text: str) -> list[dict]:
        if not text:
            return []
        piece, self.pending = {"text": text, "tokens": self.pending}, []
        return [piece]

    def finish_reason(self, engine_reason: str) -> str:
        return "stop" if self.stopped else engine_reason


class ResponsesOutput(Output):
    """Harmony messages -> Responses API output items (reasoning, message, function_call, custom_tool_call,
    web_search_call, code_interpreter_call), and the streaming events that build them: output_item.added,
    the deltas, the done events.

    tools: what the request offers, by recipient. summary: reasoning items also carry their text as their
    summary (gpt-oss writes no separate one). encrypted: they carry it as `encrypted_content` too.
    code_outputs: code_interpreter_call items carry what the code printed. cite: turns the answer's
    citations of browser pages into text and url_citation annotations (`Browser.normalize_citations`).

    A call of a built-in tool stays open when its message ends (`pending_call`): the server runs it, then
    `complete_call` closes the item and `next_round` readies the output for the completion that follows.
    """

    def __init__(self, tools: list[FunctionTool] | tuple[FunctionTool, ...] = (), summary: bool = False,
                 encrypted: bool = False, code_outputs: bool = False,
                 cite: Callable[[str], tuple[str, list[dict]]] | None = None, container_id: str | None = None):
        super().__init__()
        self.tools = {t.recipient: t for t in tools}
        self.summary, self.encrypted, self.code_outputs = summary, encrypted, code_outputs
        self.citations = Citations(cite) if cite else None
        self.container_id = container_id or new_id("cntr_")
        self.parser = StreamParser()
        self.items: list[dict] = []
        self.answer = AnswerLogprobs()
        self.pending_call: dict | None = None  # {"recipient", "text", "index"}: a built-in call to run
        self.code_logs: dict[str, str] = {}    # python's answers by item id, stored even when not returned

    def _feed(self, token: int, logprobs: TokenLogprobs | None) -> list[dict]:
        return self._events(self.parser.feed(token), token, logprobs)

    def end(self) -> list[dict]:
        return self._events(self.parser.end(), None, None)

    def next_round(self) -> None:
        """The server answered a built-in call: what follows is a new completion, after <|start|>assistant."""
        self.parser, self.pending_call = StreamParser(), None

    def _events(self, harmony_events, token: int | None, logprobs: TokenLogprobs | None) -> list[dict]:
        out, text_deltas = [], []
        for event in harmony_events:
            if isinstance(event, MessageStart):
                out += self._open(kind_of(event.channel, event.recipient, self.tools), event.recipient)
                self.answer.in_answer = self.items[-1]["type"] == "message"
                self.in_reasoning = self.items[-1]["type"] == "reasoning"
            elif isinstance(event, TextDelta):
                out += self._delta(event.text)
                if out and out[-1]["type"] == "response.output_text.delta":
                    text_deltas.append(out[-1])
            elif isinstance(event, MessageEnd):
                if self.citations is not None and self.items[-1]["type"] == "message":
                    out += self._text_delta(self.citations.flush(), cite=False)
                self._attach(token, logprobs, text_deltas)  # before the part closes
                token, text_deltas = None, []
                out += self._close(event.message.recipient)
                self.answer.in_answer = self.in_reasoning = False
        self._attach(token, logprobs, text_deltas)
        return out

    def _attach(self, token: int | None, logprobs: TokenLogprobs | None, text_deltas: list[dict]) -> None:
        """The answer tokens' entries go to the last text delta of this step and to the message's part."""
        handed = self.answer.attach(token, logprobs, text_deltas)
        if handed:
            self.items[-1]["content"][0]["logprobs"] += handed

    def _where(self) -> dict:
        item = self.items[-1]
        return {"item_id": item["id"], "output_index": len(self.items) - 1}

    def _open(self, kind: str, recipient: str | None) -> list[dict]:
        if kind in ("function_call", "custom_tool_call"):
            name, namespace = split_recipient(recipient)
            field = "arguments" if kind == "function_call" else "input"
            item = {"type": kind, "id": new_id("fc_" if kind == "function_call" else "ctc_"),
                    "call_id": new_id("call_"), "name": name, field: "", "status": "in_progress"}
            if namespace:
                item["namespace"] = namespace
        elif kind == "web_search_call":  # shown once its arguments are complete (`_close`)
            item = {"type": kind, "id": new_id("ws_"), "status": "in_progress", "arguments": ""}
        elif kind == "code_interpreter_call":
            item = {"type": kind, "id": new_id("ci_"), "status": "in_progress", "code": "",
                    "container_id": self.container_id, "outputs": None}
        elif kind == "reasoning":
            item = {"type": "reasoning", "id": new_id("rs_"), "summary": [], "content": [], "status": "in_progress"}
        else:
            item = {"type": "message", "id": new_id("msg_"), "role": "assistant", "content": [],
                    "status": "in_progress"}
        self.items.append(item)
        if kind == "web_search_call":
            return []
        events = [self._added()]
        if kind == "code_interpreter_call":
            events.append({"type": "response.code_interpreter_call.in_progress", **self._where()})
        elif kind in ("reasoning", "text"):
            item["content"] = [self._empty_part()]
            events.append({"type": "response.content_part.added", **self._where(), "content_index": 0,
                           "part": self._empty_part()})
            if kind == "reasoning" and self.summary:
                item["summary"] = [{"type": "summary_text", "text": ""}]
                events.append({"type": "response.reasoning_summary_part.added", **self._where(), "summary_index": 0,
                               "part": {"type": "summary_text", "text": ""}})
        return events

    def _added(self) -> dict:
        return {"type": "response.output_item.added", "output_index": len(self.items) - 1, "item": dict(self.items[-1])}

    def _empty_part(self) -> dict:
        if self.items[-1]["type"] == "reasoning":
            return {"type": "reasoning_text", "text": ""}
        return {"type": "output_text", "text": "", "annotations": [], "logprobs": []}

    def _delta(self, text: str) -> list[dict]:
        item = self.items[-1]
        kind = item["type"]
        if kind in ("function_call", "custom_tool_call"):
            field = "arguments" if kind == "function_call" else "input"
            item[field] += text
            return [{"type": f"response.{kind}_{field}.delta", **self._where(), "delta": text}]
        if kind == "web_search_call":
            item["arguments"] += text
            return []
        if kind == "code_interpreter_call":
            item["code"] += text
            return [{"type": "response.code_interpreter_call_code.delta", **self._where(), "delta": text}]
        if kind == "reasoning":
            item["content"][0]["text"] += text
            events = [{"type": "response.reasoning_text.delta", **self._where(), "content_index": 0, "delta": text}]
            if self.summary:
                item["summary"][0]["text"] += text
                events.append({"type": "response.reasoning_summary_text.delta", **self._where(), "summary_index": 0,
                               "delta": text})
            return events
        return self._text_delta(text)

    def _text_delta(self, text: str, cite: bool = True) -> list[dict]:
        """Answer text; with citations, the text they become and their annotations."""
        annotations = []
        part = self.items[-1]["content"][0]
        if self.citations is not None and cite:
            text, annotations = self.citations.feed(text, part["text"])
        events = []
        if text:
            part["text"] += text
            events.append({"type": "response.output_text.delta", **self._where(), "content_index": 0, "delta": text,
                           "logprobs": []})
        for annotation in annotations:
            part["annotations"].append(annotation)
            events.append({"type": "response.output_text.annotation.added", **self._where(), "content_index": 0,
                           "annotation_index": len(part["annotations"]) - 1, "annotation": annotation})
        return events

    def _close(self, recipient: str | None) -> list[dict]:
        item = self.items[-1]
        kind = item["type"]
        if kind in ("web_search_call", "code_interpreter_call"):
            return self._start_call(recipient)
        item["status"] = "completed"
        if kind == "function_call":
            events = [{"type": "response.function_call_arguments.done", **self._where(),
                       "name": item["name"], "arguments": item["arguments"]}]
        elif kind == "custom_tool_call":
            events = [{"type": "response.custom_tool_call_input.done", **self._where(), "input": item["input"]}]
        else:
            part = item["content"][0]
            text_kind = "reasoning_text" if kind == "reasoning" else "output_text"
            done = {"type": f"response.{text_kind}.done", **self._where(), "content_index": 0, "text": part["text"]}
            if text_kind == "output_text":
                done["logprobs"] = part["logprobs"]
            events = [done, {"type": "response.content_part.done", **self._where(), "content_index": 0, "part": part}]
            if kind == "reasoning" and self.summary:
                summary = item["summary"][0]
                events += [{"type": "response.reasoning_summary_text.done", **self._where(), "summary_index": 0,
                            "text": summary["text"]},
                           {"type": "response.reasoning_summary_part.done", **self._where(), "summary_index": 0,
                            "part": summary}]
            if kind == "reasoning" and self.encrypted:
                item["encrypted_content"] = encrypt_reasoning(part["text"])
        return events + [self._done()]

    def _done(self) -> dict:
        return {"type": "response.output_item.done", "output_index": len(self.items) - 1, "item": self.items[-1]}

    def _start_call(self, recipient: str) -> list[dict]:
        """A built-in call's message is complete: the server runs it next (`complete_call`)."""
        item = self.items[-1]
        self.pending_call = {"recipient": recipient, "index": len(self.items) - 1,
                             "text": item["code"] if item["type"] == "code_interpreter_call" else item.pop("arguments")}
        if item["type"] == "code_interpreter_call":
            return [{"type": "response.code_interpreter_call_code.done", **self._where(), "code": item["code"]},
                    {"type": "response.code_interpreter_call.interpreting", **self._where()}]
        item["action"] = planned_action(recipient, self.pending_call["text"])
        return [self._added(), {"type": "response.web_search_call.in_progress", **self._where()},
                {"type": "response.web_search_call.searching", **self._where()}]

    def complete_call(self, answer: str, action: dict | None = None, failed: bool = False) -> list[dict]:
        """The server ran `pending_call` (or refused to: `failed`) and the tool answered `answer` (a browser
        call did `action`, as `Browser.last_action` shows it; None: it failed): closes its item."""
        item = self.items[self.pending_call["index"]]
        failed = failed or item["type"] == "web_search_call" and action is None
        item["status"] = "failed" if failed else "completed"
        if item["type"] == "code_interpreter_call":
            self.code_logs[item["id"]] = answer
            if self.code_outputs:
                item["outputs"] = [{"type": "logs", "logs": answer}]
            completed = "response.code_interpreter_call.completed"
        else:
            item["action"] = action or item["action"]
            completed = "response.web_search_call.completed"
        return [{"type": completed, **self._where()}, self._done()]

    def abandon_call(self) -> list[dict]:
        """`pending_call` was cut off before its end (budget, timeout): it is not run; its item ends incomplete."""
        self.items[self.pending_call["index"]]["status"] = "incomplete"
        self.pending_call = None
        return [self._done()]

    def items_to_store(self) -> list[dict]:
        """The items as a later turn (previous_response_id) needs them: python's answers included."""
        return [{**item, "outputs": [{"type": "logs", "logs": self.code_logs[item["id"]]}]}
                if item["id"] in self.code_logs else item for item in self.items]


def planned_action(recipient: str, arguments: str) -> dict:
    """A browser call's web_search_call action as its arguments state it, before it runs."""
    try:
        args = json.loads(arguments)
    except ValueError:
        args = {}
    args = args if isinstance(args, dict) else {}
    function = recipient.removeprefix(BROWSER + ".")
    if function == "search":
        return {"type": "search", "query": str(args.get("query", ""))}
    if function == "find":
        return {"type": "find_in_page", "pattern": str(args.get("pattern", "")), "url": ""}
    target = args.get("id")
    return {"type": "open_page", "url": target if isinstance(target, str) else None}


class Citations:
    """The answer's citations of browser pages (【cursor†L3-L5】), turned into text and url_citation
    annotations as they stream: text from an opening 【 is held back until its 】 arrives."""

    def __init__(self, cite: Callable[[str], tuple[str, list[dict]]]):
        self.cite, self.held = cite, ""

    def feed(self, text: str, sent: str) -> tuple[str, list[dict]]:
        """The text that is safe to send now after the answer's text `sent` so far, and the annotations
        within it, indexed into the whole answer."""
        text = self.held + text
        out, annotations, self.held = "", [], ""
        while text:
            start = text.find("【")
            if start < 0:
                out, text = out + text, ""
            elif (end := text.find("】", start)) < 0:
                out, self.held, text = out + text[:start], text[start:], ""
            else:
                out += text[:start]
                # With the character before it, so the citation's text knows whether a space precedes it.
                before = (sent + out)[-1:]
                cited, found = self.cite(before + text[start:end + 1])
                cited, shift = cited[len(before):], len(sent) + len(out) - len(before)
                annotations += [{**a, "start_index": a["start_index"] + shift, "end_index": a["end_index"] + shift}
                                for a in found]
                out, text = out + cited, text[end + 1:]
        return out, annotations

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held
