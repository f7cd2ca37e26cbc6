"""Request bodies -> harmony conversations (`gptoss.chat.harmony.Chat`) and the rules their completions
must follow (`gptoss.chat.grammar.OutputRules`), and the token budget that fits."""

from __future__ import annotations

import base64
import binascii

from gptoss.chat.grammar import ANY_OBJECT, OutputRules
from gptoss.chat.harmony import FUNCTIONS, Chat, FunctionTool, ResponseFormat, TextInput
from gptoss.server.errors import APIError
from gptoss.server.schemas import ChatCompletionRequest, MessageItem, NamespaceToolSpec, ResponsesRequest, text_of
from gptoss.tools.builtin import BROWSER, PYTHON, BuiltinTools


def output_rules(tools: list[FunctionTool], tool_choice, answer: ResponseFormat | None, param: str) -> OutputRules:
    """What the completion must look like (`gptoss.chat.grammar`): "none" offers no tool, "auto" lets the
    model answer or call, "required" or a named tool makes it call (a dict or model with `name`, and
    `namespace` for a tool inside one; or a hosted tool's type: web_search..., code_interpreter)."""
    if tool_choice in (None, "none", "auto"):
        offered = [] if tool_choice == "none" else tools
        return OutputRules(answer and answer.schema, tuple(offered), "auto")
    if not tools:
        raise APIError(400, f"tool_choice {tool_choice!r} needs tools", param=param)
    if tool_choice == "required":
        return OutputRules(None, tuple(tools), "required")
    kind = tool_choice.type
    if kind.startswith("web_search") or kind == "code_interpreter":
        namespace = BROWSER if kind.startswith("web_search") else PYTHON
        if not any(t.namespace == namespace and t.builtin for t in tools):
            raise APIError(400, f"tool_choice names {kind!r}, which is not among the tools this server runs "
                                f"for this request", param=param)
        return OutputRules(None, tuple(tools), namespace)
    recipient = f"{getattr(tool_choice, 'namespace', None) or FUNCTIONS}.{tool_choice.name}"
    if recipient not in {t.recipient for t in tools if not t.builtin}:
        raise APIError(400, f"tool_choice names {tool_choice.name!r}, which is not among the tools", param=param)
    return OutputRules(None, tuple(tools), recipient)


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


def declared_tool(kind: str, spec, namespace: str = FUNCTIONS) -> FunctionTool:
    """A tool the request declares: a function (JSON arguments fitting `parameters`) or, `kind` "custom",
    a freeform tool whose input is text, any or what its lark or regex grammar (`format`) accepts."""
    if kind == "function":
        return FunctionTool(spec.name, spec.description or "", spec.parameters, namespace)
    format = spec.format
    text = TextInput() if format is None or format.type == "text" else TextInput(format.syntax, format.definition)
    return FunctionTool(spec.name, spec.description or "", namespace=namespace, text_input=text)


class _ToolCalls:
    """Tool results name their call by id; harmony names the tool. This remembers which call was which."""

    def __init__(self, tools: list[FunctionTool]):
        self._tools = {t.recipient: t for t in tools}
        self._calls: dict[str, tuple[str, str]] = {}

    def call(self, chat: Chat, call_id: str, name: str, arguments: str, namespace: str | None,
             text_input: bool | None = None) -> None:
        """Adds an earlier call to `chat`. A freeform tool's input is text (`text_input`; None: as the tool
        of that name is declared), anything else JSON."""
        namespace = namespace or FUNCTIONS
        self._calls[call_id] = (name, namespace)
        if text_input is None:
            tool = self._tools.get(f"{namespace}.{name}")
            text_input = tool is not None and tool.text_input is not None
        chat.tool_call(name, arguments, namespace, text_input=text_input)

    def result(self, chat: Chat, call_id: str | None, output: str, param: str, default: str | None = None) -> None:
        """Adds what call `call_id` returned (else the tool named `default`, a name the client gave); a
        400 if the call is unknown."""
        name, namespace = self._calls.get(call_id, (default, FUNCTIONS))
        if name is None:
            raise APIError(400, f"{param}: {call_id!r} is not the id of an earlier tool call", param=param)
        chat.tool_result(name, output, namespace)


def chat_from_messages(body: ChatCompletionRequest) -> tuple[Chat, OutputRules]:
    """System and developer messages become harmony's developer instructions; the rest become turns."""
    instructions = [text_of(m.content) for m in body.messages if m.role in ("system", "developer")]
    tools = [declared_tool(t.type, getattr(t, t.type)) for t in body.tools or []]
    f = body.response_format
    schema = f.json_schema if f is not None and f.json_schema is not None else None
    answer = answer_format(f and f.type, schema.name if schema else "response", schema and schema.schema_,
                           schema and schema.description, "response_format")
    rules = output_rules(tools, body.tool_choice, answer, "tool_choice")
    chat = Chat(reasoning_effort=body.reasoning_effort, developer_instructions="\n\n".join(instructions) or None,
                tools=rules.tools, response_format=answer)
    calls = _ToolCalls(tools)
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
                calls.call(chat, call.id, call.name, call.arguments, None, text_input=call.type == "custom")
        elif m.role == "tool":
            calls.result(chat, m.tool_call_id, text, f"messages.{i}.tool_call_id", default=m.name)
    return chat, rules


def input_items(body: ResponsesRequest) -> list:
    """The request's input as items (a string is one user message)."""
    return [MessageItem(role="user", content=body.input)] if isinstance(body.input, str) else list(body.input)


def developer_tools(body: ResponsesRequest) -> tuple[list[FunctionTool], dict[str, str]]:
    """The request's function, custom and namespace tools, and the namespaces' descriptions."""
    tools, descriptions = [], {}
    for spec in body.tools or []:
        if isinstance(spec, NamespaceToolSpec):
            descriptions[spec.name] = spec.description or ""
            tools += [declared_tool(t.type, t, spec.name) for t in spec.tools]
        elif spec.type in ("function", "custom"):
            tools.append(declared_tool(spec.type, spec))
    return tools, descriptions


ENCRYPTED_PREFIX = "gptoss-reasoning-v1:"


def encrypt_reasoning(text: str) -> str:
    """What `include: ["reasoning.encrypted_content"]` returns: the reasoning itself, base64'd behind a
    marker. Not a secret (this server keeps nothing and has no key to hide it from its own clients); it
    lets a client that stores nothing (`store: false`) send the reasoning back next turn."""
    return ENCRYPTED_PREFIX + base64.b64encode(text.encode()).decode()


def decrypt_reasoning(content: str, param: str) -> str:
    try:
        if content.startswith(ENCRYPTED_PREFIX):
            return base64.b64decode(content.removeprefix(ENCRYPTED_PREFIX), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        pass
    raise APIError(400, f"{param}: encrypted_content that this server did not write (it can read only its "
                        f"own)", param=param, code="invalid_encrypted_content")


def chat_from_responses_input(body: ResponsesRequest, earlier: list = (),
                              builtin: BuiltinTools = BuiltinTools()) -> tuple[Chat, OutputRules]:
    """`instructions` (and any system or developer items) become developer instructions; the items of an
    earlier response's conversation (`earlier`, for previous_response_id) and then the input become turns.
    `builtin`: the built-in tools the server runs for this request (web_search, code_interpreter)."""
    items = [*earlier, *input_items(body)]
    instructions = [body.instructions or ""] + [text_of(item.content) for item in items
                                                if item.type == "message" and item.role in ("system", "developer")]
    tools, descriptions = developer_tools(body)
    f = body.text.format if body.text is not None else None
    answer = answer_format(f and f.type, f.name if f else "response", f and f.schema_, f and f.description,
                           "text.format")
    rules = output_rules(tools + builtin.functions(), body.tool_choice, answer, "tool_choice")
    chat = Chat(reasoning_effort=body.reasoning.effort if body.reasoning else "medium",
                developer_instructions="\n\n".join(filter(None, instructions)) or None,
                tools=rules.tools, response_format=answer, namespace_descriptions=descriptions,
                builtin_tools=builtin.configs() if rules.tools else ())
    calls = _ToolCalls(tools)
    for i, item in enumerate(items):
        if item.type == "message" and item.role == "user":
            chat.user(text_of(item.content))
        elif item.type == "message" and item.role == "assistant":
            chat.assistant(text_of(item.content), "final")
        elif item.type == "reasoning":
            text = (decrypt_reasoning(item.encrypted_content, f"input.{i}.encrypted_content")
                    if item.encrypted_content and not item.content else text_of(item.content or item.summary))
            chat.assistant(text, "analysis")
        elif item.type == "function_call":
            calls.call(chat, item.call_id, item.name, item.arguments, item.namespace)
        elif item.type == "custom_tool_call":
            calls.call(chat, item.call_id, item.name, item.input, item.namespace, text_input=True)
        elif item.type in ("function_call_output", "custom_tool_call_output"):
            calls.result(chat, item.call_id, text_of(item.output), f"input.{i}.call_id")
        elif item.type == "code_interpreter_call" and item.code is not None:
            logs = "".join(o.logs or "" for o in item.outputs or [])
            chat.builtin_call(PYTHON, item.code).builtin_result(PYTHON, logs)
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
