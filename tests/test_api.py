"""The API fields that agents rely on, through the official `openai` client and OpenAI's Agents SDK:
structured outputs, forced tool calls, logprobs, logit_bias, echo, n, stored responses.

A tiny random-weight model (fp32) behind the real server. Random weights never end a free text by
themselves (any of 201,088 tokens is as likely as <|end|>), so where a test needs the reasoning to end
it raises <|end|>'s logit as a client would, with logit_bias, or, where the client cannot (the Responses
API has no logit_bias), by the same nudge inside the engine's sampling. The grammar still decides what
may be written: the JSON and the tool calls come out of the constrained decoding under test.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import torch

from gptoss.chat.harmony import Chat, FunctionTool, render_for_completion
from gptoss.chat.tokenizer import HARMONY_SPECIAL_TOKENS, get_tokenizer
from gptoss.server import Engine, create_app
from gptoss.server import engine as engine_module
from gptoss.server.store import ResponseStore
from tests.conftest import running_server

MODEL = "tiny-random"
END, RETURN = HARMONY_SPECIAL_TOKENS["<|end|>"], HARMONY_SPECIAL_TOKENS["<|return|>"]
END_SOON = {str(END): 40}  # logit_bias that makes a free text end at once
ANSWER = {"type": "object", "additionalProperties": False, "required": ["count", "sunny", "color"],
          "properties": {"count": {"type": "integer", "minimum": 0, "maximum": 99}, "sunny": {"type": "boolean"},
                         "color": {"enum": ["red", "green", "blue"]}}}
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
           "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}, "days": {"type": "integer", "minimum": 1,
                                                                                "maximum": 7}}}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                                 "parameters": WEATHER}}
HELLO = [{"role": "user", "content": "What is the weather like?"}]


@pytest.fixture(scope="module")
def model(tiny_random_model):
    return tiny_random_model


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return tmp_path_factory.mktemp("store") / "responses.sqlite3"


@pytest.fixture(scope="module")
def server(model, store_path):
    engine = Engine(model, max_batch=4, context=1024)
    with running_server(create_app(engine, MODEL, ResponseStore(store_path))) as url:
        yield type("Server", (), {"url": url, "engine": engine})


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def end_soon(monkeypatch):
    """The engine's sampling with <|end|> and <|return|> raised, for clients that have no logit_bias:
    messages end as soon as the grammar (if any) lets them."""
    real = engine_module.sample

    def sample(logits, params, generator=None):
        logits = logits.clone()
        logits[..., [END, RETURN]] += 40
        return real(logits, params, generator)

    monkeypatch.setattr(engine_module, "sample", sample)


# --- structured outputs and tool calls ----------------------------------------------------------------------

def test_a_json_schema_answer_fits_its_schema(client):
    for stream in (False, True):
        kwargs = dict(model=MODEL, messages=HELLO, max_tokens=300, temperature=0, logit_bias=END_SOON,
                      response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": ANSWER,
                                                                              "strict": True}})
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kwargs))
            content, finish = "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            r = client.chat.completions.create(**kwargs)
            content, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert finish == "stop"
        jsonschema.validate(json.loads(content), ANSWER)


def test_json_object_and_the_responses_text_format(client, end_soon):
    # Free-form JSON: random weights would write a string for ever, so quotes are raised too (the grammar
    # still decides where a quote may go).
    quotes = {str(t): 20 for t in get_tokenizer().encode('"') + get_tokenizer().encode('"}')}
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=300, temperature=0.7, seed=1,
                                       response_format={"type": "json_object"}, logit_bias=quotes)
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.responses.create(model=MODEL, input="What is the weather like?", max_output_tokens=300, temperature=0,
                                text={"format": {"type": "json_schema", "name": "weather", "schema": ANSWER}})
    assert r.status == "completed" and r.text.format.type == "json_schema"
    jsonschema.validate(json.loads(r.output_text), ANSWER)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_tool_call_has_arguments_that_fit(client, choice):
    tools = [WEATHER_TOOL, {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    r = client.chat.completions.create(model=MODEL, messages=HELLO, tools=tools, tool_choice=choice, max_tokens=300,
                                       temperature=0, logit_bias=END_SOON)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls"
    if isinstance(choice, dict):
        assert call.function.name == "get_weather"
    schema = WEATHER if call.function.name == "get_weather" else {"type": "object"}
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_a_named_tool_in_the_responses_api(client, end_soon):
    r = client.responses.create(model=MODEL, input="Weather?", max_output_tokens=300, temperature=0,
                                tools=[{"type": "function", **WEATHER_TOOL["function"]}],
                                tool_choice={"type": "function", "name": "get_weather"})
    (call,) = [item for item in r.output if item.type == "function_call"]
    assert call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER)


# --- logprobs, logit_bias, echo, n -----------------------------------------------------------------------------

def test_chat_logprobs_are_the_models_and_stream_as_they_come(client):
    """The answer's tokens with their log-probabilities under the model. (An answer format keeps the
    random model's harmony well formed: its reasoning ends at once and the answer is free text.)"""
    kwargs = dict(model=MODEL, messages=HELLO, max_tokens=40, temperature=0, logprobs=True, top_logprobs=3,
                  logit_bias=END_SOON, tools=[WEATHER_TOOL], tool_choice="none",
                  response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "string"}}})
    r = client.chat.completions.create(**kwargs)
    entries = r.choices[0].logprobs.content
    assert len(entries) > 5 and bytes(b for e in entries for b in e.bytes).decode() == r.choices[0].message.content
    for e in entries:  # greedy: the chosen token is the likeliest one the grammar allows
        assert len(e.top_logprobs) == 3 and e.logprob <= e.top_logprobs[0].logprob + 1e-6
    assert sum(e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in entries) > len(entries) // 2
    streamed = [e for c in client.chat.completions.create(stream=True, **kwargs)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]


def test_responses_include_output_text_logprobs(client, end_soon):
    kwargs = dict(model=MODEL, input="Say something.", max_output_tokens=30, temperature=0, top_logprobs=2,
                  include=["message.output_text.logprobs"], text={"format": {"type": "json_schema", "name": "a",
                                                                             "schema": {"type": "string"}}})
    r = client.responses.create(**kwargs)
    (message,) = [item for item in r.output if item.type == "message"]
    part = message.content[0]
    assert len(part.logprobs) > 3 and bytes(b for e in part.logprobs for b in e.bytes).decode() == part.text
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in part.logprobs)
    deltas = [e for event in client.responses.create(stream=True, **kwargs)
              if event.type == "response.output_text.delta" for e in event.logprobs]
    assert [(e.token, e.logprob) for e in deltas] == [(e.token, e.logprob) for e in part.logprobs]


def test_completions_echo_logprobs_and_logit_bias(client, model):
    tokenizer = get_tokenizer()
    prompt = tokenizer.encode("The capital of France is")
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, echo=True, logprobs=2)
    text, lp = r.choices[0].text, r.choices[0].logprobs
    assert text.startswith("The capital of France is") and len(lp.tokens) == len(prompt) + 5
    assert lp.token_logprobs[0] is None and lp.text_offset[:2] == [0, len("The")]
    with torch.no_grad():
        truth = torch.log_softmax(model(torch.tensor([prompt]))[0], -1)
    for i in range(1, len(prompt)):  # the prompt's logprobs are the model's own
        assert lp.token_logprobs[i] == pytest.approx(truth[i - 1, prompt[i]].item(), abs=1e-4)
        assert len(lp.top_logprobs[i]) == 2
    forced = tokenizer.encode(" Paris")[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                  logit_bias={str(forced): 100})
    assert r.choices[0].text == " Paris" * 4


def test_n_choices_share_the_prompt(client, server):
    before = server.engine.counters["requests_with_cached_tokens"]
    messages = [{"role": "user", "content": "Tell me a story about a cache. " * 8}]
    r = client.chat.completions.create(model=MODEL, messages=messages, n=3, max_tokens=6, temperature=1.0, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 18
    assert server.engine.counters["requests_with_cached_tokens"] - before >= 2  # choices 1 and 2 reused choice 0's prompt
    greedy = client.chat.completions.create(model=MODEL, messages=messages, n=2, max_tokens=6, temperature=0)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    chunks = list(client.completions.create(model=MODEL, prompt=["one", "two"], n=2, max_tokens=3, stream=True))
    assert {c.choices[0].index for c in chunks} == {0, 1, 2, 3}


# --- stored responses ---------------------------------------------------------------------------------------

def test_stored_responses_chain_survive_a_restart_and_can_be_deleted(client, store_path):
    first = client.responses.create(model=MODEL, input="Hello there.", max_output_tokens=6, temperature=0)
    assert client.responses.retrieve(first.id).output_text == first.output_text
    second = client.responses.create(model=MODEL, input="And now?", previous_response_id=first.id,
                                     max_output_tokens=6, temperature=0)
    # The same turn sent whole: the earlier input and output items, then the new input.
    whole = client.responses.create(model=MODEL, store=False, max_output_tokens=6, temperature=0,
                                    input=[{"role": "user", "content": "Hello there."},
                                           *[item.model_dump(exclude_none=True) for item in first.output],
                                           {"role": "user", "content": "And now?"}])
    assert second.usage.input_tokens == whole.usage.input_tokens > first.usage.input_tokens
    assert second.output_text == whole.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(whole.id)                      # store=False kept nothing
    assert ResponseStore(store_path).get(second.id)["id"] == second.id   # on disk: a restart finds it
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    third = client.responses.create(model=MODEL, input="Still?", previous_response_id=second.id, max_output_tokens=2)
    assert third.usage.input_tokens > second.usage.input_tokens  # the chain holds without the first response


def test_reasoning_passed_back_enters_the_prompt_during_a_tool_loop(client):
    """gpt-oss needs its reasoning back between a tool call and its result (harmony drops it only once a
    final answer follows): the `reasoning` field of OpenAI's gpt-oss guide, like `reasoning_content`."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    loop = [{"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [call], "reasoning": "I should look it up."},
            {"role": "tool", "tool_call_id": "call_1", "content": "rain"}]
    r = client.chat.completions.create(model=MODEL, messages=loop, tools=[WEATHER_TOOL], max_tokens=1)
    chat = (Chat(tools=[FunctionTool("get_weather", "Weather forecast", WEATHER)]).user("Weather in Oslo?")
            .assistant("I should look it up.", "analysis").tool_call("get_weather", '{"city": "Oslo"}')
            .tool_result("get_weather", "rain"))
    without = client.chat.completions.create(model=MODEL, messages=[loop[0], {**loop[1], "reasoning": None}, loop[2]],
                                             tools=[WEATHER_TOOL], max_tokens=1)
    assert r.usage.prompt_tokens == len(render_for_completion(chat)) > without.usage.prompt_tokens


# --- OpenAI's Agents SDK ------------------------------------------------------------------------------------

@pytest.mark.parametrize("api", ["responses", "chat"])
def test_agents_sdk_runs_plain_tool_and_structured_agents(server, end_soon, api):
    agents = pytest.importorskip("agents")
    from pydantic import BaseModel, Field

    agents.set_tracing_disabled(True)
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    model = (agents.OpenAIResponsesModel if api == "responses" else agents.OpenAIChatCompletionsModel)(MODEL, client)
    settings = agents.ModelSettings(temperature=0, max_tokens=200)

    class Forecast(BaseModel):
        count: int = Field(ge=0, le=99)
        sunny: bool

    calls = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return "sunny, 21 C"

    plain = agents.Agent(name="plain", instructions="Be brief.", model=model, model_settings=settings)
    result = agents.Runner.run_sync(plain, "Hello")
    assert isinstance(result.final_output, str)

    forced = agents.ModelSettings(temperature=0, max_tokens=200, tool_choice="get_weather")
    tooled = agents.Agent(name="tooled", model=model, model_settings=forced, tools=[get_weather])
    result = agents.Runner.run_sync(tooled, "Weather in Paris?", max_turns=4)  # call, result, then an answer
    assert len(calls) >= 1 and isinstance(result.final_output, str)
    assert any(item.type == "tool_call_output_item" for item in result.new_items)

    structured = agents.Agent(name="structured", model=model, model_settings=settings, output_type=Forecast)
    result = agents.Runner.run_sync(structured, "Forecast?")
    assert isinstance(result.final_output, Forecast)
