"""The harmony layer against openai-harmony: rendering, parsing, and recovery from malformed completions."""

from __future__ import annotations

import datetime
import random

import pytest
from openai_harmony import (Author, Conversation, DeveloperContent, Message, ReasoningEffort, Role, SystemContent,
                            ToolDescription)

from gptoss.chat import (Chat, FunctionTool, MessageEnd, MessageStart, ParsedMessage, StreamParser, TextDelta,
                         get_encoding, get_tokenizer, parse_completion, render_for_completion, stop_tokens)
from gptoss.chat.harmony import MAX_HEADER_TOKENS
from gptoss.chat.tokenizer import NUM_TEXT_TOKENS, VOCAB_FILE, VOCAB_SHA256, VocabError
from gptoss.errors import GptossError

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                  "required": ["city"]}
DATE = "2025-06-28"


def ids(text: str) -> list[int]:
    return get_tokenizer().encode(text, allowed_special="all")


def weather_chat(**settings) -> Chat:
    return Chat(current_date=DATE, developer_instructions="Answer briefly.",
                tools=[FunctionTool("get_weather", "Gets the current weather", WEATHER_SCHEMA)], **settings)


def harmony_prefix(effort: ReasoningEffort) -> list[Message]:
    """What weather_chat() builds, written directly with openai-harmony's classes."""
    system = SystemContent.new().with_reasoning_effort(effort).with_conversation_start_date(DATE)
    developer = DeveloperContent.new().with_instructions("Answer briefly.").with_function_tools(
        [ToolDescription.new("get_weather", "Gets the current weather", WEATHER_SCHEMA)])
    return [Message.from_role_and_content(Role.SYSTEM, system),
            Message.from_role_and_content(Role.DEVELOPER, developer)]


def harmony_render(messages: list[Message]) -> list[int]:
    return get_encoding().render_conversation_for_completion(Conversation.from_messages(messages), Role.ASSISTANT)


def stream(tokens: list[int]) -> tuple[list, list[ParsedMessage]]:
    """All events of feeding `tokens` one at a time, and the messages."""
    parser = StreamParser()
    events = [e for t in tokens for e in parser.feed(t)]
    events += parser.end()
    return events, parser.messages


def streamed_texts(events) -> list[str]:
    """Per message, its TextDeltas concatenated; checks MessageStart / MessageEnd bracket them."""
    texts, current = [], None
    for e in events:
        if isinstance(e, MessageStart):
            assert current is None
            current = []
        elif isinstance(e, TextDelta):
            current.append(e.text)
        else:
            assert isinstance(e, MessageEnd) and current is not None
            texts.append("".join(current))
            current = None
    assert current is None
    return texts


# --- rendering

def test_render_equals_openai_harmony():
    question = "What's the weather in Paris?"
    tokens = render_for_completion(weather_chat(reasoning_effort="high").user(question))
    expected = harmony_prefix(ReasoningEffort.HIGH) + [Message.from_role_and_content(Role.USER, question)]
    assert tokens == harmony_render(expected)
    text = get_tokenizer().decode(tokens)
    assert text.startswith("<|start|>system<|message|>") and text.endswith("<|end|><|start|>assistant")
    for piece in ["Knowledge cutoff: 2024-06", f"Current date: {DATE}", "Reasoning: high", "# Instructions",
                  "Answer briefly.", "# Tools", "namespace functions", "// Gets the current weather",
                  "type get_weather", "city: string", "<|start|>user<|message|>What's the weather in Paris?<|end|>"]:
        assert piece in text


def test_defaults_medium_effort_today_and_no_developer_message():
    text = get_tokenizer().decode(render_for_completion(Chat().user("Hi")))
    assert "Reasoning: medium" in text and f"Current date: {datetime.date.today().isoformat()}" in text
    assert "<|start|>developer" not in text
    settings = Chat(reasoning_effort="low", knowledge_cutoff="2025-01", current_date="2030-01-01").user("Hi")
    text = get_tokenizer().decode(render_for_completion(settings))
    assert "Reasoning: low" in text and "Knowledge cutoff: 2025-01" in text and "Current date: 2030-01-01" in text


def test_unknown_reasoning_effort_is_an_error():
    with pytest.raises(GptossError, match="reasoning effort"):
        Chat(reasoning_effort="extreme")


def test_corrupt_vocab_for_openai_harmony_is_a_clear_error(monkeypatch, tmp_path):
    (tmp_path / VOCAB_FILE.name).write_bytes(VOCAB_FILE.read_bytes()[:100_000])
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(tmp_path))  # a user's choice, kept since it has the file
    with pytest.raises(VocabError, match=VOCAB_SHA256) as err:
        get_encoding.__wrapped__()  # uncached
    assert str(tmp_path / VOCAB_FILE.name) in str(err.value)


def test_stop_tokens_are_return_and_call():
    assert stop_tokens() == [200002, 200012]


def test_tool_call_round_trip_renders_as_openai_harmony():
    chat = (weather_chat().user("Weather in Paris?").assistant("Need the weather tool.", channel="analysis")
            .tool_call("get_weather", {"city": "Paris"}).tool_result("get_weather", '{"temp": 20}'))
    expected = harmony_prefix(ReasoningEffort.MEDIUM) + [
        Message.from_role_and_content(Role.USER, "Weather in Paris?"),
        Message.from_role_and_content(Role.ASSISTANT, "Need the weather tool.").with_channel("analysis"),
        Message.from_role_and_content(Role.ASSISTANT, '{"city": "Paris"}').with_channel("commentary")
        .with_recipient("functions.get_weather").with_content_type("<|constrain|>json"),
        Message.from_author_and_content(Author.new(Role.TOOL, "functions.get_weather"), '{"temp": 20}')
        .with_channel("commentary").with_recipient("assistant"),
    ]
    tokens = render_for_completion(chat)
    assert tokens == harmony_render(expected)
    text = get_tokenizer().decode(tokens)
    assert ('<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>'
            '{"city": "Paris"}<|call|>') in text
    assert '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temp": 20}<|end|>' in text
    assert "Need the weather tool." in text  # chain of thought is kept during a tool loop


def test_chain_of_thought_dropped_after_final_answer():
    chat = (Chat(current_date=DATE).user("What is 2 + 2?").assistant("Simple arithmetic.", channel="analysis")
            .assistant("4").user("And 3 + 5?"))
    text = get_tokenizer().decode(render_for_completion(chat))
    assert "Simple arithmetic." not in text
    assert "<|start|>assistant<|channel|>final<|message|>4<|end|><|start|>user<|message|>And 3 + 5?" in text


def test_generated_messages_go_back_into_the_chat_as_openai_harmony_parses_them():
    completion = ids('<|channel|>analysis<|message|>Call the tool.<|end|><|start|>assistant<|channel|>commentary '
                     'to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>')
    chat = weather_chat().user("Weather in Paris?").add(parse_completion(completion))
    parsed_by_harmony = get_encoding().parse_messages_from_completion_tokens(completion, Role.ASSISTANT)
    expected = (harmony_prefix(ReasoningEffort.MEDIUM) + [Message.from_role_and_content(Role.USER, "Weather in Paris?")]
                + parsed_by_harmony)
    assert render_for_completion(chat) == harmony_render(expected)


# --- parsing well-formed completions

TOOL_CALL = ('<|channel|>analysis<|message|>User wants the weather in Paris. Use get_weather.<|end|>'
             '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
             '{"city":"Paris"}<|call|>')
ANSWER = ('<|channel|>analysis<|message|>Simple: 2+2=4. Café, 日本, 😀.<|end|>'
          '<|start|>assistant<|channel|>final<|message|>2 + 2 = 4 🎉<|return|>')


@pytest.mark.parametrize("completion, expected", [
    (TOOL_CALL, [
        ParsedMessage("assistant", "analysis", None, None, "User wants the weather in Paris. Use get_weather."),
        ParsedMessage("assistant", "commentary", "functions.get_weather", "<|constrain|>json", '{"city":"Paris"}'),
    ]),
    (ANSWER, [
        ParsedMessage("assistant", "analysis", None, None, "Simple: 2+2=4. Café, 日本, 😀."),
        ParsedMessage("assistant", "final", None, None, "2 + 2 = 4 🎉"),
    ]),
])
def test_parse_completion(completion, expected):
    tokens = ids(completion)
    assert parse_completion(tokens) == expected
    harmony = get_encoding().parse_messages_from_completion_tokens(tokens, Role.ASSISTANT)
    assert [m.to_harmony() for m in expected] == harmony

    events, messages = stream(tokens)
    assert messages == expected
    assert streamed_texts(events) == [m.text for m in expected]
    assert [e.message for e in events if isinstance(e, MessageEnd)] == expected
    starts = [e for e in events if isinstance(e, MessageStart)]
    assert [(s.channel, s.recipient, s.content_type) for s in starts] == \
        [(m.channel, m.recipient, m.content_type) for m in expected]
    for e in events:
        if isinstance(e, TextDelta):
            assert e.channel in ("analysis", "commentary", "final")
            assert (e.recipient is not None) == (e.channel == "commentary")


def test_tool_call_start_comes_before_its_arguments():
    events, _ = stream(ids(TOOL_CALL))
    start = next(i for i, e in enumerate(events) if isinstance(e, MessageStart) and e.recipient)
    assert events[start].recipient == "functions.get_weather"
    args = [e for e in events[start:] if isinstance(e, TextDelta)]
    assert {e.recipient for e in args} == {"functions.get_weather"}
    assert "".join(e.text for e in args) == '{"city":"Paris"}'


def test_message_cut_off_by_end_of_stream_is_kept():
    assert parse_completion(ids("<|channel|>final<|message|>Partial ans")) == [
        ParsedMessage("assistant", "final", None, None, "Partial ans")]
    assert parse_completion([]) == []


# --- recovery from malformed completions

@pytest.mark.parametrize("completion, expected", [
    # text after the end of a message, without <|start|>
    ("<|channel|>final<|message|>Hi<|end|>stray text<|start|>assistant<|channel|>final<|message|>Again<|return|>",
     [("final", "Hi"), ("final", "stray text"), ("final", "Again")]),
    # an empty channel name (openai/harmony#48)
    ("<|channel|><|message|>Hello<|return|>", [("final", "Hello")]),
    # extra words in a header; the broken header names the analysis channel, which the salvage keeps
    ("<|channel|>analysis one two three<|message|>secret<|end|><|start|>assistant<|channel|>final<|message|>ok",
     [("analysis", "analysis one two threesecret"), ("final", "ok")]),
    # a duplicated recipient (seen from gpt-oss in the wild)
    ("<|channel|>commentary to=functions.f to=functions.f<|message|>{}<|call|>",
     [("commentary", "commentary to=functions.f to=functions.f{}")]),
    # <|start|> twice: the first header is abandoned, the second parses
    ("<|start|><|start|>assistant<|channel|>final<|message|>Hi<|end|>", [("final", "Hi")]),
    # a stop token inside a header ends the salvaged message there
    ("<|channel|>final<|end|>more<|start|>assistant<|channel|>final<|message|>x",
     [("final", "final"), ("final", "more"), ("final", "x")]),
    # the stream ends inside a header (openai/harmony#33)
    ("<|channel|>analysis<|message|>a<|end|><|start|>assistant<|channel|>fin",
     [("analysis", "a"), ("final", "assistantfin")]),
])
def test_recovery(completion, expected):
    events, messages = stream(ids(completion))
    assert [(m.channel, m.text) for m in messages] == expected
    assert streamed_texts(events) == [m.text for m in messages]


def test_header_that_never_ends_is_streamed_as_text():
    words = " word" * (MAX_HEADER_TOKENS + 20)
    parser = StreamParser()
    events = [e for t in ids("<|channel|>final" + words) for e in parser.feed(t)]
    assert any(isinstance(e, TextDelta) for e in events)  # before the end of the stream
    assert parser.finish() == [ParsedMessage("assistant", "final", None, None, "final" + words)]


def text_token_pool() -> list[int]:
    """Text tokens that decode on their own and mean nothing to a harmony header (no '<', '=' or '|')."""
    tok = get_tokenizer()
    text = ("The quick brown fox said: use get_weather for Paris, then answer. analysis final commentary assistant "
            "user json functions. 日本語の文章と中文。Привет мир! مرحبا नमस्ते 😀 👩‍💻 42 3.14 {\"city\": [1, 2]}\n\t  x")
    return sorted({t for t in tok.encode(text)
                   if not any(c in tok.decode([t]) for c in "<=|\ufffd\u3000")})


def random_completion(rng: random.Random, pool: list[int]) -> list[int]:
    """Harmony-shaped token soup: good and broken messages, stray special tokens and text."""
    def text(n: int) -> list[int]:
        return [rng.choice(pool) for _ in range(rng.randint(1, n))]

    pieces = {
        "message": lambda: ids(f"<|start|>assistant<|channel|>{rng.choice(['analysis', 'final'])}<|message|>")
        + text(8) + [rng.choice([200007, 200002])],
        "tool call": lambda: ids("<|start|>assistant<|channel|>commentary to=functions.f <|constrain|>json<|message|>")
        + text(6) + [200012],
        "truncated header": lambda: ids(rng.choice(["<|start|>", "<|start|>assistant", "<|start|>assistant<|channel|>",
                                                    "<|channel|>", "<|channel|>final"])),
        "garbage header": lambda: [200005] + text(5) + [rng.choice([200008, 200003, 200008])] + text(3),
        "special tokens": lambda: [rng.randint(200002, 200012) for _ in range(rng.randint(1, 3))],
        "text": lambda: text(10),
    }
    tokens = ids("<|channel|>final<|message|>") if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 10)):
        tokens += pieces[rng.choice(list(pieces))]()
    if rng.random() < 0.5:  # cut it off anywhere
        tokens = tokens[:rng.randint(0, len(tokens))]
    return tokens


def test_fuzz_never_raises_and_keeps_all_text():
    tok, pool, rng = get_tokenizer(), text_token_pool(), random.Random(1234)
    for _ in range(400):
        tokens = random_completion(rng, pool)
        events, messages = stream(tokens)
        assert streamed_texts(events) == [m.text for m in messages]
        output = "\n".join(f"{m.role} {m.name} {m.channel} {m.recipient} {m.content_type} {m.text}"
                           for m in messages)
        run: list[int] = []
        for t in tokens + [200006]:  # every run of text tokens...
            if t < NUM_TEXT_TOKENS:
                run.append(t)
                continue
            for word in tok.decode(run).split():  # ...is in the output, word for word ("to=" marks a recipient)
                assert word.removeprefix("to=") in output, (tok.decode(tokens), messages)
            run = []


def test_fuzz_arbitrary_token_ids_never_raise():
    rng = random.Random(99)
    for _ in range(200):
        tokens = [rng.choice([rng.randrange(201088), rng.randint(200002, 200012)]) for _ in range(rng.randint(0, 60))]
        parse_completion(tokens)
