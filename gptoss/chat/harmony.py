"""The harmony chat format of GPT-OSS, on top of openai-harmony.

openai-harmony renders prompts and parses completions; this module adds what a chat loop needs around it:
a builder for conversations (`Chat`), prompt rendering and stop tokens, and a streaming parser
(`StreamParser`) that never raises on malformed model output, which openai-harmony's parser does.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from openai_harmony import (Author, Conversation, DeveloperContent, HarmonyEncoding, HarmonyEncodingName,
                            Message, ReasoningEffort, Role, StreamableParser, SystemContent, TextContent,
                            ToolDescription, ToolNamespaceConfig, load_harmony_encoding)

from gptoss.chat.tokenizer import (HARMONY_SPECIAL_TOKENS, NUM_TEXT_TOKENS, VOCAB_FILE, VOCAB_SHA256, TextDecoder,
                                   VocabError, get_tokenizer, prepare_harmony_vocab)
from gptoss.errors import GptossError

START = HARMONY_SPECIAL_TOKENS["<|start|>"]
CHANNEL = HARMONY_SPECIAL_TOKENS["<|channel|>"]
MESSAGE = HARMONY_SPECIAL_TOKENS["<|message|>"]
# The tokens that end a message: <|end|>, and <|return|> / <|call|>, which also end the assistant's turn.
END_OF_MESSAGE = frozenset(HARMONY_SPECIAL_TOKENS[t] for t in ("<|end|>", "<|return|>", "<|call|>"))

CHANNELS = ("analysis", "commentary", "final")
REASONING_EFFORTS = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}
# Function calls are sent as JSON; the model writes this content type in the call's header. Calls of the
# built-in tools (browser, python) carry "code" there instead, as harmony renders them.
JSON_CONTENT_TYPE = "<|constrain|>json"
BUILTIN_CONTENT_TYPE = "code"
FUNCTIONS = "functions"  # the namespace of the developer's functions


@functools.cache
def get_encoding() -> HarmonyEncoding:
    """openai-harmony's HarmonyGptOss encoding, loaded from the shipped vocabulary (no download)."""
    vocab_dir = prepare_harmony_vocab()
    try:
        return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as e:  # openai_harmony.HarmonyError, with the Rust loader's message
        path = vocab_dir / VOCAB_FILE.name
        raise VocabError(f"openai-harmony could not load {path} (expected sha256 {VOCAB_SHA256}): {e}") from e


def stop_tokens() -> list[int]:
    """Tokens that end the assistant's turn when sampling: <|return|> (answer done) and <|call|> (tool call)."""
    return sorted(get_encoding().stop_tokens_for_assistant_actions())


@dataclass(frozen=True)
class TextInput:
    """The input of a freeform tool: text rather than a JSON object, following a grammar if one is given
    (`syntax` "lark" or "regex", as OpenAI's custom tools state it; None: any text)."""

    syntax: str | None = None
    definition: str | None = None


@dataclass(frozen=True)
class FunctionTool:
    """A function the model may call as `recipient`, e.g. "functions.get_weather".

    The developer's tools are described in the developer message, in the namespace "functions" or one of
    their own; the built-in tools (`builtin`: browser's functions and python) in the system message, and
    the model calls those on the analysis channel with content type "code". A freeform tool (`text_input`)
    takes text; every other tool a JSON object fitting `parameters`.
    """

    name: str
    description: str = ""
    parameters: dict | None = None  # JSON schema of the arguments object
    namespace: str = FUNCTIONS
    text_input: TextInput | None = None
    builtin: bool = False

    @property
    def recipient(self) -> str:
        """Where the model addresses a call: "NAMESPACE.NAME", or "NAMESPACE" for a tool that is a namespace
        with no functions (python)."""
        return f"{self.namespace}.{self.name}" if self.name else self.namespace

    def describe(self) -> ToolDescription:
        return ToolDescription.new(self.name, self.description,
                                   {"type": "string"} if self.text_input is not None else self.parameters)


@dataclass(frozen=True)
class ParsedMessage:
    """One message of a completion: who wrote it, where it goes, and its text."""

    role: str  # "assistant" for everything the model writes, as long as its headers are well formed
    channel: str | None  # "analysis" (chain of thought), "commentary" (tool calls, preambles) or "final"
    recipient: str | None  # e.g. "functions.get_weather" for a tool call, else None
    content_type: str | None  # e.g. "<|constrain|>json" for a function call's arguments
    text: str
    name: str | None = None  # author name; harmony sets it only for tool messages

    def to_harmony(self) -> Message:
        """The same message as openai-harmony's Message, to put it back into a conversation."""
        return Message(author=Author(role=Role(self.role), name=self.name), content=[TextContent(text=self.text)],
                       channel=self.channel, recipient=self.recipient, content_type=self.content_type)


@dataclass(frozen=True)
class ResponseFormat:
    """A JSON schema the final answer must follow, told to the model in the developer message the way
    harmony's guide does (a "# Response Formats" section); `gptoss.chat.grammar` enforces it."""

    name: str
    schema: dict
    description: str | None = None

    def render(self) -> str:
        comment = f"// {self.description}\n" if self.description else ""
        return f"# Response Formats\n\n## {self.name}\n\n{comment}{json.dumps(self.schema)}"


class Chat:
    """Builds a harmony conversation: system settings, developer instructions and tools, then the turns.

    The turn methods return the chat, so calls chain: `Chat(reasoning_effort="high").user("Hi")`.
    """

    def __init__(self, *, reasoning_effort: str = "medium", knowledge_cutoff: str = "2024-06",
                 current_date: str | None = None, developer_instructions: str | None = None,
                 tools: Iterable[FunctionTool] = (), response_format: ResponseFormat | None = None,
                 builtin_tools: Iterable[ToolNamespaceConfig] = (),
                 namespace_descriptions: dict[str, str] | None = None):
        if reasoning_effort not in REASONING_EFFORTS:
            raise GptossError(f"reasoning effort must be one of {', '.join(REASONING_EFFORTS)}, "
                              f"got {reasoning_effort!r}")
        self.reasoning_effort = reasoning_effort
        self.knowledge_cutoff = knowledge_cutoff
        self.current_date = current_date or datetime.date.today().isoformat()
        self.developer_instructions = developer_instructions
        self.tools = [t for t in tools if not t.builtin]  # the built-in ones come with `builtin_tools`
        self.response_format = response_format
        self.builtin_tools = list(builtin_tools)  # browser and python, as openai-harmony describes them
        self.namespace_descriptions = namespace_descriptions or {}
        self.turns: list[Message] = []

    def user(self, text: str) -> Chat:
        self.turns.append(Message.from_role_and_content(Role.USER, text))
        return self

    def assistant(self, text: str, channel: str = "final") -> Chat:
        """An earlier assistant message: the answer (final) or its reasoning (analysis)."""
        self.turns.append(Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel))
        return self

    def tool_call(self, name: str, arguments: str | dict, namespace: str = FUNCTIONS, text_input: bool = False) -> Chat:
        """An earlier call of the developer's function `namespace.name`, written the way the model writes one
        (a freeform tool's input as plain text, anything else as JSON)."""
        args = arguments if isinstance(arguments, str) else json.dumps(arguments)
        message = (Message.from_role_and_content(Role.ASSISTANT, args).with_channel("commentary")
                   .with_recipient(f"{namespace}.{name}"))
        self.turns.append(message if text_input else message.with_content_type(JSON_CONTENT_TYPE))
        return self

    def tool_result(self, name: str, output: str, namespace: str = FUNCTIONS) -> Chat:
        """What function `namespace.name` returned, addressed back to the assistant."""
        author = Author.new(Role.TOOL, f"{namespace}.{name}")
        self.turns.append(Message.from_author_and_content(author, output).with_channel("commentary")
                          .with_recipient("assistant"))
        return self

    def builtin_call(self, recipient: str, text: str) -> Chat:
        """An earlier call of a built-in tool ("browser.search", "python"), on the analysis channel."""
        self.turns.append(Message.from_role_and_content(Role.ASSISTANT, text).with_channel("analysis")
                          .with_recipient(recipient).with_content_type(BUILTIN_CONTENT_TYPE))
        return self

    def builtin_result(self, recipient: str, output: str) -> Chat:
        """What a built-in tool answered; see `tool_result_message`."""
        self.turns.append(tool_result_message(recipient, output))
        return self

    def add(self, messages: Iterable[ParsedMessage]) -> Chat:
        """Messages the model generated (from StreamParser), so the next prompt includes them."""
        self.turns.extend(m.to_harmony() for m in messages)
        return self

    def to_conversation(self) -> Conversation:
        """openai-harmony's Conversation: system message (with the built-in tools), developer message (if
        any; the developer's tools grouped by namespace, "functions" first), then the turns."""
        system = (SystemContent.new().with_reasoning_effort(REASONING_EFFORTS[self.reasoning_effort])
                  .with_knowledge_cutoff(self.knowledge_cutoff).with_conversation_start_date(self.current_date))
        for config in self.builtin_tools:
            system = system.with_tools(config)
        messages = [Message.from_role_and_content(Role.SYSTEM, system)]
        instructions = "\n\n".join(filter(None, [self.developer_instructions,
                                                  self.response_format and self.response_format.render()]))
        if instructions or self.tools:
            developer = DeveloperContent.new()
            if instructions:
                developer = developer.with_instructions(instructions)
            namespaces = dict.fromkeys([FUNCTIONS] + [t.namespace for t in self.tools])
            for namespace in namespaces:
                described = [t.describe() for t in self.tools if t.namespace == namespace]
                if namespace == FUNCTIONS and described:
                    developer = developer.with_function_tools(described)
                elif described:
                    developer = developer.with_tools(ToolNamespaceConfig(
                        name=namespace, description=self.namespace_descriptions.get(namespace), tools=described))
            messages.append(Message.from_role_and_content(Role.DEVELOPER, developer))
        return Conversation.from_messages(messages + self.turns)


def tool_result_message(recipient: str, output: str) -> Message:
    """A built-in tool's answer to a call addressed to `recipient`, on the analysis channel as the call was."""
    return (Message.from_author_and_content(Author.new(Role.TOOL, recipient), output).with_channel("analysis")
            .with_recipient("assistant"))


def render_tool_result(recipient: str, output: str) -> list[int]:
    """The tokens that follow a completion ending in a call of a built-in tool: the tool's answer, then
    `<|start|>assistant` for the model to go on. The next prompt is the last one, the completion as it was
    generated (ending in <|call|>) and these tokens, so the KV cache reuses all that came before."""
    encoding = get_encoding()
    return encoding.render(tool_result_message(recipient, output)) + [START, *encoding.encode("assistant")]


def render_for_completion(chat: Chat) -> list[int]:
    """Prompt token ids that end with `<|start|>assistant`, for the model to write the next message.

    openai-harmony drops chain of thought the model no longer needs: when the last assistant message is
    a final answer, analysis messages before the first final message are left out; during a tool loop
    (last assistant message not final) every analysis message is kept.
    """
    return get_encoding().render_conversation_for_completion(chat.to_conversation(), Role.ASSISTANT)


@dataclass(frozen=True)
class MessageStart:
    """A message's header is known; a tool call when `recipient` is set."""

    role: str
    channel: str | None
    recipient: str | None
    content_type: str | None


@dataclass(frozen=True)
class TextDelta:
    """New text of the current message (a tool call's arguments when `recipient` is set)."""

    channel: str | None
    recipient: str | None
    text: str


@dataclass(frozen=True)
class MessageEnd:
    """The current message is complete."""

    message: ParsedMessage


Event = MessageStart | TextDelta | MessageEnd


def parse_completion(tokens: Iterable[int]) -> list[ParsedMessage]:
    """The messages of a whole completion (what follows the prompt's `<|start|>assistant`)."""
    parser = StreamParser()
    for token in tokens:
        parser.feed(token)
    return parser.finish()


@dataclass
class _OpenMessage:
    """The message being read: its header as far as known, and the text streamed for it so far."""

    role: str = "assistant"
    channel: str | None = "final"
    recipient: str | None = None
    content_type: str | None = None
    pieces: list[str] = field(default_factory=list)
    announced: bool = False  # whether MessageStart was emitted

    def to_message(self) -> ParsedMessage:
        return ParsedMessage(self.role, self.channel, self.recipient, self.content_type, "".join(self.pieces))


# Longer than any well-formed header: role, channel, recipient and content type take about 20 tokens.
MAX_HEADER_TOKENS = 64


class StreamParser:
    """Parses the assistant's completion token by token into events and messages, and never raises.

    It wraps openai-harmony's StreamableParser, one per message, starting right after the prompt's
    `<|start|>assistant`. Well-formed output parses exactly as openai-harmony parses it.

    Recovery rule for malformed output. A message header is broken when openai-harmony raises on it
    (unknown role, empty channel, extra words, undecodable bytes), when it holds a stop token or
    <|start|>, or when it grows past MAX_HEADER_TOKENS; any other error openai-harmony raises breaks
    the message in progress the same way. From then on the message is "salvaged":
    - it keeps the header openai-harmony parsed; without one it is an assistant message on the channel
      the broken header names right after <|channel|> if that is a harmony channel, else "final"
      (so broken reasoning stays out of the answer when the header says what it is);
    - the text tokens openai-harmony had not yet turned into content (the broken header's) and all text
      tokens after them are decoded and appended as plain text, so no text is lost; other special
      tokens carry no text and are dropped;
    - it ends at the next <|end|>, <|return|> or <|call|>, or at the next <|start|>, where a fresh
      openai-harmony parser takes over, so later well-formed messages parse normally again.
    """

    def __init__(self):
        self._encoding = get_encoding()
        self._tokenizer = get_tokenizer()
        self._messages: list[ParsedMessage] = []
        self._decoder = TextDecoder()  # for salvaged text
        # openai-harmony's parser for the current message, or None while salvaging one. With a parser:
        # reading a header while _header is a list, reading content while _current is set, else
        # waiting for <|start|>.
        self._parser: StreamableParser | None = StreamableParser(self._encoding, Role.ASSISTANT)
        self._header: list[int] | None = []
        self._current: _OpenMessage | None = None

    @property
    def messages(self) -> list[ParsedMessage]:
        """The messages completed so far."""
        return list(self._messages)

    def feed(self, token: int) -> list[Event]:
        """Takes one generated token; returns what it completed (often nothing, or one TextDelta)."""
        token = int(token)
        events: list[Event] = []
        if self._parser is not None:
            if not self._breaks_header(token) and self._advance(token, events):
                return events
            self._salvage(events)
        self._feed_salvaged(token, events)
        return events

    def end(self) -> list[Event]:
        """Ends the stream: completes the message in progress; returns the events that produces."""
        events: list[Event] = []
        if self._parser is not None and (self._current is not None or self._header):
            try:
                self._parser.process_eos()
                self._take_harmony_message(events)
            except Exception:  # a header cut off by the end of the stream, or any other harmony error
                self._salvage(events)
        if self._parser is None:
            self._close_salvaged(events)
        return events

    def finish(self) -> list[ParsedMessage]:
        """Ends the stream and returns all messages (for callers that do not need the last events)."""
        self.end()
        return self.messages

    def _breaks_header(self, token: int) -> bool:
        """Whether `token` shows the header being read is malformed, though openai-harmony would read on."""
        if self._header is None:
            return False
        return token == START or token in END_OF_MESSAGE or (
            token != MESSAGE and len(self._header) >= MAX_HEADER_TOKENS)

    def _advance(self, token: int, events: list[Event]) -> bool:
        """Feeds `token` to openai-harmony; False if it raised, leaving the message to be salvaged."""
        try:
            self._parser.process(token)
            if self._header is not None:  # reading a header
                if token == MESSAGE:
                    p = self._parser
                    self._current = _OpenMessage(p.current_role.value, p.current_channel, p.current_recipient,
                                                 p.current_content_type)
                    self._header = None
                    self._announce(events)
                else:
                    self._header.append(token)
            elif self._current is None:  # openai-harmony accepted <|start|>
                self._header = []
            elif token in END_OF_MESSAGE:
                self._take_harmony_message(events)
            elif delta := self._parser.last_content_delta:
                self._emit(delta, events)
            return True
        except Exception:  # openai_harmony.HarmonyError, or anything else the binding raises
            return False

    def _take_harmony_message(self, events: list[Event]) -> None:
        """openai-harmony completed the message: record it and start a fresh parser for the next one."""
        (m,) = self._parser.messages
        text = "".join(c.text for c in m.content if isinstance(c, TextContent))
        self._parser = StreamableParser(self._encoding, None)
        self._end_message(ParsedMessage(m.author.role.value, m.channel, m.recipient, m.content_type, text,
                                        m.author.name), events)

    def _salvage(self, events: list[Event]) -> None:
        """Stops using openai-harmony for the message in progress (see the recovery rule above)."""
        header, self._header, self._parser = self._header or [], None, None
        if self._current is None:
            self._current = _OpenMessage(channel=self._channel_named_in(header))
        for token in header:
            self._feed_salvaged(token, events)

    def _feed_salvaged(self, token: int, events: list[Event]) -> None:
        if token != START and token not in END_OF_MESSAGE:
            self._emit(self._decoder.feed(token), events)
            return
        self._close_salvaged(events)
        if token == START:
            self._advance(token, events)  # a fresh parser waiting for <|start|> always accepts it

    def _close_salvaged(self, events: list[Event]) -> None:
        self._emit(self._decoder.flush(), events)
        self._parser = StreamableParser(self._encoding, None)
        if self._current.announced:
            self._end_message(self._current.to_message(), events)
        self._current = None

    def _channel_named_in(self, header: list[int]) -> str:
        """The harmony channel a broken header names right after <|channel|>, else "final"."""
        if CHANNEL in header:
            after = header[header.index(CHANNEL) + 1:]
            words = self._tokenizer.decode(list(itertools.takewhile(lambda t: 0 <= t < NUM_TEXT_TOKENS, after)),
                                           errors="replace").split()
            if words and words[0] in CHANNELS:
                return words[0]
        return "final"

    def _announce(self, events: list[Event]) -> None:
        c = self._current
        c.announced = True
        events.append(MessageStart(c.role, c.channel, c.recipient, c.content_type))

    def _emit(self, text: str, events: list[Event]) -> None:
        if not text:
            return
        if not self._current.announced:
            self._announce(events)
        self._current.pieces.append(text)
        events.append(TextDelta(self._current.channel, self._current.recipient, text))

    def _end_message(self, message: ParsedMessage, events: list[Event]) -> None:
        self._current = None
        self._messages.append(message)
        events.append(MessageEnd(message))
