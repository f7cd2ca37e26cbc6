"""A soak test of `gptoss serve`: mixed traffic from many clients for a while, bounded in time, on loopback.

    python benchmarks/soak.py --minutes 20 --clients 16          # starts its own server (small random model)
    python benchmarks/soak.py --url http://127.0.0.1:8000 --minutes 5

Each client loops, each time picking one kind of request at random: chat (streamed or not), text
completion, Responses (streamed or not), a tool call (tools offered, `tool_choice` "required"), a long
prompt (~3000 tokens), a client that leaves mid-stream, and bad requests (malformed JSON, unknown fields,
a seed out of range, a lone surrogate, a token id outside the vocabulary) that must get a 4xx. Reported
at the end (and as JSON with --json): requests per kind, errors by kind (anything but the expected
answer; only the bad requests may fail, and only with their 4xx), time to first token p50 / p99 of the
streams, and the server's RSS at the start, every minute, and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time

import httpx
import openai

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"]}}}]
BAD = [  # (body as bytes or dict, endpoint)
    (b'{"model": "m", "messages": [', "chat/completions"),
    ({"messages": [{"role": "user", "content": "hi"}], "temprature": 1}, "chat/completions"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": 2**70}, "chat/completions"),
    (b'{"model": "MODEL", "messages": [{"role": "user", "content": "\\ud800"}]}', "chat/completions"),
    ({"prompt": [10**9]}, "completions"),
    ({"input": [{"type": "function_call_output", "call_id": "nope", "output": "1"}]}, "responses"),
]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


class Soak:
    def __init__(self, url: str, model: str, seconds: float):
        self.url, self.model, self.end = url, model, time.monotonic() + seconds
        self.client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        self.http = httpx.AsyncClient(base_url=f"{url}/v1", timeout=600)
        self.done, self.errors, self.ttft = collections.Counter(), collections.Counter(), []

    async def client_loop(self, seed: int) -> None:
        rng = random.Random(seed)
        kinds = [self.chat, self.chat_stream, self.completion, self.responses, self.responses_stream, self.tool_call,
                 self.long_prompt, self.leaves_mid_stream, self.bad_request]
        while time.monotonic() < self.end:
            kind = rng.choice(kinds)
            try:
                await kind(rng)
                self.done[kind.__name__] += 1
            except Exception as e:  # anything but the expected answer
                self.errors[f"{kind.__name__}: {type(e).__name__}: {str(e)[:120]}"] += 1

    def messages(self, rng: random.Random, words: int = 8) -> list[dict]:
        return [{"role": "user", "content": " ".join(rng.choice(["sky", "cache", "tell", "why", "a"]) for _ in range(words))}]

    async def chat(self, rng):
        r = await self.client.chat.completions.create(model=self.model, messages=self.messages(rng), max_tokens=24)
        assert r.usage.completion_tokens > 0

    async def chat_stream(self, rng):
        await self.timed_stream(self.client.chat.completions.create(model=self.model, messages=self.messages(rng),
                                                                    max_tokens=24, stream=True))

    async def completion(self, rng):
        r = await self.client.completions.create(model=self.model, prompt="Once upon a time", max_tokens=24,
                                                 temperature=rng.choice([0, 0.8]))
        assert r.choices[0].finish_reason in ("length", "stop")

    async def responses(self, rng):
        r = await self.client.responses.create(model=self.model, input="Say something.", max_output_tokens=24,
                                               store=rng.random() < 0.5)
        assert r.status in ("completed", "incomplete")

    async def responses_stream(self, rng):
        await self.timed_stream(self.client.responses.create(model=self.model, input="Say something.",
                                                             max_output_tokens=24, stream=True, store=False))

    async def tool_call(self, rng):
        r = await self.client.chat.completions.create(model=self.model, messages=self.messages(rng), tools=TOOLS,
                                                      tool_choice="required", max_tokens=200,
                                                      logit_bias={"200007": 40})  # random weights: end the reasoning
        assert r.choices[0].finish_reason in ("tool_calls", "length")

    async def long_prompt(self, rng):
        r = await self.client.chat.completions.create(model=self.model, messages=self.messages(rng, 3000), max_tokens=8)
        assert r.usage.prompt_tokens > 2000

    async def leaves_mid_stream(self, rng):
        async with self.http.stream("POST", "chat/completions", json={
                "model": self.model, "messages": self.messages(rng), "max_tokens": 200, "stream": True}) as r:
            lines = 0
            async for _ in r.aiter_lines():
                lines += 1
                if lines > 4:
                    break  # closing the stream here drops the connection

    async def bad_request(self, rng):
        body, endpoint = rng.choice(BAD)
        if isinstance(body, bytes):
            r = await self.http.post(endpoint, content=body.replace(b"MODEL", self.model.encode()),
                                     headers={"Content-Type": "application/json"})
        else:
            r = await self.http.post(endpoint, json={"model": self.model, **body})
        assert 400 <= r.status_code < 500 and "error" in r.json(), (r.status_code, r.text[:200])

    async def timed_stream(self, create):
        """Seconds to the first event that carries generated text (not the role chunk or response.created)."""
        start = time.perf_counter()
        stream, first = await create, None
        async for event in stream:
            carries = (event.type.endswith(".delta") if hasattr(event, "type")
                       else bool(event.choices) and any(getattr(event.choices[0].delta, k, None) for k in
                                                        ("content", "reasoning_content", "tool_calls")))
            if first is None and carries:
                first = time.perf_counter() - start
        self.ttft.append(first)


async def run(url: str, seconds: float, clients: int, pid: int | None) -> dict:
    model = (await openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused").models.list()).data[0].id
    soak = Soak(url, model, seconds)
    rss = [(0.0, rss_kib(pid))] if pid else []
    start = time.monotonic()

    async def sample_rss():
        while time.monotonic() < soak.end:
            await asyncio.sleep(60)
            rss.append((time.monotonic() - start, rss_kib(pid)))

    sampler = asyncio.create_task(sample_rss()) if pid else None
    await asyncio.gather(*(soak.client_loop(i) for i in range(clients)))
    if sampler:
        sampler.cancel()
        rss.append((time.monotonic() - start, rss_kib(pid)))
    health = httpx.get(f"{url}/health").status_code
    ttft = sorted(t for t in soak.ttft if t is not None)
    return {"seconds": time.monotonic() - start, "clients": clients, "requests": dict(soak.done),
            "served": sum(soak.done.values()), "errors": dict(soak.errors), "health_after": health,
            "ttft_p50_s": statistics.median(ttft) if ttft else None,
            "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else None,
            "rss_mib": [(round(t), round(k / 1024, 1)) for t, k in rss]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start `gptoss serve` on the small random model)")
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    server = None
    url = args.url
    if url is None:
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "gptoss.cli.main", "serve", "--port", str(port), "--threads",
                                   str(args.threads), "--max-batch", "8", "--kv-memory", "512MiB"],
                                  stderr=subprocess.DEVNULL, env={**os.environ})
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
    try:
        result = asyncio.run(run(url, args.minutes * 60, args.clients, server.pid if server else None))
    finally:
        if server:
            server.terminate()
            result_code = server.wait(60)
    if server:
        result["server_exit_code"] = result_code
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
