"""The request bodies of the three endpoints, as pydantic models: what is accepted, with OpenAI's ranges.

Every field of OpenAI's reference for these endpoints is here, and is one of three things: honoured;
accepted because it asks nothing of the model (`user`, `metadata`, `prompt_cache_key`: the prefix
cache needs no hint); or refused with a 400 naming it when set to a value this server cannot honour
(`refuse_unsupported`). A top-level field that is not in the reference is refused too, as OpenAI does.
Inside messages and items, fields that carry nothing for the model (`refusal`, `annotations`, ids that
clients echo back) are ignored. docs/server.md has the table.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from gptoss.generation.sampling import SamplingParams, with_defaults
from gptoss.model.generation_config import GenerationConfig
from gptoss.server.errors import APIError


class _Part(BaseModel):
    """Something inside a request: fields it carries that mean nothing to the model are ignored."""

    model_config = ConfigDict(extra="ignore")


class _Request(BaseModel):
    """A request body: a field OpenAI's reference does not have is refused (pydantic's extra_forbidden),
    and so is a string that is not text (a lone surrogate such as "\\ud800", which JSON allows)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _only_text(cls, data: Any) -> Any:
        if path := _unencodable(data):
            raise APIError(400, f"{path}: holds a lone surrogate (half of a UTF-16 pair), which is not text",
                           param=path, code="invalid_string")
        return data

    def refuse_unsupported(self, supported: dict[str, Any]) -> None:
        """A 400 for each field set to a value other than the ones `supported` lists for it."""
        for name, allowed in supported.items():
            value = getattr(self, name)
            if value is not None and value not in (allowed if isinstance(allowed, tuple) else (allowed,)):
                raise APIError(400, f"{name} = {value!r} is not supported by this server", param=name,
                               code="unsupported_parameter")


def _unencodable(value: Any, path: str = "") -> str | None:
    """The path of the first string in `value` (nested dicts and lists) that UTF-8 cannot encode."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return path or "body"
    elif isinstance(value, dict):
        for key, item in value.items():
            if found := _unencodable(key, path) or _unencodable(item, f"{path}.{key}" if path else str(key)):
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if found := _unencodable(item, f"{path}.{i}" if path else str(i)):
                return found
    return None


class TextPart(_Part):
    type: Literal["text", "input_text", "output_text", "reasoning_text", "summary_text"]
    text: str


Content = str | list[TextPart]


def text_of(content: Content | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)


Seed = Annotated[int, Field(ge=-2**63, le=2**64 - 1)]  # what a torch.Generator takes
# OpenAI's rule for function and tool names; the name goes into the harmony header and the grammar as is.
ToolName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
LogitBias = dict[str, Annotated[float, Field(ge=-100, le=100)]]


class SamplingFields(_Request):
    """Fields that every endpoint shares."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: Seed | None = None
    stream: bool = False
    user: str | None = None                    # informational (OpenAI: abuse monitoring)
    safety_identifier: str | None = None       # informational
    prompt_cache_key: str | None = None        # prefixes are found by their tokens; responses: names the conversation
    metadata: dict[str, str] | None = None     # echoed on stored responses
    service_tier: Literal["auto", "default"] | None = None

    def sampling(self, defaults: GenerationConfig, logit_bias: LogitBias | None = None,
                 presence_penalty: float | None = None, frequency_penalty: float | None = None,
                 vocab_size: int | None = None) -> SamplingParams:
        """The request's values; for those it does not give, the checkpoint's generation_config.json
        (`defaults`), else OpenAI's defaults: temperature 1, no nucleus cut. Temperature 0 is greedy. The
        file's top_k applies too (the OpenAI API has no such field)."""
        bias = {}
        for key, value in (logit_bias or {}).items():
            if not key.isdigit() or vocab_size is not None and int(key) >= vocab_size:
                raise APIError(400, f"logit_bias: {key!r} is not a token id of this model", param="logit_bias")
            bias[int(key)] = value
        return with_defaults(defaults, 1.0, self.temperature, top_p=self.top_p, seed=self.seed, logit_bias=bias,
                             presence_penalty=presence_penalty or 0.0, frequency_penalty=frequency_penalty or 0.0)


class StreamOptions(_Part):
    include_usage: bool = False
    include_obfuscation: bool | None = None   # OpenAI pads streamed events against side channels; nothing to pad here


class TextCompletionFields(SamplingFields):
    """What chat and text completions share beyond sampling."""

    stop: str | list[str] | None = None
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=16)
    logit_bias: LogitBias | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
        return stops

    def sampling(self, defaults: GenerationConfig, vocab_size: int | None = None) -> SamplingParams:
        return super().sampling(defaults, self.logit_bias, self.presence_penalty, self.frequency_penalty, vocab_size)


class FunctionCall(_Part):
    name: str
    arguments: str


class CustomCall(_Part):
    name: str
    input: str


class _FunctionOrCustom(_Part):
    """Chat's tool shapes: `type` says which of the fields `function` and `custom` holds the tool."""

    @model_validator(mode="after")
    def _matches_type(self):
        if getattr(self, self.type) is None:
            raise ValueError(f"type {self.type!r} needs the field {self.type!r}")
        return self


class ToolCall(_FunctionOrCustom):
    """An earlier call in an assistant message: of a function (JSON arguments) or a custom tool (text input)."""

    id: str
    type: Literal["function", "custom"] = "function"
    function: FunctionCall | None = None
    custom: CustomCall | None = None

    @property
    def name(self) -> str:
        return self.function.name if self.type == "function" else self.custom.name

    @property
    def arguments(self) -> str:
        return self.function.arguments if self.type == "function" else self.custom.input


class ChatMessage(_Part):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content | None = None
    # An earlier answer's reasoning: `reasoning_content` as this server (and vLLM) returns it, or
    # `reasoning` as OpenAI's gpt-oss guide passes it back.
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class FunctionDef(_Part):
    name: ToolName
    description: str = ""
    parameters: dict | None = None
    strict: bool | None = None  # arguments always fit `parameters` here, strict or not


class TextToolFormat(_Part):
    type: Literal["text"]


class GrammarDefinition(_Part):
    syntax: Literal["lark", "regex"]
    definition: str


class GrammarToolFormat(_Part):
    """A custom tool's grammar: Responses gives `syntax` and `definition` inline, Chat Completions in `grammar`."""

    type: Literal["grammar"]
    syntax: Literal["lark", "regex"] | None = None
    definition: str | None = None
    grammar: GrammarDefinition | None = None

    @model_validator(mode="after")
    def _has_definition(self) -> GrammarToolFormat:
        if self.grammar is not None:
            self.syntax, self.definition = self.grammar.syntax, self.grammar.definition
        if self.syntax is None or self.definition is None:
            raise ValueError("a grammar format needs its syntax (lark or regex) and definition")
        return self


CustomToolFormat = Annotated[TextToolFormat | GrammarToolFormat, Field(discriminator="type")]


class CustomDef(_Part):
    """A custom (freeform) tool: the model writes its input as text, following `format`'s grammar if any."""

    name: ToolName
    description: str = ""
    format: CustomToolFormat | None = None


class ChatTool(_FunctionOrCustom):
    type: Literal["function", "custom"]
    function: FunctionDef | None = None
    custom: CustomDef | None = None


class NamedFunction(_Part):
    name: str


class ChatToolChoice(_Part):
    type: Literal["function", "custom"]
    function: NamedFunction | None = None
    custom: NamedFunction | None = None

    @property
    def name(self) -> str | None:
        named = self.function if self.type == "function" else self.custom
        return named and named.name


class JsonSchemaFormat(_Part):
    name: str = "response"
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None  # the answer always fits the schema here, strict or not


class ResponseFormat(_Part):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(TextCompletionFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ChatToolChoice | None = None
    parallel_tool_calls: bool | None = None    # allowed, not required: gpt-oss makes one call a turn
    reasoning_effort: Literal["low", "medium", "high"] = "medium"
    response_format: ResponseFormat | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    store: bool | None = None
    # Fields this server cannot honour: refused unless absent or at their neutral value.
    modalities: list[str] | None = None
    audio: dict | None = None
    prediction: dict | None = None
    web_search_options: dict | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    functions: list | None = None
    function_call: str | dict | None = None

    def check_supported(self) -> None:
        self.refuse_unsupported({"store": False, "verbosity": "medium", "audio": (), "prediction": (),
                                 "web_search_options": (), "functions": (), "function_call": ()})
        if self.modalities not in (None, ["text"]):
            raise APIError(400, "modalities: this server writes text only", param="modalities",
                           code="unsupported_parameter")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs = true", param="top_logprobs")


class CompletionRequest(TextCompletionFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this endpoint
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        self.refuse_unsupported({"best_of": 1, "suffix": ()})

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: one, or several (a list of strings or of token-id lists)."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        if not self.prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        return list(self.prompt)


class MessageItem(_Part):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Content


class ReasoningItem(_Part):
    """Earlier reasoning, as its text (`content`, else `summary`) or as the `encrypted_content` this
    server returned for it (`include: ["reasoning.encrypted_content"]`)."""

    type: Literal["reasoning"]
    content: list[TextPart] | None = None
    summary: list[TextPart] = []
    encrypted_content: str | None = None


class FunctionCallItem(_Part):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    namespace: str | None = None  # a function of a `namespace` tool


class FunctionCallOutputItem(_Part):
    type: Literal["function_call_output", "custom_tool_call_output"]
    call_id: str
    output: Content


class CustomToolCallItem(_Part):
    type: Literal["custom_tool_call"]
    call_id: str
    name: str
    input: str
    namespace: str | None = None


class CodeOutput(_Part):
    type: Literal["logs", "image"]
    logs: str | None = None


class CodeInterpreterCallItem(_Part):
    """An earlier run of the python tool: rendered again as the call and what it printed."""

    type: Literal["code_interpreter_call"]
    code: str | None = None
    outputs: list[CodeOutput] | None = None


class WebSearchCallItem(_Part):
    """An earlier browser call. The page it showed is not in the item, so it is not rendered again: the
    reasoning and answer that used it are."""

    type: Literal["web_search_call"]


def _item_type(item: Any) -> str | None:
    return item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", None)


def _item_tag(item: Any) -> str | None:
    kind = _item_type(item)
    return "function_call_output" if kind == "custom_tool_call_output" else kind


InputItem = Annotated[Annotated[MessageItem, Tag("message")] | Annotated[ReasoningItem, Tag("reasoning")]
                      | Annotated[FunctionCallItem, Tag("function_call")]
                      | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
                      | Annotated[CustomToolCallItem, Tag("custom_tool_call")]
                      | Annotated[CodeInterpreterCallItem, Tag("code_interpreter_call")]
                      | Annotated[WebSearchCallItem, Tag("web_search_call")],
                      Discriminator(_item_tag)]


class FunctionToolSpec(_Part):
    type: Literal["function"]
    name: ToolName
    description: str | None = ""
    parameters: dict | None = None
    strict: bool | None = None  # arguments always fit `parameters` here, strict or not


class CustomToolSpec(_Part):
    type: Literal["custom"]
    name: ToolName
    description: str | None = ""
    format: CustomToolFormat | None = None


NamespacedTool = Annotated[FunctionToolSpec | CustomToolSpec, Field(discriminator="type")]


class NamespaceToolSpec(_Part):
    """Functions under a namespace of their own: harmony renders it as one, the model calls NAMESPACE.NAME."""

    type: Literal["namespace"]
    name: ToolName
    description: str | None = ""
    tools: list[NamespacedTool] = Field(min_length=1)

    @model_validator(mode="after")
    def _not_reserved(self) -> NamespaceToolSpec:
        if self.name in ("browser", "python", "functions"):
            raise ValueError(f"the namespace name {self.name!r} is harmony's own (functions, browser, python)")
        return self


class WebSearchFilters(_Part):
    allowed_domains: list[str] | None = None


class WebSearchToolSpec(_Part):
    """OpenAI's hosted web search, served by gpt-oss's own browser tool (`gptoss.tools.browser`)."""

    type: Literal["web_search", "web_search_2025_08_26", "web_search_preview", "web_search_preview_2025_03_11"]
    external_web_access: bool | None = None  # false: only a backend that reads no network (local) may serve
    filters: WebSearchFilters | None = None  # allowed_domains: search results from other sites are dropped
    search_context_size: Literal["low", "medium", "high"] | None = None  # results a search shows: 3, 5, 10
    user_location: dict | None = None  # a hint for ranking; the backends here take none, so it changes nothing


class CodeInterpreterToolSpec(_Part):
    """OpenAI's hosted code interpreter, served by gpt-oss's own python tool (`gptoss.tools.python_sandbox`)."""

    type: Literal["code_interpreter"]
    container: str | dict = "auto"  # a container of its own per conversation, whatever is asked; no files


def _tool_tag(tool: Any) -> str | None:
    kind = tool.get("type") if isinstance(tool, dict) else getattr(tool, "type", None)
    return "web_search" if isinstance(kind, str) and kind.startswith("web_search") else kind


ResponsesTool = Annotated[Annotated[FunctionToolSpec, Tag("function")] | Annotated[CustomToolSpec, Tag("custom")]
                          | Annotated[NamespaceToolSpec, Tag("namespace")]
                          | Annotated[WebSearchToolSpec, Tag("web_search")]
                          | Annotated[CodeInterpreterToolSpec, Tag("code_interpreter")], Discriminator(_tool_tag)]
SUPPORTED_TOOL_TYPES = ("function", "custom", "namespace", "web_search", "web_search_preview", "code_interpreter")


class ResponsesToolChoice(_Part):
    """A named function or custom tool (`namespace` for one inside a namespace tool), or a hosted tool
    by its type (web_search..., code_interpreter), which the completion must then call."""

    type: Literal["function", "custom", "web_search", "web_search_2025_08_26", "web_search_preview",
                  "web_search_preview_2025_03_11", "code_interpreter"]
    name: str | None = None
    namespace: str | None = None


class ReasoningConfig(_Part):
    effort: Literal["low", "medium", "high"] = "medium"
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None  # the older name of `summary`


class TextFormat(_Part):
    type: Literal["text", "json_object", "json_schema"]
    name: str = "response"
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(_Part):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(SamplingFields):
    input: str | list[InputItem]
    instructions: str | None = None
    reasoning: ReasoningConfig | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponsesToolChoice | None = None
    parallel_tool_calls: bool | None = None     # allowed, not required: gpt-oss makes one call at a time
    max_output_tokens: int | None = Field(None, ge=1)
    max_tool_calls: int | None = Field(None, ge=1)  # calls of the built-in tools the server runs in one response
    previous_response_id: str | None = None
    store: bool = True                          # OpenAI's default
    text: TextConfig | None = None
    include: list[str] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream_options: StreamOptions | None = None
    truncation: Literal["auto", "disabled"] | None = None
    background: bool | None = None
    conversation: str | dict | None = None
    prompt: dict | None = None
    client_metadata: dict | None = None         # a client's own bookkeeping (coding agents send it): ignored

    INCLUDABLE: ClassVar[tuple[str, ...]] = ("message.output_text.logprobs", "reasoning.encrypted_content",
                                             "code_interpreter_call.outputs", "web_search_call.action.sources")

    @model_validator(mode="before")
    @classmethod
    def _known_tool_types(cls, data: Any) -> Any:
        """A tool of a type this server does not run (mcp, file_search, computer, image_generation, ...)
        is a 400 that names it, not pydantic's list of union members."""
        tools = data.get("tools") if isinstance(data, dict) else None
        for i, tool in enumerate(tools if isinstance(tools, list) else []):
            kind = _tool_tag(tool)
            if isinstance(kind, str) and kind not in SUPPORTED_TOOL_TYPES:
                raise APIError(400, f"tools.{i}: tools of type {tool['type']!r} are not supported by this server "
                                    f"(it serves {', '.join(SUPPORTED_TOOL_TYPES)})", param=f"tools.{i}.type",
                               code="unsupported_tool_type")
        return data

    def check_supported(self) -> None:
        self.refuse_unsupported({"truncation": "disabled", "background": False, "conversation": (), "prompt": ()})
        for item in self.include or []:
            if item not in self.INCLUDABLE:
                raise APIError(400, f"include: {item!r} is not supported by this server (it can include "
                                    f"{', '.join(self.INCLUDABLE)})", param="include", code="unsupported_parameter")
        for i, tool in enumerate(self.tools or []):
            if isinstance(tool, CodeInterpreterToolSpec) and isinstance(tool.container, dict) and tool.container.get(
                    "file_ids"):
                raise APIError(400, "code_interpreter: container.file_ids is not supported by this server (it has no "
                                    "files API)", param=f"tools.{i}.container.file_ids", code="unsupported_parameter")
        if self.text is not None and self.text.verbosity not in (None, "medium"):
            raise APIError(400, f"text.verbosity = {self.text.verbosity!r} is not supported by this server",
                           param="text.verbosity", code="unsupported_parameter")

    @property
    def wants_logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or [])

    @property
    def summary(self) -> str | None:
        """The reasoning summary asked for. gpt-oss writes none, so the summary given is the reasoning itself."""
        return self.reasoning and (self.reasoning.summary or self.reasoning.generate_summary)
