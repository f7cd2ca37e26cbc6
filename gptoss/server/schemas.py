"""The request bodies of the three endpoints, as pydantic models: what is accepted, with OpenAI's ranges."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from gptoss.generation.sampling import SamplingParams
from gptoss.server.errors import APIError


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
