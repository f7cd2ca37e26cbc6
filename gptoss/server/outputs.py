"""Generated tokens -> the API's objects: one "output" per endpoint, fed token by token.

Streaming sends what an output returns as server-sent events; non-streaming sums the same pieces up,
so the two always agree. Harmony messages map onto the API as vLLM maps them: the analysis channel is
the reasoning (`reasoning_content` in chat, reasoning items in responses), a message with a recipient
(`functions.NAME`, on the commentary channel) is a tool call, and everything else is the answer's text.

Log-probabilities, when asked for, come with the text they belong to: in chat and responses those of
the answer's tokens (not the reasoning's, nor the message headers'), in completions those of every token.
"""

from __future__ import annotations

import uuid

from gptoss.chat.harmony import MessageEnd, MessageStart, StreamParser, TextDelta
from gptoss.chat.tokenizer import NUM_TEXT_TOKENS, TextDecoder, get_tokenizer
from gptoss.server.engine import TokenLogprobs


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


def kind_of(channel: str | None, recipient: str | None) -> str:
    """Where a harmony message goes in the API: a tool call, the reasoning, or the answer's text."""
    if recipient:
        return "tool_call"
    return "reasoning" if channel == "analysis" else "text"


def function_name(recipient: str) -> str:
    return recipient.removeprefix("functions.")


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

    def __init__(self, stops: list[str]):
        super().__init__()
        self.parser, self.stop, self.tool_calls = StreamParser(), StopStrings(stops), 0
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
                deltas.append({"tool_calls": [{"index": self.tool_calls, "id": new_id("call_"), "type": "function",
                                               "function": {"name": function_name(event.recipient),
                                                            "arguments": ""}}]})
                self.tool_calls += 1
            elif isinstance(event, MessageStart):
                self.answer.in_answer = kind_of(event.channel, event.recipient) == "text"
                self.in_reasoning = kind_of(event.channel, event.recipient) == "reasoning"
            elif isinstance(event, MessageEnd):
                self.answer.in_answer = self.in_reasoning = False
            if isinstance(event, TextDelta) and not self.stopped:
                kind = kind_of(event.channel, event.recipient)
                if kind == "tool_call":
                    deltas.append({"tool_calls": [{"index": self.tool_calls - 1,
                                                   "function": {"arguments": event.text}}]})
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
                    calls.append({**call, "function": dict(call["function"])})
                else:
                    calls[call["index"]]["function"]["arguments"] += call["function"]["arguments"]
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
    """Harmony messages -> Responses API output items (reasoning, message, function_call), and the
    streaming events that build them: output_item.added, the deltas, the done events."""

    def __init__(self):
        super().__init__()
        self.parser = StreamParser()
        self.items: list[dict] = []
        self.answer = AnswerLogprobs()

    def _feed(self, token: int, logprobs: TokenLogprobs | None) -> list[dict]:
        return self._events(self.parser.feed(token), token, logprobs)

    def end(self) -> list[dict]:
        return self._events(self.parser.end(), None, None)

    def _events(self, harmony_events, token: int | None, logprobs: TokenLogprobs | None) -> list[dict]:
        out, text_deltas = [], []
        for event in harmony_events:
            if isinstance(event, MessageStart):
                out += self._open(kind_of(event.channel, event.recipient), event.recipient)
                self.answer.in_answer = self.items[-1]["type"] == "message"
                self.in_reasoning = self.items[-1]["type"] == "reasoning"
            elif isinstance(event, TextDelta):
                out.append(self._delta(event.text))
                if out[-1]["type"] == "response.output_text.delta":
                    text_deltas.append(out[-1])
            elif isinstance(event, MessageEnd):
                self._attach(token, logprobs, text_deltas)  # before the part closes
                token, text_deltas = None, []
                out += self._close()
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
        if kind == "tool_call":
            item = {"type": "function_call", "id": new_id("fc_"), "call_id": new_id("call_"),
                    "name": function_name(recipient), "arguments": "", "status": "in_progress"}
        elif kind == "reasoning":
            item = {"type": "reasoning", "id": new_id("rs_"), "summary": [], "content": [], "status": "in_progress"}
        else:
            item = {"type": "message", "id": new_id("msg_"), "role": "assistant", "content": [],
                    "status": "in_progress"}
        self.items.append(item)
        events = [{"type": "response.output_item.added", "output_index": len(self.items) - 1, "item": dict(item)}]
        if kind != "tool_call":
            item["content"] = [self._empty_part()]
            events.append({"type": "response.content_part.added", **self._where(), "content_index": 0,
                           "part": self._empty_part()})
        return events

    def _empty_part(self) -> dict:
        if self.items[-1]["type"] == "reasoning":
            return {"type": "reasoning_text", "text": ""}
        return {"type": "output_text", "text": "", "annotations": [], "logprobs": []}

    def _delta(self, text: str) -> dict:
        item = self.items[-1]
        if item["type"] == "function_call":
            item["arguments"] += text
            return {"type": "response.function_call_arguments.delta", **self._where(), "delta": text}
        item["content"][0]["text"] += text
        if item["type"] == "reasoning":
            return {"type": "response.reasoning_text.delta", **self._where(), "content_index": 0, "delta": text}
        return {"type": "response.output_text.delta", **self._where(), "content_index": 0, "delta": text, "logprobs": []}

    def _close(self) -> list[dict]:
        item = self.items[-1]
        item["status"] = "completed"
        if item["type"] == "function_call":
            events = [{"type": "response.function_call_arguments.done", **self._where(),
                       "name": item["name"], "arguments": item["arguments"]}]
        else:
            part = item["content"][0]
            kind = "reasoning_text" if item["type"] == "reasoning" else "output_text"
            done = {"type": f"response.{kind}.done", **self._where(), "content_index": 0, "text": part["text"]}
            if kind == "output_text":
                done["logprobs"] = part["logprobs"]
            events = [done, {"type": "response.content_part.done", **self._where(), "content_index": 0, "part": part}]
        return events + [{"type": "response.output_item.done", "output_index": len(self.items) - 1, "item": item}]
