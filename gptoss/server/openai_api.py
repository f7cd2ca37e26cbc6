"""The OpenAI-compatible HTTP API on top of the engine: models, chat completions, responses, completions.

Each endpoint does the same four things: validate the request (pydantic models; bad input is a 4xx in
OpenAI's error shape), build the prompt (harmony through `gptoss.chat.harmony.Chat` for chat and
responses, the raw text for completions), check that prompt and completion fit the context, and turn
the generated tokens into the API's objects. That last part is an "output" object per API, fed token
by token: streaming sends what it returns as server-sent events, non-streaming sums the same pieces
up, so the two always agree.

Harmony messages map onto the API as vLLM maps them: the analysis channel is the reasoning
(`reasoning_content` in chat, reasoning items in responses), a message with a recipient
(`functions.NAME`, on the commentary channel) is a tool call, and everything else is the answer's text.
"""

from __future__ import annotations

import codecs
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag
from starlette.exceptions import HTTPException

from gptoss.chat.harmony import (Chat, FunctionTool, MessageEnd, MessageStart, StreamParser, TextDelta, get_encoding,
                                 render_for_completion, stop_tokens)
from gptoss.chat.tokenizer import get_tokenizer
from gptoss.errors import GptossError
from gptoss.generation.sampling import SamplingParams
from gptoss.server.engine import Engine, EngineError, Request

# --- errors -----------------------------------------------------------------------------------------


class APIError(Exception):
    """A request the server refuses, answered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _validation_error(exc: RequestValidationError) -> APIError:
    """pydantic's most specific complaint as a 400: OpenAI answers malformed or mistyped bodies with 400."""
    errors = exc.errors()
    if errors[0]["type"] == "json_invalid":
        return APIError(400, f"We could not parse the JSON body of your request: {errors[0]['ctx']['error']}",
                        code="invalid_json")
    paths = [_path_in_body(e, exc.body) for e in errors]
    worst = max(range(len(errors)), key=lambda i: len(paths[i]))  # the deepest: "input.0", not just "input"
    param = ".".join(paths[worst]) or None
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return APIError(400, f"{param or 'body'}: {errors[worst]['msg']}{more}", param=param, code=errors[worst]["type"])


def _path_in_body(error: dict, body: Any) -> list[str]:
    """The error's location as keys and indices of the body sent, without pydantic's names for union members
    (its loc for a bad `"input": 5` is ("body", "input", "str"))."""
    path, node = [], body
    for key in error["loc"][1:]:
        in_list = isinstance(node, list) and isinstance(key, int) and key < len(node)
        if in_list or isinstance(node, dict) and key in node:
            path.append(str(key))
            node = node[key]
        elif error["type"] == "missing" and isinstance(node, dict):
            path.append(str(key))
    return path


# --- request bodies -----------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we have no use for (user, metadata, ...)


class TextPart(_Body):
    type: Literal["text", "input_text", "output_text", "reasoning_text", "summary_text"]
    text: str


Content = str | list[TextPart]


def text_of(content: Content | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)


class SamplingFields(_Body):
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stream: bool = False

    def sampling(self) -> SamplingParams:
        """OpenAI's defaults: temperature 1, no nucleus cut. Temperature 0 is greedy."""
        top_p = self.top_p if self.top_p is not None and self.top_p < 1 else None
        return SamplingParams(temperature=1.0 if self.temperature is None else self.temperature, top_p=top_p,
                              seed=self.seed)


class StreamOptions(_Body):
    include_usage: bool = False


class TextCompletionFields(SamplingFields):
    """What chat and text completions share beyond sampling."""

    stop: str | list[str] | None = None
    stream_options: StreamOptions | None = None
    n: int = 1

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
        if self.n != 1:
            raise APIError(400, f"n = {self.n} is not supported: one choice per request", param="n")
        return stops


class FunctionCall(_Body):
    name: str
    arguments: str


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content | None = None
    reasoning_content: str | None = None  # an earlier answer's reasoning, as this server returns it
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class FunctionDef(_Body):
    name: str
    description: str = ""
    parameters: dict | None = None


class ChatTool(_Body):
    type: Literal["function"]
    function: FunctionDef


ToolChoice = Literal["none", "auto", "required"] | dict | None  # a dict names a function to call


class ChatCompletionRequest(TextCompletionFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice = None
    reasoning_effort: Literal["low", "medium", "high"] = "medium"
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(TextCompletionFields):
    prompt: str | list[int]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this endpoint


class MessageItem(_Body):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Content


class ReasoningItem(_Body):
    type: Literal["reasoning"]
    content: list[TextPart] | None = None
    summary: list[TextPart] = []


class FunctionCallItem(_Body):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_Body):
    type: Literal["function_call_output"]
    call_id: str
    output: str


def _item_type(item: Any) -> str | None:
    return item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", None)


InputItem = Annotated[Annotated[MessageItem, Tag("message")] | Annotated[ReasoningItem, Tag("reasoning")]
                      | Annotated[FunctionCallItem, Tag("function_call")]
                      | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
                      Discriminator(_item_type)]


class ResponsesTool(_Body):
    type: Literal["function"]
    name: str
    description: str = ""
    parameters: dict | None = None


class ReasoningConfig(_Body):
    effort: Literal["low", "medium", "high"] = "medium"


class ResponsesRequest(SamplingFields):
    input: str | list[InputItem]
    instructions: str | None = None
    reasoning: ReasoningConfig | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: ToolChoice = None
    max_output_tokens: int | None = Field(None, ge=1)
    previous_response_id: str | None = None


# --- prompts ------------------------------------------------------------------------------------------


def offered_tools(tools: list[FunctionTool], tool_choice: ToolChoice) -> list[FunctionTool]:
    """The tools to describe to the model. Harmony has no way to force a call, so only auto and none exist."""
    if tool_choice in (None, "auto"):
        return tools
    if tool_choice == "none":
        return []
    raise APIError(400, f"tool_choice {json.dumps(tool_choice, default=str)} is not supported: gpt-oss decides "
                        "itself whether to call a tool; use \"auto\" or \"none\"", param="tool_choice")


class _ToolCallNames:
    """Tool results name their call by id; harmony names the function. This remembers which is which."""

    def __init__(self):
        self._names: dict[str, str] = {}

    def add(self, call_id: str, name: str) -> None:
        self._names[call_id] = name

    def name(self, call_id: str | None, param: str, default: str | None = None) -> str:
        """The function that call `call_id` called (else `default`, a name the client gave); a 400 if unknown."""
        name = self._names.get(call_id, default)
        if name is None:
            raise APIError(400, f"{param}: {call_id!r} is not the id of an earlier tool call", param=param)
        return name


def chat_from_messages(body: ChatCompletionRequest) -> Chat:
    """System and developer messages become harmony's developer instructions; the rest become turns."""
    instructions = [text_of(m.content) for m in body.messages if m.role in ("system", "developer")]
    tools = [FunctionTool(t.function.name, t.function.description, t.function.parameters) for t in body.tools or []]
    chat = Chat(reasoning_effort=body.reasoning_effort, developer_instructions="\n\n".join(instructions) or None,
                tools=offered_tools(tools, body.tool_choice))
    calls = _ToolCallNames()
    for i, m in enumerate(body.messages):
        text = text_of(m.content)
        if m.role == "user":
            chat.user(text)
        elif m.role == "assistant":
            if m.reasoning_content:
                chat.assistant(m.reasoning_content, "analysis")
            if text:  # with tool calls, the text before them is a preamble, on the commentary channel
                chat.assistant(text, "commentary" if m.tool_calls else "final")
            for call in m.tool_calls or []:
                calls.add(call.id, call.function.name)
                chat.tool_call(call.function.name, call.function.arguments)
        elif m.role == "tool":
            chat.tool_result(calls.name(m.tool_call_id, f"messages.{i}.tool_call_id", default=m.name), text)
    return chat


def chat_from_responses_input(body: ResponsesRequest) -> Chat:
    """`instructions` (and any system or developer items) become developer instructions; items become turns."""
    items = [MessageItem(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    instructions = [body.instructions or ""] + [text_of(item.content) for item in items
                                                if item.type == "message" and item.role in ("system", "developer")]
    tools = [FunctionTool(t.name, t.description, t.parameters) for t in body.tools or []]
    chat = Chat(reasoning_effort=body.reasoning.effort if body.reasoning else "medium",
                developer_instructions="\n\n".join(filter(None, instructions)) or None,
                tools=offered_tools(tools, body.tool_choice))
    calls = _ToolCallNames()
    for i, item in enumerate(items):
        if item.type == "message" and item.role == "user":
            chat.user(text_of(item.content))
        elif item.type == "message" and item.role == "assistant":
            chat.assistant(text_of(item.content), "final")
        elif item.type == "reasoning":
            chat.assistant(text_of(item.content or item.summary), "analysis")
        elif item.type == "function_call":
            calls.add(item.call_id, item.name)
            chat.tool_call(item.name, item.arguments)
        elif item.type == "function_call_output":
            chat.tool_result(calls.name(item.call_id, f"input.{i}.call_id"), item.output)
    return chat


def token_budget(prompt_len: int, asked: int | None, context: int, prompt_param: str, max_param: str) -> int:
    """How many new tokens to allow: `asked`, or all the room left; a 400 if the prompt or `asked` do not fit."""
    if prompt_len == 0:
        raise APIError(400, "the prompt is empty", param=prompt_param)
    if prompt_len >= context:
        raise APIError(400, f"This model's maximum context length is {context} tokens, but the prompt has "
                            f"{prompt_len} tokens, leaving no room for a completion.",
                       param=prompt_param, code="context_length_exceeded")
    room = context - prompt_len
    if asked is None:
        return room
    if asked > room:
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} for the completion). "
                            f"Lower {max_param} to {room} or less, or shorten the prompt.",
                       param=max_param, code="context_length_exceeded")
    return asked


# --- outputs: generated tokens -> API objects ---------------------------------------------------------


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
        self.stopped = False

    def feed(self, token: int) -> list:
        self.completion_tokens += 1
        return self._feed(token)

    def _feed(self, token: int) -> list:
        raise NotImplementedError

    def end(self) -> list:
        raise NotImplementedError


class ChatOutput(Output):
    """Harmony events -> chat.completion.chunk deltas: content, reasoning_content, tool_calls."""

    def __init__(self, stops: list[str]):
        super().__init__()
        self.parser, self.stop, self.tool_calls = StreamParser(), StopStrings(stops), 0

    def _feed(self, token: int) -> list[dict]:
        return self._deltas(self.parser.feed(token))

    def end(self) -> list[dict]:
        deltas = self._deltas(self.parser.end())
        if tail := self.stop.flush():
            deltas.append({"content": tail})
        return deltas

    def _deltas(self, events) -> list[dict]:
        deltas = []
        for event in events:
            if isinstance(event, MessageStart) and event.recipient:
                deltas.append({"tool_calls": [{"index": self.tool_calls, "id": new_id("call_"), "type": "function",
                                               "function": {"name": function_name(event.recipient),
                                                            "arguments": ""}}]})
                self.tool_calls += 1
            elif isinstance(event, TextDelta) and not self.stopped:
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
        """The whole assistant message the deltas add up to."""
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


class CompletionOutput(Output):
    """Tokens -> text, decoded incrementally so a character split across tokens comes out whole."""

    def __init__(self, stops: list[str], eos_tokens: tuple[int, ...]):
        super().__init__()
        self.tokenizer, self.eos = get_tokenizer(), frozenset(eos_tokens)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = StopStrings(stops)

    def _feed(self, token: int) -> list[str]:
        if token in self.eos or self.stopped:  # the end-of-text token is not part of the text
            return []
        text = self.stop.feed(self.utf8.decode(self.tokenizer.decode_single_token_bytes(token)))
        self.stopped = self.stop.hit
        return [text] if text else []

    def end(self) -> list[str]:
        if self.stopped:
            return []
        text = self.stop.feed(self.utf8.decode(b"", final=True)) + self.stop.flush()
        return [text] if text else []

    def finish_reason(self, engine_reason: str) -> str:
        return "stop" if self.stopped else engine_reason


class ResponsesOutput(Output):
    """Harmony messages -> Responses API output items (reasoning, message, function_call), and the
    streaming events that build them: output_item.added, the deltas, the done events."""

    def __init__(self):
        super().__init__()
        self.parser = StreamParser()
        self.items: list[dict] = []

    def _feed(self, token: int) -> list[dict]:
        return self._events(self.parser.feed(token))

    def end(self) -> list[dict]:
        return self._events(self.parser.end())

    def _events(self, harmony_events) -> list[dict]:
        out = []
        for event in harmony_events:
            if isinstance(event, MessageStart):
                out += self._open(kind_of(event.channel, event.recipient), event.recipient)
            elif isinstance(event, TextDelta):
                out.append(self._delta(event.text))
            elif isinstance(event, MessageEnd):
                out += self._close()
        return out

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
        kind = "reasoning_text" if item["type"] == "reasoning" else "output_text"
        return {"type": f"response.{kind}.delta", **self._where(), "content_index": 0, "delta": text}

    def _close(self) -> list[dict]:
        item = self.items[-1]
        item["status"] = "completed"
        if item["type"] == "function_call":
            events = [{"type": "response.function_call_arguments.done", **self._where(),
                       "name": item["name"], "arguments": item["arguments"]}]
        else:
            part = item["content"][0]
            kind = "reasoning_text" if item["type"] == "reasoning" else "output_text"
            events = [{"type": f"response.{kind}.done", **self._where(), "content_index": 0, "text": part["text"]},
                      {"type": "response.content_part.done", **self._where(), "content_index": 0, "part": part}]
        return events + [{"type": "response.output_item.done", "output_index": len(self.items) - 1, "item": item}]


async def drive(engine: Engine, request: Request, output: Output) -> AsyncIterator:
    """Submits `request` and yields what `output` makes of its tokens. Leaving early (a stop string, a
    client that went away) cancels the request, which frees its slot."""
    engine.submit(request)
    try:
        async for token in request.tokens():
            for piece in output.feed(token):
                yield piece
            if output.stopped:
                return
        for piece in output.end():
            yield piece
    finally:
        request.cancel()


def sse(data: dict | str, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def server_error(e: Exception) -> dict:
    return APIError(500, str(e), type="server_error").body()


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def chunk_events(head: dict, pieces: AsyncIterator, chunk: Callable[[Any], dict], empty: Any,
                       finish_reason: Callable[[], str], usage: Callable[[], dict] | None) -> AsyncIterator[str]:
    """The SSE of a chat or text completion: a chunk per piece, one with the finish reason, one with the
    usage if asked, then [DONE]. An engine failure ends the stream with an error, which clients raise."""
    try:
        async for piece in pieces:
            yield sse(chunk(piece))
    except EngineError as e:
        yield sse(server_error(e))
        return
    yield sse(chunk(empty, finish_reason()))
    if usage:
        yield sse({**head, "choices": [], "usage": usage()})
    yield sse("[DONE]")


def usage(prompt: list[int], output: Output) -> dict:
    return {"prompt_tokens": len(prompt), "completion_tokens": output.completion_tokens,
            "total_tokens": len(prompt) + output.completion_tokens}


# --- the app --------------------------------------------------------------------------------------------


def create_app(engine: Engine, model_name: str) -> FastAPI:
    """The FastAPI app serving `engine`'s model as `model_name`. It starts the engine and closes it on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        get_encoding(), get_tokenizer()  # loaded now rather than on the first request
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="gptoss", lifespan=lifespan)
    app.state.engine = engine
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: HTTPRequest, e: RequestValidationError):
        return await api_error(_, _validation_error(e))

    @app.exception_handler(GptossError)
    async def bad_value(_: HTTPRequest, e: GptossError):
        return await api_error(_, APIError(400, str(e)))

    @app.exception_handler(EngineError)
    async def engine_failed(_: HTTPRequest, e: EngineError):
        return JSONResponse(server_error(e), status_code=500)

    @app.exception_handler(HTTPException)
    async def http_error(_: HTTPRequest, e: HTTPException):
        return await api_error(_, APIError(e.status_code, str(e.detail), code=str(e.status_code)))

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{model_name}`.",
                           param="model", code="model_not_found")

    @app.get("/v1/models")
    async def models():
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "gptoss"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        check_model(body.model)
        stops = body.stop_strings()
        prompt = render_for_completion(chat_from_messages(body))
        asked = body.max_completion_tokens or body.max_tokens
        budget = token_budget(len(prompt), asked, engine.context, "messages",
                              "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
        request = Request(prompt, budget, body.sampling(), stop_tokens())
        output = ChatOutput(stops)
        head = {"id": new_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()),
                "model": model_name}
        if not body.stream:
            deltas = [d async for d in drive(engine, request, output)]
            return {**head, "usage": usage(prompt, output),
                    "choices": [{"index": 0, "message": ChatOutput.message(deltas), "logprobs": None,
                                 "finish_reason": output.finish_reason(request.finish_reason)}]}

        head["object"] = "chat.completion.chunk"

        def chunk(delta: dict, finish_reason: str | None = None) -> dict:
            return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

        async def deltas():
            yield {"role": "assistant", "content": ""}
            async for delta in drive(engine, request, output):
                yield delta

        return event_stream(chunk_events(head, deltas(), chunk, {}, lambda: output.finish_reason(request.finish_reason),
                                         (lambda: usage(prompt, output)) if body.include_usage() else None))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        stops = body.stop_strings()
        prompt = body.prompt if isinstance(body.prompt, list) else get_tokenizer().encode(body.prompt,
                                                                                          allowed_special="all")
        if any(not 0 <= t < engine.model.config.vocab_size for t in prompt):
            raise APIError(400, f"prompt holds token ids outside 0..{engine.model.config.vocab_size - 1}",
                           param="prompt")
        budget = token_budget(len(prompt), body.max_tokens, engine.context, "prompt", "max_tokens")
        eos = engine.model.config.eos_token_ids
        request = Request(prompt, budget, body.sampling(), eos)
        output = CompletionOutput(stops, eos)
        head = {"id": new_id("cmpl-"), "object": "text_completion", "created": int(time.time()), "model": model_name}

        def chunk(text: str, finish_reason: str | None = None) -> dict:
            return {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}

        if not body.stream:
            text = "".join([t async for t in drive(engine, request, output)])
            return {**chunk(text, output.finish_reason(request.finish_reason)), "usage": usage(prompt, output)}

        return event_stream(chunk_events(head, drive(engine, request, output), chunk, "",
                                         lambda: output.finish_reason(request.finish_reason),
                                         (lambda: usage(prompt, output)) if body.include_usage() else None))

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest):
        check_model(body.model)
        if body.previous_response_id:
            raise APIError(400, "previous_response_id is not supported: this server stores no responses; send the "
                                "whole conversation as input", param="previous_response_id")
        prompt = render_for_completion(chat_from_responses_input(body))
        budget = token_budget(len(prompt), body.max_output_tokens, engine.context, "input", "max_output_tokens")
        request = Request(prompt, budget, body.sampling(), stop_tokens())
        output = ResponsesOutput()
        rid, created_at = new_id("resp_"), int(time.time())

        def response(status: str) -> dict:
            done = status != "in_progress"
            return {"id": rid, "object": "response", "created_at": created_at, "status": status, "model": model_name,
                    "output": output.items if done else [], "error": None,
                    "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                    "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
                    "temperature": body.temperature, "top_p": body.top_p, "parallel_tool_calls": False,
                    "tool_choice": body.tool_choice or "auto", "tools": [t.model_dump() for t in body.tools or []],
                    "reasoning": {"effort": body.reasoning.effort if body.reasoning else "medium", "summary": None},
                    "text": {"format": {"type": "text"}}, "metadata": {},
                    "usage": {"input_tokens": len(prompt), "output_tokens": output.completion_tokens,
                              "total_tokens": len(prompt) + output.completion_tokens,
                              "input_tokens_details": {"cached_tokens": 0},
                              "output_tokens_details": {"reasoning_tokens": 0}} if done else None}

        def final_status() -> str:
            return "incomplete" if request.finish_reason == "length" else "completed"

        if not body.stream:
            async for _ in drive(engine, request, output):
                pass
            return response(final_status())

        async def events():
            sequence = 0

            def event(data: dict) -> str:
                nonlocal sequence
                sequence += 1
                return sse({**data, "sequence_number": sequence - 1}, event=data["type"])

            yield event({"type": "response.created", "response": response("in_progress")})
            yield event({"type": "response.in_progress", "response": response("in_progress")})
            try:
                async for data in drive(engine, request, output):
                    yield event(data)
            except EngineError as e:
                yield event({"type": "error", "code": "server_error", "message": str(e), "param": None})
                return
            status = final_status()
            yield event({"type": f"response.{status}", "response": response(status)})

        return event_stream(events())

    return app
