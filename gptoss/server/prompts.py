"""Request bodies -> harmony conversations (`gptoss.chat.harmony.Chat`) and the rules their completions
must follow (`gptoss.chat.grammar.OutputRules`), and the token budget that fits."""

from __future__ import annotations

from gptoss.chat.grammar import ANY_OBJECT, OutputRules
from gptoss.chat.harmony import Chat, FunctionTool, ResponseFormat
from gptoss.server.errors import APIError
from gptoss.server.schemas import ChatCompletionRequest, MessageItem, ResponsesRequest, text_of


def output_rules(tools: list[FunctionTool], tool_choice, answer: ResponseFormat | None, param: str) -> OutputRules:
    """What the completion must look like (`gptoss.chat.grammar`): "none" offers no tool, "auto" lets the
    model answer or call, "required" or a named function (a dict or model with a name) makes it call."""
    if tool_choice in (None, "none", "auto"):
        offered = [] if tool_choice == "none" else tools
        return OutputRules(answer and answer.schema, tuple(offered), "auto")
    if not tools:
        raise APIError(400, f"tool_choice {tool_choice!r} needs tools", param=param)
    if tool_choice == "required":
        return OutputRules(None, tuple(tools), "required")
    name = tool_choice.function.name if hasattr(tool_choice, "function") else tool_choice.name
    if name not in {t.name for t in tools}:
        raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", param=param)
    return OutputRules(None, tuple(tools), name)


def answer_format(kind: str | None, name: str, schema: dict | None, description: str | None,
                  param: str) -> ResponseFormat | None:
    """The JSON an answer must be: `response_format` (chat) or `text.format` (responses)."""
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return ResponseFormat(name, ANY_OBJECT, description)
    if schema is None:
        raise APIError(400, f"{param}: a json_schema format needs its schema", param=param)
    return ResponseFormat(name, schema, description)


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


def chat_from_messages(body: ChatCompletionRequest) -> tuple[Chat, OutputRules]:
    """System and developer messages become harmony's developer instructions; the rest become turns."""
    instructions = [text_of(m.content) for m in body.messages if m.role in ("system", "developer")]
    tools = [FunctionTool(t.function.name, t.function.description, t.function.parameters) for t in body.tools or []]
    f = body.response_format
    schema = f.json_schema if f is not None and f.json_schema is not None else None
    answer = answer_format(f and f.type, schema.name if schema else "response", schema and schema.schema_,
                           schema and schema.description, "response_format")
    rules = output_rules(tools, body.tool_choice, answer, "tool_choice")
    chat = Chat(reasoning_effort=body.reasoning_effort, developer_instructions="\n\n".join(instructions) or None,
                tools=rules.tools, response_format=answer)
    calls = _ToolCallNames()
    for i, m in enumerate(body.messages):
        text = text_of(m.content)
        if m.role == "user":
            chat.user(text)
        elif m.role == "assistant":
            if reasoning := m.reasoning_content or m.reasoning:
                chat.assistant(reasoning, "analysis")
            if text:  # with tool calls, the text before them is a preamble, on the commentary channel
                chat.assistant(text, "commentary" if m.tool_calls else "final")
            for call in m.tool_calls or []:
                calls.add(call.id, call.function.name)
                chat.tool_call(call.function.name, call.function.arguments)
        elif m.role == "tool":
            chat.tool_result(calls.name(m.tool_call_id, f"messages.{i}.tool_call_id", default=m.name), text)
    return chat, rules


def input_items(body: ResponsesRequest) -> list:
    """The request's input as items (a string is one user message)."""
    return [MessageItem(role="user", content=body.input)] if isinstance(body.input, str) else list(body.input)


def chat_from_responses_input(body: ResponsesRequest, earlier: list = ()) -> tuple[Chat, OutputRules]:
    """`instructions` (and any system or developer items) become developer instructions; the items of an
    earlier response's conversation (`earlier`, for previous_response_id) and then the input become turns."""
    items = [*earlier, *input_items(body)]
    instructions = [body.instructions or ""] + [text_of(item.content) for item in items
                                                if item.type == "message" and item.role in ("system", "developer")]
    tools = [FunctionTool(t.name, t.description, t.parameters) for t in body.tools or []]
    f = body.text.format if body.text is not None else None
    answer = answer_format(f and f.type, f.name if f else "response", f and f.schema_, f and f.description,
                           "text.format")
    rules = output_rules(tools, body.tool_choice, answer, "tool_choice")
    chat = Chat(reasoning_effort=body.reasoning.effort if body.reasoning else "medium",
                developer_instructions="\n\n".join(filter(None, instructions)) or None,
                tools=rules.tools, response_format=answer)
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
    return chat, rules


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
