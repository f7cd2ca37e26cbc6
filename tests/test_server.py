"""`gptoss serve`: the real server on loopback, driven by the official `openai` client.

A tiny random-weight model of the real vocabulary runs in fp32, so greedy outputs can be compared token
for token: with `gptoss.generation.generate.generate` on the same harmony prompt, and between a request
run alone and the same request among 15 others. A random model never writes a tool call by itself,
so the tool-call tests force the sampled tokens (the model still runs); the prompts built from tool
calls and results in the history are checked against harmony's own rendering.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

from gptoss.chat.grammar import OutputRules
from gptoss.chat.harmony import Chat, FunctionTool, parse_completion, render_for_completion, stop_tokens
from gptoss.chat.tokenizer import get_tokenizer
from gptoss.cli import serve
from gptoss.errors import GptossError
from gptoss.generation.cache import KVCache
from gptoss.generation.generate import generate
from gptoss.server import Engine, create_app
from gptoss.server import engine as engine_module
from gptoss.server.outputs import ChatOutput, ResponsesOutput
from tests.conftest import running_server

MODEL = "tiny-random"
CONTEXT = 512
SLOTS = 8  # fewer than the 16 concurrent clients, so some wait for a slot and take it over mid-batch
WEATHER = FunctionTool("get_weather", "Current weather in a city",
                       {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
WEATHER_TOOL = {"type": "function", "function": {"name": WEATHER.name, "description": WEATHER.description,
                                                 "parameters": WEATHER.parameters}}
# What gpt-oss writes after `<|start|>assistant` to call get_weather (harmony's function-call format).
TOOL_CALL = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'


@pytest.fixture(scope="module")
def checkpoint(tiny_random_checkpoint):
    return tiny_random_checkpoint


@pytest.fixture(scope="module")
def model(tiny_random_model):
    return tiny_random_model


@pytest.fixture(scope="module")
def server(model):
    """The app under uvicorn in a thread, on a free loopback port; always shut down at the end."""
    engine = Engine(model, max_batch=SLOTS, context=CONTEXT)
    with running_server(create_app(engine, MODEL)) as url:
        yield type("Server", (), {"url": url, "engine": engine})


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def expected(model, chat: Chat, max_tokens: int, rules: OutputRules | None = None):
    """The prompt, and what greedy `generate` makes of it, as tokens and as harmony messages. With tools
    offered, the server holds tool calls to their schemas: pass the same `rules`."""
    prompt = render_for_completion(chat)
    tokens = generate(model, prompt, max_tokens, stop_tokens=stop_tokens(), rules=rules)
    return prompt, tokens, parse_completion(tokens)


def answer(messages) -> str:
    return "".join(m.text for m in messages if m.recipient is None and m.channel != "analysis")


def reasoning(messages) -> str | None:
    return "".join(m.text for m in messages if m.recipient is None and m.channel == "analysis") or None


@pytest.fixture
def forced_tool_call(monkeypatch):
    """Each call of the returned function makes the engine sample the tokens of TOOL_CALL once more
    (the model still runs; only the sampled tokens are replaced)."""
    script = []
    real = engine_module.sample

    def sample(logits, params, generator=None):
        return torch.tensor([script.pop(0)]) if script else real(logits, params, generator)

    monkeypatch.setattr(engine_module, "sample", sample)
    return lambda: script.extend(get_tokenizer().encode(TOOL_CALL, allowed_special="all"))


def test_cache_sequences_prefill_alone_decode_together_and_release_alone(model):
    """Sequences of one KVCache prefilled one by one then decoded in one batch give what each gives in a
    cache of its own (to float rounding: the batch changes the matmul kernels); releasing one leaves the
    other's pages alone and gives all of its own back."""
    prompts = [list(range(1000, 1013)), list(range(2000, 2005))]
    big = KVCache.for_tokens(model.config, 64, 2, page_size=4, dtype=model.dtype)
    with torch.inference_mode():
        alone = []
        for p in prompts:
            own = KVCache.for_tokens(model.config, 64, page_size=4, dtype=model.dtype)
            sequence = own.sequence()
            model(torch.tensor([p]), cache=own.batch([sequence], [p]))
            alone.append(model(torch.tensor([[7]]), cache=own.batch([sequence], [[7]]))[0])
        sequences = [big.sequence() for _ in prompts]
        for sequence, p in zip(sequences, prompts):
            model(torch.tensor([p]), cache=big.batch([sequence], [p]))
        batched = model(torch.tensor([[7], [7]]), cache=big.batch(sequences, [[7], [7]]))
    for row in range(2):
        assert (batched[row] - alone[row]).abs().max() < 1e-5 and batched[row].argmax() == alone[row].argmax()
    assert [s.length for s in sequences] == [14, 6]
    held = sequences[1].held_pages()
    sequences[0].release()
    assert sequences[0].length == 0 and big.free_pages == big.num_pages - held and sequences[1].held_pages() == held


def test_engine_prefills_prompts_longer_than_its_chunk(model):
    """Prompts of several chunks, prefilled a chunk per step beside another request's decoding (the
    sliding window of 8 is far shorter than the chunks): the same greedy tokens as `generate`."""
    prompts = [list(range(3000, 3100)), list(range(4000, 4037)), list(range(5000, 5016))]
    expected = [generate(model, p, 6) for p in prompts]

    async def run():
        engine = Engine(model, max_batch=2, context=128, chunk=16).start()
        generations = [engine.submit(engine_module.Generation(p, 6, stop_tokens=model.config.eos_token_ids))
                       for p in prompts]
        got = [[t async for t in g.tokens()] for g in generations]
        engine.close()
        return got

    assert asyncio.run(run()) == expected


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_streaming_and_not_equal_generate(client, model):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 2?"}]
    prompt, tokens, parsed = expected(model, Chat(developer_instructions="Answer briefly.").user("What is 2 + 2?"), 10)

    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    message = r.choices[0].message
    assert message.content == answer(parsed) and message.content
    assert getattr(message, "reasoning_content", None) == reasoning(parsed)
    assert r.choices[0].finish_reason == ("stop" if tokens[-1] in stop_tokens() else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(tokens))

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == message.content
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == len(prompt) + len(tokens)


def test_completions_equal_generate_and_stop_strings_cut_them(client, model):
    tokenizer = get_tokenizer()
    tokens = generate(model, tokenizer.encode("The capital of France is"), 12)
    text = tokenizer.decode(tokens)
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    assert r.choices[0].text == text and r.choices[0].finish_reason == "length"

    stop = text[len(text) // 2:len(text) // 2 + 3]
    for stream in (False, True):
        r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0,
                                      stop=[stop], stream=stream)
        pieces = list(r) if stream else [r]
        assert "".join(p.choices[0].text for p in pieces) == text[:text.index(stop)]
        assert pieces[-1].choices[0].finish_reason == "stop"


def test_responses_streaming_and_not_equal_generate(client, model):
    chat = Chat(reasoning_effort="low", developer_instructions="Be terse.").user("Name a color.")
    prompt, tokens, parsed = expected(model, chat, 10)
    kwargs = dict(model=MODEL, input=[{"role": "user", "content": "Name a color."}], instructions="Be terse.",
                  reasoning={"effort": "low"}, max_output_tokens=10, temperature=0)

    r = client.responses.create(**kwargs)
    assert r.output_text == answer(parsed) and r.output_text
    assert r.status == ("completed" if tokens[-1] in stop_tokens() else "incomplete")
    assert (r.usage.input_tokens, r.usage.output_tokens) == (len(prompt), len(tokens))

    events = list(client.responses.create(**kwargs, stream=True))
    assert [e.type for e in events[:3]] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert events[-1].type == f"response.{r.status}" and events[-1].response.output_text == r.output_text


def test_tool_call_and_its_result_round_trip_in_chat(client, model, forced_tool_call):
    question = [{"role": "user", "content": "Weather in Paris?"}]
    forced_tool_call()
    r = client.chat.completions.create(model=MODEL, messages=question, tools=[WEATHER_TOOL], temperature=0)
    (call,) = r.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None

    forced_tool_call()
    chunks = list(client.chat.completions.create(model=MODEL, messages=question, tools=[WEATHER_TOOL], temperature=0,
                                                 stream=True))
    deltas = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    assert "".join(d.function.arguments for d in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # The call and its result go back into the conversation exactly as harmony writes them.
    history = question + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                          {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    chat = (Chat(tools=[WEATHER]).user("Weather in Paris?").tool_call("get_weather", call.function.arguments)
            .tool_result("get_weather", '{"temperature": 21}'))
    prompt, _, parsed = expected(model, chat, 8, OutputRules(tools=(WEATHER,)))
    r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER_TOOL], max_tokens=8,
                                       temperature=0)
    assert r.usage.prompt_tokens == len(prompt) and r.choices[0].message.content == answer(parsed)


def test_function_call_and_its_output_round_trip_in_responses(client, model, forced_tool_call):
    forced_tool_call()
    r = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[{"type": "function", **WEATHER_TOOL[
        "function"]}], temperature=0)
    (call,) = [item for item in r.output if item.type == "function_call"]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})

    items = [{"role": "user", "content": "Weather in Paris?"},
             {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
             {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    chat = Chat(tools=[WEATHER]).user("Weather in Paris?").tool_call("get_weather", call.arguments)
    prompt, _, parsed = expected(model, chat.tool_result("get_weather", "sunny"), 8, OutputRules(tools=(WEATHER,)))
    r = client.responses.create(model=MODEL, input=items, tools=[{"type": "function", **WEATHER_TOOL["function"]}],
                                max_output_tokens=8, temperature=0)
    assert r.usage.input_tokens == len(prompt) and r.output_text == answer(parsed)


def test_the_next_turn_reuses_everything_before_harmony_drops_the_reasoning(client, model):
    """Turn 2's prompt holds turn 1's answer as a final message where turn 1 generated whatever it
    generated: the prompts part there (harmony also drops an answer's reasoning). Everything before that
    point, in whole pages of 32, comes from the cache, and `usage` says how much; the answer is unchanged."""
    first = Chat(reasoning_effort="low").user("Tell me about caches. " * 6)
    prompt1, tokens1, parsed1 = expected(model, first, 8)
    r1 = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me about caches. " * 6}],
                                        reasoning_effort="low", max_tokens=8, temperature=0)
    history = [{"role": "user", "content": "Tell me about caches. " * 6},
               {"role": "assistant", "content": r1.choices[0].message.content or ""},
               {"role": "user", "content": "And then?"}]
    second = Chat(reasoning_effort="low").user("Tell me about caches. " * 6).assistant(r1.choices[0].message.content or "")
    prompt2, tokens2, _ = expected(model, second.user("And then?"), 8)
    computed = prompt1 + tokens1[:-1]                      # what turn 1 left in the cache
    common = next(i for i, (a, b) in enumerate(zip(computed + [-1], prompt2)) if a != b)
    r2 = client.chat.completions.create(model=MODEL, messages=history, reasoning_effort="low", max_tokens=8,
                                        temperature=0)
    assert common >= len(prompt1) > 32
    assert r2.usage.prompt_tokens_details.cached_tokens == min(common, len(prompt2) - 1) // 32 * 32
    assert r2.usage.completion_tokens == len(tokens2)


def test_health_and_metrics(server, client):
    for _ in range(2):  # the second reuses the first's prompt
        client.completions.create(model=MODEL, prompt=list(range(100, 150)), max_tokens=2)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.get("/health").json() == {"status": "ok"}
        text = http.get("/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}
    stats = server.engine.stats()
    assert values["gptoss_kv_pages"] == stats["kv_pages"] > 0
    assert values["gptoss_kv_pages_used"] + values["gptoss_kv_pages_free"] == values["gptoss_kv_pages"]
    assert values["gptoss_requests_total"] > 0 and values["gptoss_generated_tokens_total"] > 0
    assert values["gptoss_cached_tokens_total"] > 0 and values["gptoss_requests_with_cached_tokens_total"] > 0
    for name in ("gptoss_waiting", "gptoss_running", "gptoss_prompt_tokens_per_second",
                 "gptoss_generation_tokens_per_second", "gptoss_preemptions_total"):
        assert name in values


def test_harmony_output_maps_to_reasoning_content_and_tool_calls():
    """A hand-written completion (reasoning, a preamble, a tool call) through both output assemblers."""
    text = ("<|channel|>analysis<|message|>Need the weather.<|end|>"
            "<|start|>assistant<|channel|>commentary<|message|>Checking.<|end|>"
            '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
            '{"city": "Oslo"}<|call|>')
    tokens = get_tokenizer().encode(text, allowed_special="all")

    chat = ChatOutput(stops=[])
    deltas = [d for t in tokens for d in chat.feed(t)] + chat.end()
    message = ChatOutput.message(deltas)
    assert (message["reasoning_content"], message["content"]) == ("Need the weather.", "Checking.")
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == [
        ("get_weather", '{"city": "Oslo"}')]
    assert chat.finish_reason("stop") == "tool_calls"

    responses = ResponsesOutput()
    for t in tokens:
        responses.feed(t)
    responses.end()
    assert [item["type"] for item in responses.items] == ["reasoning", "message", "function_call"]
    assert responses.items[0]["content"][0]["text"] == "Need the weather."
    assert (responses.items[2]["name"], responses.items[2]["arguments"]) == ("get_weather", '{"city": "Oslo"}')


def test_16_concurrent_streams_each_equal_running_alone(client, server, monkeypatch):
    """Different prompt lengths, token budgets and sampling (greedy, and seeded sampling on every
    fourth): all 16 complete, each exactly as when it ran alone. The engine batched them: decode steps
    ran all 8 slots at once, and requests took over slots that others had left."""
    requests = [dict(messages=[{"role": "user", "content": "tell me more " * (1 + 3 * i)}], max_tokens=4 + i % 5,
                     temperature=0.8 if i % 4 == 3 else 0, seed=i) for i in range(16)]

    def run(kwargs) -> tuple[str, int]:
        stream = client.chat.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True},
                                                **kwargs)
        chunks = list(stream)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage.total_tokens

    alone = [run(kwargs) for kwargs in requests]
    engine, steps = server.engine, []  # per decode step, the requests in the batch
    decode = engine._decode
    monkeypatch.setattr(engine, "_decode", lambda generations: steps.append(set(generations)) or decode(generations))
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, requests))
    assert together == alone
    assert len({total for _, total in alone}) > 8  # the prompts really differ in length
    assert max(map(len, steps)) == SLOTS and len(set().union(*steps)) == 16 and engine.busy_slots() == 0
    # Continuous batching: some step has a request the step before did not, while others carry on.
    assert any(now - before and now & before for before, now in itertools.pairwise(steps))


BAD_REQUESTS = [  # (what is wrong, endpoint, body, status, param)
    ("malformed JSON", "chat/completions", b'{"model": "tiny-random", "messages": [', 400, None),
    ("messages not a list", "chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("max_tokens not a number", "chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, 400, "max_tokens"),
    ("unknown role", "chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400,
     "messages.0.role"),
    ("unknown model", "chat/completions", {"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}, 404,
     "model"),
    ("prompt longer than the context", "chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "word " * CONTEXT}]}, 400, "messages"),
    ("more tokens than fit", "chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": CONTEXT}, 400, "max_tokens"),
    ("temperature below 0", "chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ("top_p above 1", "completions", {"model": MODEL, "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("n above 16", "completions", {"model": MODEL, "prompt": "hi", "n": 17}, 400, "n"),
    ("token id outside the vocabulary", "completions", {"model": MODEL, "prompt": [10**7]}, 400, "prompt"),
    ("empty prompt", "completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("tool choice naming no tool", "chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER_TOOL],
      "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, 400, "tool_choice"),
    ("tool choice required without tools", "responses", {"model": MODEL, "input": "hi", "tool_choice": "required"},
     400, "tool_choice"),
    ("a field the API does not have", "chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temprature": 0.5}, 400, "temprature"),
    ("store in chat completions", "chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "store": True}, 400, "store"),
    ("suffix", "completions", {"model": MODEL, "prompt": "hi", "suffix": "bye"}, 400, "suffix"),
    ("include of something unsupported", "responses",
     {"model": MODEL, "input": "hi", "include": ["file_search_call.results"]}, 400, "include"),
    ("previous response that does not exist", "responses",
     {"model": MODEL, "input": "hi", "previous_response_id": "resp_nope"}, 404, "previous_response_id"),
    ("logit bias on no token", "chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"999999": 5}}, 400,
     "logit_bias"),
    ("tool result for no call", "chat/completions",
     {"model": MODEL, "messages": [{"role": "tool", "tool_call_id": "call_x", "content": "1"}]}, 400,
     "messages.0.tool_call_id"),
    ("function output for no call", "responses",
     {"model": MODEL, "input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, 400,
     "input.0.call_id"),
    ("unknown input item", "responses", {"model": MODEL, "input": [{"type": "image_generation_call"}]}, 400,
     "input.0"),
    ("unknown endpoint", "embeddings", {"model": MODEL, "input": "hi"}, 404, None),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, server):
    with httpx.Client(base_url=f"{server.url}/v1", timeout=60) as http:
        for what, endpoint, body, status, param in BAD_REQUESTS:
            r = (http.post(endpoint, content=body, headers={"Content-Type": "application/json"})
                 if isinstance(body, bytes) else http.post(endpoint, json=body))
            error = r.json()["error"]
            assert (r.status_code, error["param"]) == (status, param), (what, error)
            assert error["message"] and error["type"], what
    with pytest.raises(openai.NotFoundError, match="gpt-5"):
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    assert client.completions.create(model=MODEL, prompt="still there?", max_tokens=2).usage.completion_tokens == 2
    assert server.engine.busy_slots() == 0


def test_a_client_leaving_mid_stream_cancels_its_generation_and_frees_its_slot(server, monkeypatch):
    submitted = []
    submit = server.engine.submit
    monkeypatch.setattr(server.engine, "submit", lambda request: submitted.append(request) or submit(request))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go on"}], "temperature": 0, "stream": True}
    with httpx.Client(base_url=f"{server.url}/v1", timeout=60) as http:
        with http.stream("POST", "chat/completions", json=body) as r:
            lines = r.iter_lines()
            assert sum(line.startswith("data: ") for line in (next(lines) for _ in range(6))) >= 3
    (request,) = submitted
    deadline = time.monotonic() + 30
    while server.engine.busy_slots() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.engine.busy_slots() == 0 and request.cancelled
    assert len(request.generated) < request.max_new_tokens  # it stopped early, not at its budget
    cache = server.engine.cache
    assert request.sequence is None and cache.free_pages == cache.num_pages  # every page given back


def test_an_engine_failure_is_a_500_and_the_server_goes_on(client, server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("sampling broke")

    monkeypatch.setattr(engine_module, "sample", broken)
    with pytest.raises(openai.InternalServerError, match="sampling broke"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    with pytest.raises(openai.APIError, match="sampling broke"):
        list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True))
    monkeypatch.undo()
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens == 2
    assert server.engine.busy_slots() == 0


def test_serve_command_builds_the_engine_and_app_from_its_options(checkpoint, monkeypatch, tmp_path):
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: served.update(app=app, host=host, port=port))
    args = parser.parse_args(["serve", "--model", str(checkpoint), "--port", "9001", "--max-batch", "3",
                              "--max-context", "256", "--served-model-name", "mine",
                              "--store-path", str(tmp_path / "responses.sqlite3")])
    assert args.func(args) == 0
    engine = served["app"].state.engine
    assert (served["host"], served["port"], engine.max_batch, engine.context) == ("127.0.0.1", 9001, 3, 256)
    assert TestClient(served["app"]).get("/v1/models").json()["data"][0]["id"] == "mine"
    assert (tmp_path / "responses.sqlite3").exists()
    with pytest.raises(GptossError, match="at least one slot"):
        args.func(parser.parse_args(["serve", "--model", str(checkpoint), "--max-batch", "0"]))
