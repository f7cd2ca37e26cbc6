"""The synthetic tasks the nano model learns, as harmony conversations rendered exactly as `gptoss chat` and
`gptoss serve` render their prompts.

Four tasks, each drawn from a seeded generator:
- arithmetic: integers of up to 3 digits added, subtracted or multiplied. o200k reads a number of up to 3
  digits as one opaque token, so the reasoning (analysis channel) first spells each number digit by digit
  and then works column by column, carrying or borrowing ("7+8=15, write 5 carry 1."): a small model can
  learn that algorithm, not a table of a million sums. The final channel holds the plain number.
- the weather tool: the developer message offers `get_weather` (and sometimes the calculator); the model
  calls it on the commentary channel with JSON arguments, reads the tool's answer and replies with it.
- the calculator tool: asked to use it, the model calls `calculator` with the expression and repeats the
  result.
- JSON answers: the developer message asks for a JSON schema ("# Response Formats", as `serve` puts a
  request's response_format); the model fills its fields from the user's text or from a sum it works out.
Plus plain English prose (Python's own documentation, as `gptoss study` uses) for raw `generate`.

Held out: every conversation is keyed by what makes it unique (the operands, the city and phrasing, ...).
A key belongs to the evaluation split when its hash says so (`is_held_out`), and the training generator
draws again whenever it lands on one, so training never sees an evaluation conversation.
"""

from __future__ import annotations

import copy
import json
import random
import zlib
from dataclasses import dataclass

from openai_harmony import Message

from gptoss.chat.harmony import Chat, FunctionTool, ResponseFormat, get_encoding, render_for_completion
from gptoss.chat.tokenizer import HARMONY_SPECIAL_TOKENS

RETURN = HARMONY_SPECIAL_TOKENS["<|return|>"]
END = HARMONY_SPECIAL_TOKENS["<|end|>"]
HELD_OUT_PERCENT = 5  # of the keys of every task

WEATHER_TOOL = FunctionTool(
    "get_weather", "Gets the current weather in a city.",
    {"type": "object", "properties": {"city": {"type": "string", "description": "The city, e.g. Paris"}},
     "required": ["city"]})
CALCULATOR_TOOL = FunctionTool(
    "calculator", "Evaluates an arithmetic expression with + - and *.",
    {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]})

CITIES = ("Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Lisbon", "Vienna", "Prague", "Warsaw", "Oslo",
          "Stockholm", "Helsinki", "Dublin", "Athens", "Cairo", "Nairobi", "Lagos", "Mumbai", "Delhi", "Beijing",
          "Shanghai", "Seoul", "Bangkok", "Jakarta", "Sydney", "Melbourne", "Auckland", "Toronto", "Montreal",
          "Vancouver", "Chicago", "Boston", "Seattle", "Denver", "Miami", "Houston", "Mexico City", "Lima",
          "Bogota", "Santiago", "Buenos Aires", "Istanbul", "Moscow", "Kyiv", "Zurich", "Amsterdam", "Brussels",
          "Copenhagen", "Budapest", "Singapore", "Manila", "Hanoi", "Dubai", "Tehran", "Karachi", "Casablanca",
          "Accra", "Havana", "Reykjavik")
CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "foggy", "snowy", "clear", "stormy")
WEATHER_QUESTIONS = ("What is the weather in {city}?", "What's the weather like in {city} today?",
                     "How warm is it in {city} right now?", "Is it cold in {city}?",
                     "Tell me the current weather in {city}.", "What's the temperature in {city}?",
                     "Should I take a coat in {city} today?", "weather {city}")
ARITHMETIC_QUESTIONS = ("What is {a} {op} {b}?", "What is {a}{op}{b}?", "Compute {a} {op} {b}.",
                        "{a} {op} {b} = ?", "Calculate {a}{op}{b}", "How much is {a} {op} {b}?")
CALCULATOR_QUESTIONS = ("Use the calculator to compute {a} {op} {b}.", "Please use the calculator: {a}{op}{b}",
                        "With the calculator tool, what is {a} {op} {b}?")
PEOPLE = ("Alice", "Bob", "Carol", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kofi", "Lena",
          "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wei", "Yusuf", "Zoe")
REASONING_EFFORTS = ("low", "medium", "high")


@dataclass(frozen=True)
class Conversation:
    """One rendered conversation: its tokens, which of them the model is trained to write, and what a
    correct answer holds (for the evaluation)."""

    task: str
    key: str             # what makes it unique; `is_held_out(key)` tells its split
    tokens: list[int]
    trained: list[bool]  # True for the tokens the assistant writes
    chat: Chat           # the conversation up to the first assistant turn, as chat and serve would build it
    expected: dict       # e.g. {"answer": 935} or {"city": "Paris", "temperature": 18}


def is_held_out(key: str) -> bool:
    return zlib.crc32(key.encode()) % 100 < HELD_OUT_PERCENT


# ---- Arithmetic and its column-by-column reasoning ------------------------------------------------

def spelled(n: int) -> str:
    """347 -> "3 4 7": one token per digit."""
    return " ".join(str(n))


def addition_steps(a: int, b: int) -> list[str]:
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        total = x + y + carry
        terms = f"{x}+{y}" + (f"+{carry}" if carry else "")
        steps.append(f"{terms}={total}, write {total % 10} carry {total // 10}.")
        carry = total // 10
    if carry:
        steps.append(f"write the carry {carry}.")
    return steps


def subtraction_steps(a: int, b: int) -> list[str]:
    """a - b for a >= b, column by column with borrows."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, borrow = [], 0
    for i in range(len(da)):
        x, y = int(da[i]), int(db[i]) if i < len(db) else 0
        top = x - borrow
        if top < y:
            steps.append(f"{x}-{borrow}-{y} is negative: borrow, {top + 10}-{y}={top + 10 - y}, write {top + 10 - y} borrow 1.")
            borrow = 1
        else:
            steps.append(f"{x}-{borrow}-{y}={top - y}, write {top - y} borrow 0.")
            borrow = 0
    return steps


def multiplication_steps(a: int, b: int) -> list[str]:
    """a x b as partial products of a by each digit of b, then their sum column by column."""
    steps, partials = [], []
    for place, digit in enumerate(reversed(str(b))):
        partial = a * int(digit) * 10 ** place
        steps.append(f"{a}*{digit}={a * int(digit)}, shifted {place}: {spelled(partial)}.")
        partials.append(partial)
    total = partials[0]
    for partial in partials[1:]:
        steps.append(f"add {spelled(total)} and {spelled(partial)}:")
        steps += addition_steps(total, partial)
        total += partial
    return steps


def arithmetic_reasoning(a: int, op: str, b: int) -> tuple[str, int]:
    """The analysis-channel text for `a op b` and the answer."""
    head = f"{a} is {spelled(a)}. {b} is {spelled(b)}."
    if op == "+":
        answer, body = a + b, addition_steps(a, b)
    elif op == "*":
        answer, body = a * b, multiplication_steps(a, b)
    elif a >= b:
        answer, body = a - b, subtraction_steps(a, b)
    else:
        answer, body = a - b, [f"{a} is less than {b}, so compute {b}-{a} and negate."] + subtraction_steps(b, a)
    return " ".join([head] + body + [f"Digits: {spelled(abs(answer))}. Answer {answer}."]), answer


def operands(rng: random.Random, op: str, digits: int) -> tuple[int, int]:
    low = 10 ** (digits - 1) if digits > 1 else 0
    return rng.randint(low, 10 ** digits - 1), rng.randint(low, 10 ** digits - 1)


# ---- Rendering ------------------------------------------------------------------------------------

def new_chat(rng: random.Random, **fields) -> Chat:
    """A chat as `gptoss chat` and `serve` start one; the date and reasoning effort vary so that the model
    answers under any of them."""
    date = f"20{rng.randint(24, 27)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    return Chat(reasoning_effort=rng.choice(REASONING_EFFORTS), current_date=date, **fields)


def assistant_tokens(messages: list[Message]) -> list[int]:
    """The tokens the model writes after a prompt's `<|start|>assistant`: the messages as harmony renders
    them, less that first header, the last one ending in <|return|> for an answer (<|call|> for a call)."""
    encoding = get_encoding()
    tokens = [t for m in messages for t in encoding.render(m)][2:]  # drop <|start|> and "assistant"
    if tokens[-1] == END:
        tokens[-1] = RETURN
    return tokens


def render(task: str, key: str, chat: Chat, turns: list[list[Message] | Message], expected: dict) -> Conversation:
    """`chat` (the prompt so far) followed by `turns`: a list of the assistant's messages is one completion
    (trained on), a single Message is what the tool answers (not trained on)."""
    start = copy.copy(chat)
    start.turns = list(chat.turns)
    tokens, trained = [], []
    for turn in turns:
        if isinstance(turn, Message):
            chat.turns.append(turn)
            continue
        prompt = render_for_completion(chat)
        assert prompt[:len(tokens)] == tokens, "a later prompt must extend the earlier one"
        completion = assistant_tokens(turn)
        trained += [False] * (len(prompt) - len(tokens)) + [True] * len(completion)
        tokens = prompt + completion
        chat.turns.extend(turn)
    return Conversation(task, key, tokens, trained, start, expected)


# Messages made by `Chat`'s own builders, as `serve` makes them from a request.

def assistant(text: str, channel: str) -> Message:
    return Chat().assistant(text, channel).turns[0]


def call(tool: FunctionTool, arguments: dict) -> Message:
    return Chat().tool_call(tool.name, arguments).turns[0]


def tool_answer(tool: FunctionTool, output: dict) -> Message:
    return Chat().tool_result(tool.name, json.dumps(output)).turns[0]


# ---- The tasks ------------------------------------------------------------------------------------

ARITHMETIC_MIX = (("+", 2), ("-", 2), ("+", 3), ("-", 3), ("*", 2), ("+", 1), ("-", 1))


def arithmetic(rng: random.Random, op: str, digits: int, held_out: bool) -> Conversation:
    while True:
        a, b = operands(rng, op, digits)
        question, key = rng.choice(ARITHMETIC_QUESTIONS).format(a=a, op=op, b=b), f"arithmetic {a}{op}{b}"
        if is_held_out(key) == held_out:
            break
    reasoning, answer = arithmetic_reasoning(a, op, b)
    chat = new_chat(rng).user(question)
    return render(f"{digits}-digit {op}", key, chat, [[assistant(reasoning, "analysis"), assistant(str(answer), "final")]],
                  {"answer": answer, "question": question})


def weather(rng: random.Random, held_out: bool) -> Conversation:
    while True:
        city, template = rng.choice(CITIES), rng.choice(WEATHER_QUESTIONS)
        temperature, conditions = rng.randint(-15, 40), rng.choice(CONDITIONS)
        key = f"weather {city} {template} {temperature}"
        if is_held_out(key) == held_out:
            break
    tools = [WEATHER_TOOL] + ([CALCULATOR_TOOL] if rng.random() < 0.3 else [])
    chat = new_chat(rng, tools=rng.sample(tools, len(tools))).user(template.format(city=city))
    reply = rng.choice(("It is {t}°C and {c} in {city}.", "In {city} it is currently {t}°C and {c}.",
                        "The weather in {city}: {c}, {t}°C.")).format(t=temperature, c=conditions, city=city)
    return render("weather tool", key, chat, [
        [call(WEATHER_TOOL, {"city": city})],
        tool_answer(WEATHER_TOOL, {"city": city, "temperature_c": temperature, "conditions": conditions}),
        [assistant(reply, "final")],
    ], {"city": city, "temperature": temperature, "conditions": conditions})


def calculator(rng: random.Random, held_out: bool) -> Conversation:
    while True:
        op = rng.choice("+-*")
        a, b = operands(rng, op, rng.choice((2, 3)))
        key = f"calculator {a}{op}{b}"
        if is_held_out(key) == held_out:
            break
    expression, answer = f"{a}{op}{b}", {"+": a + b, "-": a - b, "*": a * b}[op]
    tools = [CALCULATOR_TOOL] + ([WEATHER_TOOL] if rng.random() < 0.5 else [])
    chat = new_chat(rng, tools=rng.sample(tools, len(tools)))
    chat.user(rng.choice(CALCULATOR_QUESTIONS).format(a=a, op=op, b=b))
    return render("calculator tool", key, chat, [
        [call(CALCULATOR_TOOL, {"expression": expression})],
        tool_answer(CALCULATOR_TOOL, {"result": answer}),
        [assistant(f"{expression} = {answer}", "final")],
    ], {"answer": answer})


def person_schema() -> ResponseFormat:
    return ResponseFormat("person", {"type": "object", "properties": {"name": {"type": "string"},
                                                                        "age": {"type": "integer"}},
                                     "required": ["name", "age"], "additionalProperties": False})


def json_answer(rng: random.Random, held_out: bool) -> Conversation:
    """An answer in the JSON schema the developer message asks for: a person's name and age taken from the
    user's sentence, a city's weather report, or a sum worked out first."""
    while True:
        kind = rng.choice(("person", "sum", "city"))
        name, age, city = rng.choice(PEOPLE), rng.randint(1, 99), rng.choice(CITIES)
        a, b = operands(rng, "+", rng.choice((1, 2)))
        key = "json " + {"person": f"person {name} {age}", "sum": f"sum {a}+{b}", "city": f"city {city} {age}"}[kind]
        if is_held_out(key) == held_out:
            break
    if kind == "person":
        answer_format, reasoning = person_schema(), None
        question = rng.choice(("{n} is {a} years old.", "Meet {n}, aged {a}.", "My friend {n} just turned {a}.",
                               "Extract the person: {n} ({a})")).format(n=name, a=age)
        answer = {"name": name, "age": age}
    elif kind == "sum":
        answer_format = ResponseFormat("sum", {"type": "object", "properties": {"result": {"type": "integer"}},
                                               "required": ["result"]})
        question = rng.choice(ARITHMETIC_QUESTIONS).format(a=a, op="+", b=b)
        reasoning, total = arithmetic_reasoning(a, "+", b)
        answer = {"result": total}
    else:
        answer_format = ResponseFormat("city_report", {"type": "object", "properties": {
            "city": {"type": "string"}, "temperature_c": {"type": "integer"}}, "required": ["city", "temperature_c"]})
        question = rng.choice(("Report: {c} is at {t} degrees.", "It is {t}°C in {c}. Format that.",
                               "{c}, {t} C")).format(c=city, t=age - 30)
        answer, reasoning = {"city": city, "temperature_c": age - 30}, None
    chat = new_chat(rng, response_format=answer_format).user(question)
    messages = ([assistant(reasoning, "analysis")] if reasoning else []) + [assistant(json.dumps(answer), "final")]
    return render(f"json {kind}", key, chat, [messages], {"json": answer, "schema": answer_format.schema})


# How often each task is drawn for training.
TASK_WEIGHTS = {"arithmetic": 0.55, "weather": 0.17, "calculator": 0.08, "json": 0.2}


def conversation(rng: random.Random, held_out: bool = False) -> Conversation:
    task = rng.choices(list(TASK_WEIGHTS), weights=list(TASK_WEIGHTS.values()))[0]
    if task == "arithmetic":
        op, digits = rng.choice(ARITHMETIC_MIX)
        return arithmetic(rng, op, digits, held_out)
    return {"weather": weather, "calculator": calculator, "json": json_answer}[task](rng, held_out)
