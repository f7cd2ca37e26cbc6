"""The Responses tool surface a coding agent sends, and gpt-oss's own tools run by the server.

A tiny random-weight model (fp32) behind the real server, driven by the official `openai` client. A
random model never calls a tool by itself, so the tool calls are forced (`forced_tokens`: the engine
samples given tokens; the model still runs, and every forced token must pass the request's grammar, so
the calls also test the output rules). What the server renders from a request is checked against
harmony's own rendering of the same conversation, through `usage.input_tokens` and the greedy answer.
"""

from __future__ import annotations

import json
import re

import openai
import pytest

from gptoss.chat.grammar import OutputRules
from gptoss.chat.harmony import Chat, FunctionTool, TextInput, parse_completion, render_for_completion, stop_tokens
from gptoss.generation.generate import generate
from gptoss.server import Engine, create_app
from gptoss.server.hosted import HostedTools
from gptoss.tools.browser import Browser, LocalBackend
from gptoss.tools.builtin import PYTHON_TOOL, browser_functions, python_config
from gptoss.tools.python_sandbox import PythonSessions, SandboxLimits, sandbox_unavailable
from openai_harmony import ToolNamespaceConfig
from tests.conftest import running_server

MODEL = "tiny-random"
PATCH_GRAMMAR = 'start: "*** Begin Patch\\n" LINE* "*** End Patch"\nLINE: /[^*\\n][^\\n]*\\n/\n'
SHELL = {"type": "function", "name": "shell", "description": "Runs a shell command",
         "parameters": {"type": "object", "properties": {"command": {"type": "array", "items": {"type": "string"}}},
                        "required": ["command"]}, "strict": False}
APPLY_PATCH = {"type": "custom", "name": "apply_patch", "description": "Edits files with a patch",
               "format": {"type": "grammar", "syntax": "lark", "definition": PATCH_GRAMMAR}}
LOOKUP = {"type": "function", "name": "lookup", "description": "Looks a topic up in the project docs",
          "parameters": {"type": "object", "properties": {"topic": {"type": "string"}}, "required": ["topic"]}}
DOCS_NAMESPACE = {"type": "namespace", "name": "mcp__docs", "description": "The project's documentation server",
                  "tools": [LOOKUP]}
WEB_SEARCH = {"type": "web_search", "external_web_access": False}
INSTRUCTIONS = "You are a coding agent. Be brief."
USER = "How do tides work? Check the docs."

# What a coding agent (Codex-like) sends: its tools, a namespace of MCP functions, a hosted web search,
# and its bookkeeping fields.
AGENT_REQUEST = dict(model=MODEL, instructions=INSTRUCTIONS, tools=[SHELL, APPLY_PATCH, DOCS_NAMESPACE, WEB_SEARCH],
                     tool_choice="auto", parallel_tool_calls=True, reasoning={"effort": "low", "summary": "auto"},
                     include=["reasoning.encrypted_content"], store=False, prompt_cache_key="session-1",
                     temperature=0, extra_body={"client_metadata": {"originator": "codex_cli_rs"}})
AGENT_INPUT = [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Sandbox: none."}]},
               {"type": "message", "role": "user", "content": [{"type": "input_text", "text": USER}]}]
THINK = "<|channel|>analysis<|message|>Look it up.<|end|><|start|>assistant"
LOOKUP_CALL = '<|channel|>commentary to=mcp__docs.lookup <|constrain|>json<|message|>{"topic": "tides"}<|call|>'

PAGES = {
    "tides.html": "<html><head><title>Tides</title></head><body><h1>Tides</h1><p>Tides are the rise and fall of the "
                  "sea.</p><p>The moon's gravity pulls the oceans.</p><p>See also <a href='moon.md'>the moon</a>.</p>"
                  "</body></html>",
    "moon.md": "# The Moon\n\nThe moon orbits the earth every 27 days.\n\nIts gravity raises the tides.\n",
    "bread.md": "# Bread\n\nFlour, water, salt and yeast.\n",
}


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pages")
    for name, text in PAGES.items():
        (folder / name).write_text(text)
    return folder


@pytest.fixture(scope="module")
def server(tiny_random_model, pages):
    if why := sandbox_unavailable():
        pytest.skip(f"the python sandbox cannot run here: {why}")
    hosted = HostedTools(LocalBackend(pages), PythonSessions(SandboxLimits(timeout_s=10)))
    engine = Engine(tiny_random_model, max_batch=4, context=4096)
    with running_server(create_app(engine, MODEL, hosted=hosted)) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def agent_chat(*, browser: bool = True) -> Chat:
    """The harmony conversation AGENT_REQUEST with AGENT_INPUT renders to."""
    tools = [FunctionTool("shell", SHELL["description"], SHELL["parameters"]),
             FunctionTool("apply_patch", APPLY_PATCH["description"], text_input=TextInput("lark", PATCH_GRAMMAR)),
             FunctionTool("lookup", LOOKUP["description"], LOOKUP["parameters"], namespace="mcp__docs")]
    return Chat(reasoning_effort="low", developer_instructions=f"{INSTRUCTIONS}\n\nSandbox: none.",
                tools=tools + list(browser_functions() if browser else ()),
                namespace_descriptions={"mcp__docs": DOCS_NAMESPACE["description"]},
                builtin_tools=[ToolNamespaceConfig.browser()] if browser else []).user(USER)


def greedy(model, chat: Chat, max_tokens: int):
    """The prompt and the greedy completion's messages, under the output rules the server applies."""
    prompt = render_for_completion(chat)
    rules = OutputRules(tools=tuple(chat.tools) + tuple(browser_functions()))
    return prompt, parse_completion(generate(model, prompt, max_tokens, stop_tokens=stop_tokens(), rules=rules))


def check_event_order(events) -> None:
    """Sequence numbers count up from 0; response.created and in_progress come first and the terminal
    event last; each output item is added before any event about it and done after all of them."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1].type in ("response.completed", "response.incomplete")
    state = {}
    for e in events[2:-1]:
        index = e.output_index
        if e.type == "response.output_item.added":
            assert state.get(index) in (None, "added"), f"item {index} added twice"  # web_search: added when shown
            state[index] = "added"
        elif e.type == "response.output_item.done":
            assert state.get(index) == "added"
            state[index] = "done"
        else:
            assert state.get(index) == "added", f"{e.type} outside item {index}"
    assert set(state.values()) == {"done"}


def test_a_coding_agents_request_is_served_and_its_second_turn_sends_everything_back(client, tiny_random_model,
                                                                                     forced_tokens):
    forced_tokens(THINK, LOOKUP_CALL)
    r = client.responses.create(**AGENT_REQUEST, input=AGENT_INPUT)
    assert r.status == "completed" and not getattr(r, "warnings", None)
    reasoning, call = r.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "Look it up."
    assert reasoning.summary[0].text == "Look it up." and reasoning.encrypted_content
    assert (call.type, call.name, call.namespace, json.loads(call.arguments)) == (
        "function_call", "lookup", "mcp__docs", {"topic": "tides"})
    prompt, _ = greedy(tiny_random_model, agent_chat(), 1)
    assert r.usage.input_tokens == len(prompt)  # the request renders exactly as harmony renders the same chat

    forced_tokens(THINK, LOOKUP_CALL)
    events = list(client.responses.create(**AGENT_REQUEST, input=AGENT_INPUT, stream=True))
    check_event_order(events)
    types = [e.type for e in events]
    assert types.index("response.reasoning_summary_text.delta") < types.index("response.reasoning_text.done")
    assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == call.arguments
    streamed = events[-1].response.output
    assert [item.type for item in streamed] == ["reasoning", "function_call"] and streamed[1].namespace == "mcp__docs"

    # Turn 2, as a client that stores nothing sends it: the reasoning only as its encrypted_content, the call,
    # and the call's output. It renders as the same conversation with the call and its result in it.
    sent_back = {"type": "reasoning", "id": reasoning.id, "summary": [s.model_dump() for s in reasoning.summary],
                 "encrypted_content": reasoning.encrypted_content}
    second = AGENT_INPUT + [sent_back, call.model_dump(exclude_none=True),
                            {"type": "function_call_output", "call_id": call.call_id, "output": "Tides follow the moon."}]
    chat = (agent_chat().assistant("Look it up.", "analysis").tool_call("lookup", call.arguments, namespace="mcp__docs")
            .tool_result("lookup", "Tides follow the moon.", namespace="mcp__docs"))
    prompt, messages = greedy(tiny_random_model, chat, 12)
    r2 = client.responses.create(**AGENT_REQUEST, input=second, max_output_tokens=12)
    assert r2.usage.input_tokens == len(prompt)
    assert r2.usage.input_tokens_details.cached_tokens > 0  # turn 1's prompt came from the cache
    assert r2.output_text == "".join(m.text for m in messages if m.channel == "final" and m.recipient is None)

    bad = dict(sent_back, encrypted_content="not ours")
    with pytest.raises(openai.BadRequestError, match="encrypted_content"):
        client.responses.create(**AGENT_REQUEST, input=AGENT_INPUT + [bad])


def test_the_browser_searches_opens_and_cites_the_local_pages(client, pages, forced_tokens):
    search = '<|channel|>analysis to=browser.search code<|message|>{"query": "moon tides"}<|call|>'
    open_first = '<|channel|>analysis to=browser.open code<|message|>{"id": 0}<|call|>'
    answer = "<|channel|>final<|message|>The moon pulls the sea 【1†L1-L2】.<|return|>"
    forced_tokens(search, open_first, answer)
    r = client.responses.create(model=MODEL, input="How do tides work?", tools=[WEB_SEARCH], temperature=0,
                                include=["web_search_call.action.sources"])
    searched, opened, message = r.output
    assert (searched.type, searched.status, searched.action.type, searched.action.query) == (
        "web_search_call", "completed", "search", "moon tides")
    assert searched.action.sources and opened.action.type == "open_page"

    # The same calls on a browser of our own show what the model was shown, and the cited lines.
    browser = Browser(LocalBackend(pages))
    results = browser.call("search", '{"query": "moon tides"}')
    shown = browser.call("open", '{"id": 0}')
    assert results.startswith("[0]") and shown.startswith("[1]")
    assert opened.action.url == browser.last_action["url"] and opened.action.url == searched.action.sources[0].url
    (annotation,) = message.content[0].annotations
    assert annotation.type == "url_citation" and annotation.url == opened.action.url
    text = message.content[0].text
    assert "【" not in text and text.startswith("The moon pulls the sea")
    assert 0 <= annotation.start_index < annotation.end_index <= len(text)
    assert browser.cited_lines(1, 1, 2) and all(line in shown for line in browser.cited_lines(1, 1, 2).splitlines())
    # Each completion after a tool's answer starts from the last prompt, its completion and the answer.
    assert r.usage.input_tokens_details.cached_tokens > 0


def test_python_keeps_state_within_a_conversation_and_streams_its_code(client, forced_tokens):
    run = "<|channel|>analysis to=python code<|message|>x = 6 * 7\nprint(x)<|call|>"
    forced_tokens(run, "<|channel|>final<|message|>42<|return|>")
    kwargs = dict(model=MODEL, tools=[{"type": "code_interpreter", "container": {"type": "auto"}}], temperature=0,
                  include=["code_interpreter_call.outputs"], prompt_cache_key="python-conversation")
    events = list(client.responses.create(**kwargs, input="Compute 6 * 7.", stream=True))
    check_event_order(events)
    types = [e.type for e in events]
    steps = ["response.code_interpreter_call.in_progress", "response.code_interpreter_call_code.delta",
             "response.code_interpreter_call_code.done", "response.code_interpreter_call.interpreting",
             "response.code_interpreter_call.completed"]
    assert [types.index(step) for step in steps] == sorted(types.index(step) for step in steps)
    code_call, message = events[-1].response.output
    assert code_call.code == "x = 6 * 7\nprint(x)" and code_call.outputs[0].logs.strip() == "42"
    assert message.content[0].text == "42"

    # The next request of the same conversation (prompt_cache_key) finds x; another conversation does not.
    forced_tokens("<|channel|>analysis to=python code<|message|>print(x + 1)<|call|>",
                  "<|channel|>final<|message|>ok<|return|>")
    r = client.responses.create(**kwargs, input="And plus one?")
    assert r.output[0].outputs[0].logs.strip() == "43"
    forced_tokens("<|channel|>analysis to=python code<|message|>print(x + 1)<|call|>",
                  "<|channel|>final<|message|>ok<|return|>")
    r = client.responses.create(**dict(kwargs, prompt_cache_key="another"), input="And plus one?")
    assert "NameError" in r.output[0].outputs[0].logs


def test_max_tool_calls_stops_running_tools(client, forced_tokens):
    run = "<|channel|>analysis to=python code<|message|>print(1)<|call|>"
    forced_tokens(run, run, "<|channel|>final<|message|>done<|return|>")
    r = client.responses.create(model=MODEL, input="Run it twice.", tools=[{"type": "code_interpreter"}],
                                include=["code_interpreter_call.outputs"], max_tool_calls=1, temperature=0)
    first, second, _ = r.output
    assert first.outputs[0].logs.strip() == "1" and "at most 1" in second.outputs[0].logs


def test_hosted_tools_the_server_does_not_run_are_not_offered_and_a_warning_says_so(tiny_random_model, forced_tokens):
    engine = Engine(tiny_random_model, max_batch=2, context=2048)
    with running_server(create_app(engine, MODEL)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        r = client.responses.create(model=MODEL, input="Hi", tools=[WEB_SEARCH, {"type": "code_interpreter"}],
                                    max_output_tokens=2, temperature=0)
    warnings = r.model_extra["warnings"]
    assert len(warnings) == 2 and "--browser-backend" in warnings[0] and "--python-tool" in warnings[1]
    assert r.usage.input_tokens == len(render_for_completion(Chat().user("Hi")))  # no tool in the prompt


def test_external_web_access_false_keeps_a_web_backend_out(tiny_random_model):
    class WebBackend(LocalBackend):
        name, external = "exa", True

    hosted = HostedTools(WebBackend("."))
    engine = Engine(tiny_random_model, max_batch=2, context=2048)
    with running_server(create_app(engine, MODEL, hosted=hosted)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        r = client.responses.create(model=MODEL, input="Hi", tools=[WEB_SEARCH], max_output_tokens=2, temperature=0)
        assert "external_web_access" in r.model_extra["warnings"][0]
        r = client.responses.create(model=MODEL, input="Hi", tools=[{"type": "web_search"}], max_output_tokens=2,
                                    temperature=0)
        assert "warnings" not in r.model_extra


@pytest.mark.parametrize("tool", [{"type": "mcp", "server_label": "x", "server_url": "http://x"},
                                  {"type": "file_search", "vector_store_ids": ["vs"]},
                                  {"type": "image_generation"}, {"type": "computer_use_preview"}])
def test_tool_types_the_server_cannot_serve_are_refused_by_name(client, tool):
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=MODEL, input="Hi", tools=[tool])
    error = refused.value.body
    assert error["param"] == "tools.0.type" and repr(tool["type"]) in error["message"]


def test_custom_tools_follow_their_grammar_in_both_apis(client, tiny_random_model, forced_tokens):
    calc = {"name": "calc", "description": "Evaluates a sum",
            "format": {"type": "grammar", "syntax": "regex", "definition": r"[0-9]{1,3}(\+[0-9]{1,3}){0,2}"}}
    # Unforced: the random model writes whatever the grammar allows, and the grammar ends the input.
    r = client.responses.create(model=MODEL, input="Add 2 and 3.", tools=[{"type": "custom", **calc}],
                                tool_choice={"type": "custom", "name": "calc"}, max_output_tokens=400, temperature=0)
    (call,) = [item for item in r.output if item.type == "custom_tool_call"]
    assert call.name == "calc" and re.fullmatch(calc["format"]["definition"], call.input)

    chat_tool = {"type": "custom", "custom": {"name": "apply_patch", "description": "Edits files",
                                              "format": {"type": "grammar", "grammar": {"syntax": "lark",
                                                                                        "definition": PATCH_GRAMMAR}}}}
    patch = "*** Begin Patch\nadd a line\n*** End Patch"
    forced_tokens(f"<|channel|>commentary to=functions.apply_patch<|message|>{patch}<|call|>")
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Patch it."}],
                                       tools=[chat_tool], temperature=0)
    (tool_call,) = r.choices[0].message.tool_calls
    assert (tool_call.type, tool_call.custom.name, tool_call.custom.input) == ("custom", "apply_patch", patch)
    assert r.choices[0].finish_reason == "tool_calls"
    history = [{"role": "user", "content": "Patch it."}, r.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": tool_call.id, "content": "Done."}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=[chat_tool], max_tokens=4, temperature=0)
    tool = FunctionTool("apply_patch", "Edits files", text_input=TextInput("lark", PATCH_GRAMMAR))
    chat = Chat(tools=[tool]).user("Patch it.").tool_call("apply_patch", patch, text_input=True).tool_result(
        "apply_patch", "Done.")
    assert r.usage.prompt_tokens == len(render_for_completion(chat))


def test_the_python_tool_is_described_with_this_sandbox_s_limits():
    text = python_config(7).description
    assert "7 seconds" in text and "Internet access for this session is disabled." in text and "/mnt/data" not in text
    assert PYTHON_TOOL.recipient == "python" and [t.recipient for t in browser_functions()] == [
        "browser.search", "browser.open", "browser.find"]


def test_openai_agents_hosted_tools_run_on_the_server(server, forced_tokens):
    """OpenAI's Agents SDK with its hosted WebSearchTool and CodeInterpreterTool: the server runs both and
    the agent gets their calls and the answer in one response."""
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
    agent = agents.Agent(name="researcher", instructions="Be brief.",
                         model=agents.OpenAIResponsesModel(MODEL, client),
                         model_settings=agents.ModelSettings(temperature=0, max_tokens=400),
                         tools=[agents.WebSearchTool(),
                                agents.CodeInterpreterTool(tool_config={"type": "code_interpreter",
                                                                        "container": {"type": "auto"}})])
    forced_tokens('<|channel|>analysis to=browser.search code<|message|>{"query": "tides"}<|call|>',
                  "<|channel|>analysis to=python code<|message|>print(2 + 2)<|call|>",
                  "<|channel|>final<|message|>Four, and tides follow the moon.<|return|>")
    result = agents.Runner.run_sync(agent, "Tides? And 2 + 2?")
    assert result.final_output == "Four, and tides follow the moon."
    calls = [item.raw_item.type for item in result.new_items if item.type == "tool_call_item"]
    assert calls == ["web_search_call", "code_interpreter_call"]


def test_the_rounds_after_a_tool_s_answer_keep_logprobs_and_may_answer(client, forced_tokens):
    """Log-probabilities across rounds (each round's own), and a forced tool_choice applies to the first
    completion only: after python has answered, the model may answer (the forced final passes the grammar)."""
    forced_tokens("<|channel|>analysis to=python code<|message|>print(5)<|call|>",
                  "<|channel|>final<|message|>five<|return|>")
    r = client.responses.create(model=MODEL, input="Five?", tools=[{"type": "code_interpreter"}], temperature=0,
                                tool_choice={"type": "code_interpreter"},
                                include=["message.output_text.logprobs", "code_interpreter_call.outputs"])
    code_call, message = r.output
    assert code_call.status == "completed" and code_call.outputs[0].logs.strip() == "5"
    assert message.content[0].text == "five" and message.content[0].logprobs


def test_a_call_cut_off_by_the_budget_is_not_run(client, forced_tokens):
    forced_tokens("<|channel|>analysis to=python code<|message|>print('RAN')\nprint('never')<|call|>")
    r = client.responses.create(model=MODEL, input="Run it.", tools=[{"type": "code_interpreter"}], temperature=0,
                                include=["code_interpreter_call.outputs"], max_output_tokens=14)
    (code_call,) = r.output
    assert r.status == "incomplete" and code_call.status == "incomplete" and code_call.outputs is None


def test_a_refused_browser_call_is_failed_not_completed(client, forced_tokens):
    search = '<|channel|>analysis to=browser.search code<|message|>{{"query": "{}"}}<|call|>'
    forced_tokens(search.format("tides"), search.format("bread"), "<|channel|>final<|message|>ok<|return|>")
    r = client.responses.create(model=MODEL, input="Search twice.", tools=[WEB_SEARCH], max_tool_calls=1,
                                temperature=0)
    first, second, _ = r.output
    assert (first.status, first.action.query) == ("completed", "tides")
    assert (second.status, second.action.query) == ("failed", "bread")


@pytest.mark.parametrize("tools", [[dict(SHELL, name="run shell")], [{"type": "custom", "name": 'say"hi'}],
                                   [dict(DOCS_NAMESPACE, name="browser")]])
def test_tool_names_outside_openai_s_rule_are_refused(client, tools):
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, input="Hi", tools=tools)
