"""The nano model on held-out conversations, through `gptoss chat`'s code path and through `gptoss serve` with
the official `openai` client. The figures of docs/nano.md.

    python benchmarks/nano_eval.py --threads 2 --json docs/nano_eval.json

Held out: `gptoss.nano.tasks` draws these conversations from the evaluation split, which training never
sees (`tasks.is_held_out`), from a seed of their own.

Chat path: the conversation as `gptoss chat` builds it, rendered by harmony, generated greedily through the
KV cache (`stream_batch`, which `chat`'s `stream` calls with one prompt; here several prompts share a
batch, each computing exactly what it would alone), parsed by the streaming harmony parser. Arithmetic is
right when the final message is exactly the number. The weather and JSON tasks run here too, unconstrained.

Serve: `gptoss serve` started on the default model, asked through `openai.OpenAI().chat.completions`:
with the weather tool offered, the reply must be a `get_weather` call with valid JSON arguments naming the
city; the tool's answer is sent back, and the final answer must hold the temperature. With a JSON schema as
`response_format`, the answer must parse as JSON (and, counted apart, fit the schema's fields exactly).
`gptoss serve` always decodes tool calls and JSON answers under a grammar, so both run twice: as served,
and with the grammar off (the same server command in a Python that first replaces
`OutputRules.constrained` by False), which is what the model writes by itself.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import re
import socket
import subprocess
import sys
import time

import torch

from gptoss.chat.harmony import parse_completion, render_for_completion, stop_tokens
from gptoss.generation.cache import KVCache
from gptoss.generation.generate import stream_batch
from gptoss.nano import tasks
from gptoss.weights.checkpoint import load_model
from gptoss.weights.hub import resolve_model

EVAL_SEED = 20_000  # training draws from seed 0 and the training split


def held_out(kind: str, count: int) -> list[tasks.Conversation]:
    rng = random.Random(f"{EVAL_SEED} {kind}")
    make = {"weather": lambda: tasks.weather(rng, held_out=True), "json": lambda: tasks.json_answer(rng, True)}
    if kind in make:
        return [make[kind]() for _ in range(count)]
    digits, op = int(kind[0]), kind.split()[1]
    return [tasks.arithmetic(rng, op, digits, held_out=True) for _ in range(count)]


# ---- Through gptoss chat's code path --------------------------------------------------------------

def complete(model, prompts: list[list[int]], max_tokens: int, batch: int = 16) -> list[list]:
    """The parsed completions of `prompts`, greedy, through one KV cache."""
    cache = KVCache.for_tokens(model.config, max(map(len, prompts)) + max_tokens, batch, dtype=model.dtype)
    parsed = []
    for start in range(0, len(prompts), batch):
        group = prompts[start:start + batch]
        generated = [[] for _ in group]
        for step in stream_batch(model, group, max_tokens, stop_tokens=stop_tokens(), cache=cache):
            for row, token in enumerate(step):
                if token is not None:
                    generated[row].append(token)
        parsed += [parse_completion(tokens) for tokens in generated]
    return parsed


def final_text(messages) -> str | None:
    finals = [m.text for m in messages if m.channel == "final" and not m.recipient]
    return finals[-1].strip() if finals else None


def chat_path(model, count: int) -> dict:
    results = {}
    for kind in ("1-digit +", "2-digit +", "2-digit -", "3-digit +", "3-digit -", "2-digit *"):
        conversations = held_out(kind, count)
        answers = [final_text(m) for m in complete(model, [render_for_completion(c.chat) for c in conversations],
                                                   400 if "*" in kind else 200)]
        right = sum(a == str(c.expected["answer"]) for a, c in zip(answers, conversations))
        wrong = [(c.expected["question"], a) for a, c in zip(answers, conversations) if a != str(c.expected["answer"])]
        results[kind] = {"right": right, "of": count, "examples_wrong": wrong[:5]}
        print(f"chat path, {kind}: {right}/{count} exact", flush=True)

    conversations = held_out("weather", count)
    calls = complete(model, [render_for_completion(c.chat) for c in conversations], 40)
    valid = sum(calls_city(m) == c.expected["city"] for m, c in zip(calls, conversations))
    results["weather call (unconstrained)"] = {"right": valid, "of": count}
    print(f"chat path, weather: {valid}/{count} calls get_weather with valid JSON naming the city", flush=True)

    conversations = held_out("json", count)
    answers = [final_text(m) for m in complete(model, [render_for_completion(c.chat) for c in conversations], 200)]
    results["json (unconstrained)"] = json_scores(answers, conversations)
    print(f"chat path, JSON: {results['json (unconstrained)']}", flush=True)
    return results


def calls_city(messages) -> str | None:
    """The city of a well-formed get_weather call among `messages`, else None."""
    for m in messages:
        if m.recipient == tasks.WEATHER_TOOL.recipient:
            try:
                return json.loads(m.text).get("city")
            except (json.JSONDecodeError, AttributeError):
                return None
    return None


def json_scores(answers: list[str | None], conversations: list[tasks.Conversation]) -> dict:
    valid = exact = 0
    for answer, c in zip(answers, conversations):
        try:
            value = json.loads(answer or "")
        except json.JSONDecodeError:
            continue
        valid += 1
        exact += value == c.expected["json"]
    return {"valid_json": valid, "exact": exact, "of": len(conversations)}


# ---- Through gptoss serve and the openai client ---------------------------------------------------

UNCONSTRAINED = ("from gptoss.chat.grammar import OutputRules; OutputRules.constrained = property(lambda self: False); "
                 "import sys; from gptoss.cli.main import main; sys.exit(main(sys.argv[1:]))")


def start_server(model: str | None, threads: int, constrained: bool) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = ["-m", "gptoss.cli.main"] if constrained else ["-c", UNCONSTRAINED]
    args = ["serve", "--port", str(port), "--threads", str(threads), "--max-batch", "8"]
    server = subprocess.Popen([sys.executable, *command, *args, *(["--model", model] if model else [])])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, url + "/v1"
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"gptoss serve exited with {server.returncode}")
            time.sleep(0.5)
    server.kill()
    raise SystemExit("gptoss serve did not start")


def weather_round_trip(client, model: str, c: tasks.Conversation) -> tuple[bool, bool]:
    """(the model called get_weather with valid arguments naming the city, its final answer then held the
    temperature the tool returned)."""
    tool = tasks.WEATHER_TOOL
    offered = [{"type": "function", "function": {"name": tool.name, "description": tool.description,
                                                 "parameters": tool.parameters}}]
    messages = [{"role": "user", "content": c.chat.turns[-1].content[0].text}]
    first = client.chat.completions.create(model=model, messages=messages, tools=offered, temperature=0,
                                           max_tokens=60).choices[0].message
    if not first.tool_calls or first.tool_calls[0].function.name != tool.name:
        return False, False
    call = first.tool_calls[0]
    try:
        called_right = json.loads(call.function.arguments).get("city") == c.expected["city"]
    except (json.JSONDecodeError, AttributeError):
        return False, False
    city, temperature, conditions = c.expected["city"], c.expected["temperature"], c.expected["conditions"]
    messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id,
                  "content": json.dumps({"city": city, "temperature_c": temperature, "conditions": conditions})}]
    answer = client.chat.completions.create(model=model, messages=messages, tools=offered, temperature=0,
                                            max_tokens=60).choices[0].message.content or ""
    return called_right, re.search(rf"(?<![\d-]){temperature}(?!\d)", answer) is not None


def json_answer(client, model: str, c: tasks.Conversation) -> str | None:
    schema = c.chat.response_format
    messages = [{"role": "user", "content": c.chat.turns[-1].content[0].text}]
    return client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": schema.name, "schema": schema.schema}},
    ).choices[0].message.content


def serve_path(model_dir: str | None, threads: int, count: int, constrained: bool) -> dict:
    import openai

    server, url = start_server(model_dir, threads, constrained)
    label = "constrained (as served)" if constrained else "grammar off"
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            trips = list(pool.map(lambda c: weather_round_trip(client, model, c), held_out("weather", count)))
            conversations = held_out("json", count)
            answers = list(pool.map(lambda c: json_answer(client, model, c), conversations))
    finally:
        server.terminate()
        server.wait(60)
    both = sum(called and answered for called, answered in trips)
    result = {"weather_called_right": sum(called for called, _ in trips), "weather_call_and_temperature": both,
              "json": json_scores(answers, conversations), "of": count}
    print(f"serve, {label}: weather tool called right {result['weather_called_right']}/{count}, then the "
          f"temperature in the answer {both}/{count}; JSON {result['json']}", flush=True)
    return result


def table(results: dict) -> str:
    """The figures as the markdown table of docs/nano.md."""
    def pct(right: int, of: int) -> str:
        return f"{right}/{of} ({100 * right / of:.0f}%)"

    names = {"+": "addition", "-": "subtraction", "*": "multiplication"}
    rows = [(f"{kind.split()[0]} {names[kind.split()[1]]}, final answer exact", "chat", pct(r["right"], r["of"]))
            for kind, r in results["chat"].items() if "digit" in kind]
    weather, answers = results["chat"]["weather call (unconstrained)"], results["chat"]["json (unconstrained)"]
    rows += [("weather: get_weather called, valid JSON naming the city", "chat", pct(weather["right"], weather["of"])),
             ("JSON schema: valid JSON / exactly right", "chat",
              f"{pct(answers['valid_json'], answers['of'])} / {pct(answers['exact'], answers['of'])}")]
    for label, r in (("as served (grammar on)", results["serve"]["constrained"]),
                     ("grammar off", results["serve"]["grammar_off"])):
        rows += [("weather: called right, then the temperature in the answer", f"serve, {label}",
                  f"{pct(r['weather_called_right'], r['of'])}, then {pct(r['weather_call_and_temperature'], r['of'])}"),
                 ("JSON schema: valid JSON / exactly right", f"serve, {label}",
                  f"{pct(r['json']['valid_json'], r['of'])} / {pct(r['json']['exact'], r['of'])}")]
    return "\n".join(["| task (held-out) | path | result |", "|---|---|---:|"]
                     + [f"| {task} | {path} | {result} |" for task, path, result in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: the embedded nano model)")
    parser.add_argument("--count", type=int, default=100, help="held-out conversations per task (default 100)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = load_model(resolve_model(args.model))
    results = {"chat": chat_path(model, args.count)}
    del model
    results["serve"] = {"constrained": serve_path(args.model, args.threads, args.count, True),
                        "grammar_off": serve_path(args.model, args.threads, args.count, False)}
    results["seconds"] = round(time.perf_counter() - started)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
