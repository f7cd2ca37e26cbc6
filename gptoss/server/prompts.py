"""Request bodies -> harmony conversations (`gptoss.chat.harmony.Chat`), and the token budget that fits."""

from __future__ import annotations

import json

from gptoss.chat.harmony import Chat, FunctionTool
from gptoss.server.errors import APIError
from gptoss.server.schemas import ChatCompletionRequest, MessageItem, ResponsesRequest, ToolChoice, text_of


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
