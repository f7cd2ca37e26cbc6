"""The OpenAI-compatible HTTP API on top of the engine: models, chat completions, responses, completions.

Each endpoint does the same things: validate the request (`schemas`; bad input is a 4xx in OpenAI's
error shape), build the prompt and the rules its completion must follow (`prompts`: harmony for chat and
responses, the raw text for completions), check that prompt and completion fit the context, run one
generation per choice, and turn the generated tokens into the API's objects (`outputs`), streamed as
server-sent events or summed up into one answer. Responses are stored (`store`, SQLite) so that a next
turn can name them as `previous_response_id`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import TypeAdapter, ValidationError
from starlette.exceptions import HTTPException

from gptoss.chat.grammar import Constraint, OutputRules, lltokenizer
from gptoss.chat.harmony import get_encoding, render_for_completion, render_tool_result, stop_tokens
from gptoss.chat.tokenizer import TextDecoder, get_tokenizer
from gptoss.errors import GptossError
from gptoss.generation.sampling import SamplingParams
from gptoss.model.generation_config import GenerationConfig
from gptoss.server.engine import Engine, EngineError, Generation, QueueFull
from gptoss.server.errors import ERROR_RESPONSES, APIError, validation_error
from gptoss.server.hosted import HostedTools
from gptoss.server.metrics import MetricsCollector
from gptoss.server.outputs import ChatOutput, CompletionOutput, Output, ResponsesOutput, new_id, token_entry
from gptoss.server.prompts import chat_from_messages, chat_from_responses_input, input_items, token_budget
from gptoss.server.schemas import ChatCompletionRequest, CompletionRequest, InputItem, ResponsesRequest
from gptoss.server.store import ResponseStore

# --- generations and their pieces -------------------------------------------------------------------------


@dataclass
class Choice:
    """One generation and what its endpoint makes of it. `client_gone`: its client left, so nothing more
    is to be generated for it (a response's next round included)."""

    generation: Generation
    output: Output
    client_gone: bool = False


async def drive(engine: Engine, choice: Choice, first_token: asyncio.Event | None = None) -> AsyncIterator:
    """Submits the choice's generation and yields what its output makes of the tokens (with their
    logprobs when asked for). Leaving early (a stop string, a client that went away) cancels it."""
    generation, output = choice.generation, choice.output
    engine.submit(generation)
    try:
        async for token in generation.tokens():
            if first_token is not None:
                first_token.set()
            logprobs = (generation.logprobs[len(generation.generated) - 1] if generation.top_logprobs is not None
                        else None)
            for piece in output.feed(token, logprobs):
                yield piece
            if output.stopped:
                return
        for piece in output.end():
            yield piece
    finally:
        if first_token is not None:
            first_token.set()
        generation.cancel()


_DONE = object()
DISCONNECT_POLL_S = 0.25
RETRY_AFTER_S = 5  # what a client refused for a full queue is told to wait


async def watch_disconnect(http: Request, choices: list[Choice]) -> None:
    """For a non-streaming request (a streaming one notices a client that left at its next write):
    cancels the generations once the client has gone, so they stop using the engine."""
    while not await http.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
    for choice in choices:
        choice.client_gone = True
        choice.generation.cancel()


async def collect(http: Request, choices: list[Choice], pieces: AsyncIterator[tuple[int, Any]]) -> list[list]:
    """Every choice's `pieces`, for a non-streaming answer; the generations stop if the client leaves."""
    watcher = asyncio.create_task(watch_disconnect(http, choices))
    try:
        collected: list[list] = [[] for _ in choices]
        async for i, piece in pieces:
            collected[i].append(piece)
        return collected
    finally:
        watcher.cancel()


async def pieces_of(engine: Engine, choices: list[Choice]) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, piece) of every choice as they come. With several choices (`n`) the first runs alone
    until its first token: by then its prompt is in the cache, and the others take it from there."""
    queue: asyncio.Queue = asyncio.Queue()
    prompt_in = asyncio.Event()

    async def run(i: int, choice: Choice):
        try:
            if i:
                await prompt_in.wait()
            async for piece in drive(engine, choice, prompt_in if i == 0 else None):
                await queue.put((i, piece))
        except Exception as e:  # handed to the consumer, which raises it
            await queue.put((i, e))
        finally:
            await queue.put((i, _DONE))

    tasks = [asyncio.create_task(run(i, c)) for i, c in enumerate(choices)]
    try:
        running = len(choices)
        while running:
            i, item = await queue.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


def sse(data: dict | str, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def server_error(e: Exception) -> dict:
    return APIError(500, str(e), type="server_error").body()


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def chunk_events(head: dict, pieces: AsyncIterator[tuple[int, Any]], chunk: Callable[..., dict], count: int,
                       finish_reason: Callable[[int], str], usage: Callable[[], dict] | None) -> AsyncIterator[str]:
    """The SSE of a chat or text completion: a chunk per piece, one per choice with its finish reason, one
    with the usage if asked, then [DONE]. An engine failure ends the stream with an error, which clients raise."""
    try:
        async for i, piece in pieces:
            yield sse(chunk(i, piece))
    except EngineError as e:
        yield sse(server_error(e))
        return
    for i in range(count):
        yield sse(chunk(i, None, finish_reason(i)))
    if usage:
        yield sse({**head, "choices": [], "usage": usage()})
    yield sse("[DONE]")


def usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    """Chat and text completions' usage: the prompt counted once, the completions of every choice;
    cached_tokens: the prompt tokens reused from the KV cache (by the first choice; the others reuse it)."""
    completion = sum(c.output.completion_tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": choices[0].generation.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": sum(c.output.reasoning_tokens for c in choices)}}


# --- what the endpoints serve ------------------------------------------------------------------------------


@dataclass
class Served:
    """What the endpoints serve: the engine, the model id clients send, the response store, and when the
    server started."""

    engine: Engine
    model_name: str
    store: ResponseStore
    api_key: str | None = None          # required as "Authorization: Bearer KEY" on every endpoint but /health
    request_timeout: float | None = None  # seconds a generation may run; then it ends as if out of budget
    hosted: HostedTools = field(default_factory=HostedTools)  # the built-in tools the server runs
    created: int = field(default_factory=lambda: int(time.time()))

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    @property
    def vocab_size(self) -> int:
        return self.engine.model.config.vocab_size

    @property
    def generation_config(self) -> GenerationConfig:
        """The checkpoint's generation_config.json: raw completions' stop tokens, and what a request that
        leaves a sampling field out gets."""
        return self.engine.model.generation_config

    def generation(self, prompt: list[int], budget: int, params: SamplingParams, stops, rules: OutputRules | None,
                   top_logprobs: int | None, prompt_logprobs: bool = False, started: float | None = None) -> Generation:
        """`started`: when the request began (time.monotonic()), if earlier than now: its timeout counts
        from then (a response's later rounds)."""
        constraint = Constraint(rules, self.vocab_size) if rules is not None and rules.constrained else None
        timeout = self.request_timeout
        if timeout is not None and started is not None:
            timeout = max(timeout - (time.monotonic() - started), 1e-3)
        return Generation(prompt, budget, params, stops, constraint=constraint, top_logprobs=top_logprobs,
                          prompt_logprobs=prompt_logprobs, timeout=timeout)


def served(http: Request) -> Served:
    return http.app.state.served


ServedDep = Annotated[Served, Depends(served)]
# What the generating endpoints answer: one JSON object, or server-sent events with `stream: true`.
STREAMED = {200: {"content": {"application/json": {}, "text/event-stream": {}}}}


def authorized(http: Request, s: ServedDep) -> None:
    """With an API key set, every request must carry it (compared in constant time, so the time taken
    tells nothing of how much of a guess was right)."""
    if s.api_key is None:
        return
    scheme, _, key = http.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), s.api_key.encode()):
        raise APIError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.",
                       code="invalid_api_key")


open_router = APIRouter()                                      # /health, for load balancers and watchdogs
router = APIRouter(dependencies=[Depends(authorized)], responses=ERROR_RESPONSES)


@router.get("/v1/models")
async def models(s: ServedDep):
    return {"object": "list",
            "data": [{"id": s.model_name, "object": "model", "created": s.created, "owned_by": "gptoss"}]}


@open_router.get("/health")
async def health(s: ServedDep):
    """200 while the engine runs, 503 once it has stopped or is stuck in one step (`Engine.healthy`)."""
    ok, why = s.engine.healthy()
    return {"status": "ok"} if ok else JSONResponse({"status": why}, status_code=503)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(s: ServedDep):
    """The engine's figures in Prometheus' text format (`gptoss_...`)."""
    return Response(generate_latest(MetricsCollector(s.engine).registry), media_type=CONTENT_TYPE_LATEST)


# --- chat completions --------------------------------------------------------------------------------------


@router.post("/v1/chat/completions", responses=STREAMED)
async def chat_completions(body: ChatCompletionRequest, s: ServedDep, http: Request):
    s.check_model(body.model)
    body.check_supported()
    stops = body.stop_strings()
    chat, rules = chat_from_messages(body)
    prompt = render_for_completion(chat)
    asked = body.max_completion_tokens or body.max_tokens
    budget = token_budget(len(prompt), asked, s.engine.context, "messages",
                          "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = body.sampling(s.generation_config, s.vocab_size)
    choices = [Choice(s.generation(prompt, budget, params, stop_tokens(), rules, top), ChatOutput(stops, rules.tools))
               for _ in range(body.n)]
    head = {"id": new_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()), "model": s.model_name,
            "service_tier": "default", "system_fingerprint": None}

    def finish_reason(i: int) -> str:
        return choices[i].output.finish_reason(choices[i].generation.finish_reason)

    if not body.stream:
        deltas = await collect(http, choices, pieces_of(s.engine, choices))
        return {**head, "usage": usage(len(prompt), choices),
                "choices": [{"index": i, "message": ChatOutput.message(d),
                             "logprobs": ChatOutput.logprobs(d) if top is not None else None,
                             "finish_reason": finish_reason(i)} for i, d in enumerate(deltas)]}

    head["object"] = "chat.completion.chunk"

    def chunk(i: int, delta: dict | None, finish: str | None = None) -> dict:
        delta = dict(delta or {})
        logprobs = delta.pop("logprobs", None)
        return {**head, "choices": [{"index": i, "delta": delta, "finish_reason": finish,
                                     "logprobs": {"content": logprobs, "refusal": None} if logprobs else None}]}

    async def with_roles():
        for i in range(len(choices)):
            yield i, {"role": "assistant", "content": ""}
        async for piece in pieces_of(s.engine, choices):
            yield piece

    return event_stream(chunk_events(head, with_roles(), chunk, len(choices), finish_reason,
                                     (lambda: usage(len(prompt), choices)) if body.include_usage() else None))


# --- text completions --------------------------------------------------------------------------------------


def completion_logprobs(entries: list, offset: int) -> dict:
    """Legacy completions' columnar logprobs for the tokens of a piece of text starting at `offset`;
    `entries` holds TokenLogprobs, or (token, None) for a prompt's first token, which has none."""
    tokens, logprobs, tops, offsets = [], [], [], []
    for entry in entries:
        token, logprob, top = (entry, None, None) if isinstance(entry, int) else (entry.token, entry.logprob, entry.top)
        text = token_entry(token, 0.0)["token"]
        tokens.append(text)
        logprobs.append(logprob)
        tops.append(None if top is None else {token_entry(t, 0.0)["token"]: v for t, v in top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


@router.post("/v1/completions", responses=STREAMED)
async def completions(body: CompletionRequest, s: ServedDep, http: Request):
    s.check_model(body.model)
    body.check_supported()
    stops = body.stop_strings()
    eos = s.generation_config.eos_token_ids
    params = body.sampling(s.generation_config, s.vocab_size)
    choices, echoes, prompt_tokens = [], [], 0
    for prompt in body.prompts():
        ids = prompt if isinstance(prompt, list) else get_tokenizer().encode(prompt, allowed_special="all")
        if any(not 0 <= t < s.vocab_size for t in ids):
            raise APIError(400, f"prompt holds token ids outside 0..{s.vocab_size - 1}", param="prompt")
        budget = token_budget(len(ids), body.max_tokens, s.engine.context, "prompt", "max_tokens")
        prompt_tokens += len(ids)
        for _ in range(body.n):
            generation = s.generation(ids, budget, params, eos, None, body.logprobs,
                                      prompt_logprobs=body.echo and body.logprobs is not None)
            choices.append(Choice(generation, CompletionOutput(stops, eos)))
            echoes.append((prompt if isinstance(prompt, str) else decode(ids)) if body.echo else None)
    head = {"id": new_id("cmpl-"), "object": "text_completion", "created": int(time.time()), "model": s.model_name}
    offsets = [0] * len(choices)

    def logprobs_of(i: int, piece: dict) -> dict | None:
        if body.logprobs is None:
            return None
        result = completion_logprobs(piece["tokens"], offsets[i])
        offsets[i] += len(piece["text"])
        return result

    def echoed(i: int) -> dict:
        """The prompt as the first piece of choice i, with its tokens' logprobs when asked for."""
        generation = choices[i].generation
        return {"text": echoes[i], "tokens": [generation.prompt[0], *generation.prompt_token_logprobs]}

    async def pieces(stream=None):
        started = set()
        async for i, piece in stream or pieces_of(s.engine, choices):
            if echoes[i] is not None and i not in started:
                started.add(i)
                yield i, echoed(i)
            yield i, piece
        for i in range(len(choices)):  # a choice that made no text still echoes its prompt
            if echoes[i] is not None and i not in started:
                yield i, echoed(i)

    def chunk(i: int, piece: dict | None, finish: str | None = None) -> dict:
        text = piece["text"] if piece else ""
        return {**head, "choices": [{"index": i, "text": text, "finish_reason": finish,
                                     "logprobs": logprobs_of(i, piece) if piece else None}]}

    def finish_reason(i: int) -> str:
        return choices[i].output.finish_reason(choices[i].generation.finish_reason)

    if not body.stream:
        collected = await collect(http, choices, pieces_of(s.engine, choices))
        texts: list[list[dict]] = [[] for _ in choices]
        async for i, piece in pieces(replay(collected)):
            texts[i].append(piece)
        result = []
        for i, parts in enumerate(texts):
            joined = {"text": "".join(p["text"] for p in parts), "tokens": [t for p in parts for t in p["tokens"]]}
            result.append({"index": i, "text": joined["text"], "finish_reason": finish_reason(i),
                           "logprobs": logprobs_of(i, joined)})
        return {**head, "choices": result, "usage": usage(prompt_tokens, choices)}

    return event_stream(chunk_events(head, pieces(), chunk, len(choices), finish_reason,
                                     (lambda: usage(prompt_tokens, choices)) if body.include_usage() else None))


async def replay(collected: list[list]) -> AsyncIterator[tuple[int, Any]]:
    for i, pieces in enumerate(collected):
        for piece in pieces:
            yield i, piece


def decode(ids: list[int]) -> str:
    decoder = TextDecoder()
    return "".join(decoder.feed(t) for t in ids) + decoder.flush()


# --- responses ---------------------------------------------------------------------------------------------

INPUT_ITEMS = TypeAdapter(list[InputItem])


@router.post("/v1/responses", responses=STREAMED)
async def responses(body: ResponsesRequest, s: ServedDep, http: Request):
    s.check_model(body.model)
    body.check_supported()
    earlier = []
    if body.previous_response_id:
        stored = s.store.conversation(body.previous_response_id)
        if stored is None:
            raise APIError(404, f"Previous response with id '{body.previous_response_id}' not found.",
                           param="previous_response_id", code="previous_response_not_found")
        earlier = INPUT_ITEMS.validate_python(stored)
    rid, created_at, started = new_id("resp_"), int(time.time()), time.monotonic()
    conversation = s.hosted.conversation(body, rid)
    # In a thread: a conversation's first python sandbox starts a process.
    builtin, warnings = await asyncio.to_thread(s.hosted.for_request, body, conversation)
    chat, rules = chat_from_responses_input(body, earlier, builtin)
    prompt = render_for_completion(chat)
    budget = token_budget(len(prompt), body.max_output_tokens, s.engine.context, "input", "max_output_tokens")
    top = (body.top_logprobs or 0) if body.wants_logprobs else None
    params = body.sampling(s.generation_config)
    include = set(body.include or [])
    output = ResponsesOutput(rules.tools, summary=body.summary is not None,
                             encrypted="reasoning.encrypted_content" in include,
                             code_outputs="code_interpreter_call.outputs" in include,
                             cite=builtin.browser.normalize_citations if builtin.browser else None,
                             container_id=container_id(conversation))
    choice = Choice(s.generation(prompt, budget, params, stop_tokens(), rules, top), output)
    generations = [choice.generation]  # one per completion: a built-in tool's answer starts the next

    async def rounds() -> AsyncIterator[tuple[int, dict]]:
        """The output's pieces over the response's completions: when one ends in a call of a built-in tool,
        the server runs it and the model goes on from its answer, until it answers, calls a developer's
        tool, or runs out of budget, context or time. tool_choice applies to the first completion, as
        OpenAI applies it: afterwards the model may answer."""
        calls, later_rules = 0, replace(rules, tool_choice="auto") if rules.tools else rules
        while True:
            async for piece in pieces_of(s.engine, [choice]):
                yield piece
            call, generation = output.pending_call, choice.generation
            if call is None or choice.client_gone:
                return
            if generation.finish_reason != "stop":  # cut off (budget, timeout) inside the call: not run
                for piece in output.abandon_call():
                    yield 0, piece
                return
            calls += 1
            refused = body.max_tool_calls is not None and calls > body.max_tool_calls
            if refused:
                answer = f"Error: this response may call tools at most {body.max_tool_calls} times; answer now."
            else:  # in a thread: python runs for seconds, a web backend waits on the network
                answer = await asyncio.to_thread(builtin.run, call["recipient"], call["text"])
            action = builtin.browser.last_action if call["recipient"].startswith("browser.") and not refused else None
            if action and "web_search_call.action.sources" not in include:
                action = {k: v for k, v in action.items() if k != "sources"}
            for piece in output.complete_call(answer, action, failed=refused):
                yield 0, piece
            prompt_next = generation.prompt + generation.generated + render_tool_result(call["recipient"], answer)
            room = min(budget - output.completion_tokens, s.engine.context - len(prompt_next))
            if choice.client_gone:
                return
            if room < 1:
                generation.finish_reason = "length"
                return
            choice.generation = s.generation(prompt_next, room, params, stop_tokens(), later_rules, top,
                                             started=started)
            generations.append(choice.generation)
            output.next_round()

    def response(status: str) -> dict:
        done = status != "in_progress"
        text_format = (body.text.format.model_dump(by_alias=True, exclude_none=True)
                       if body.text is not None and body.text.format is not None else {"type": "text"})
        input_tokens = sum(len(g.prompt) for g in generations)
        result = {"id": rid, "object": "response", "created_at": created_at, "status": status, "model": s.model_name,
                  "output": output.items if done else [], "error": None,
                  "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                  "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
                  "temperature": body.temperature, "top_p": body.top_p, "top_logprobs": body.top_logprobs,
                  "parallel_tool_calls": body.parallel_tool_calls is not False, "max_tool_calls": body.max_tool_calls,
                  "tool_choice": tool_choice(body), "tools": [t.model_dump() for t in body.tools or []],
                  "reasoning": {"effort": body.reasoning.effort if body.reasoning else "medium",
                                "summary": body.summary},
                  "text": {"format": text_format, "verbosity": "medium"}, "metadata": body.metadata or {},
                  "previous_response_id": body.previous_response_id, "store": body.store, "truncation": "disabled",
                  "service_tier": "default", "user": body.user, "prompt_cache_key": body.prompt_cache_key,
                  "usage": {"input_tokens": input_tokens, "output_tokens": output.completion_tokens,
                            "total_tokens": input_tokens + output.completion_tokens,
                            "input_tokens_details": {"cached_tokens": sum(g.cached_tokens for g in generations)},
                            "output_tokens_details": {"reasoning_tokens": output.reasoning_tokens}} if done else None}
        if warnings:  # not in OpenAI's schema; clients ignore fields they do not know
            result["warnings"] = warnings
        return result

    def finished() -> dict:
        status = "incomplete" if choice.generation.finish_reason == "length" else "completed"
        result = response(status)
        if body.store:
            items = [*earlier, *input_items(body)]
            conversation = [item.model_dump(mode="json") for item in items] + output.items_to_store()
            s.store.put(result, conversation)
        return result

    if not body.stream:
        await collect(http, [choice], rounds())
        return finished()

    async def events():
        sequence = 0

        def event(data: dict) -> str:
            nonlocal sequence
            sequence += 1
            return sse({**data, "sequence_number": sequence - 1}, event=data["type"])

        yield event({"type": "response.created", "response": response("in_progress")})
        yield event({"type": "response.in_progress", "response": response("in_progress")})
        try:
            async for _, data in rounds():
                yield event(data)
        except Exception as e:  # an engine failure, or a bug: the client gets an error event, not a cut stream
            yield event({"type": "error", "code": "server_error", "message": str(e), "param": None})
            return
        result = finished()
        yield event({"type": f"response.{result['status']}", "response": result})

    return event_stream(events())


def container_id(conversation: str) -> str:
    """The id code_interpreter_call items give the python sandbox of a conversation (one per conversation)."""
    return "cntr_" + hashlib.sha256(conversation.encode()).hexdigest()[:32]


def tool_choice(body: ResponsesRequest) -> str | dict:
    choice = body.tool_choice or "auto"
    return choice if isinstance(choice, str) else choice.model_dump()


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, s: ServedDep):
    if (stored := s.store.get(response_id)) is None:
        raise APIError(404, f"No response found with id '{response_id}'.", param="response_id", code="not_found")
    return stored


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, s: ServedDep):
    if not s.store.delete(response_id):
        raise APIError(404, f"No response found with id '{response_id}'.", param="response_id", code="not_found")
    return {"id": response_id, "object": "response", "deleted": True}


# --- the app --------------------------------------------------------------------------------------------

MAX_BODY_BYTES = 16 * 2**20


class BodyLimit:
    """Refuses a request body over `max_bytes` with a 413, before it is read whole: by its Content-Length,
    or as a chunked body grows past the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(send)
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge()
            return message

        try:
            await self.app(scope, counting_receive, send)
        except BodyTooLarge:
            await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = json.dumps(APIError(413, f"The request body is larger than {self.max_bytes} bytes.",
                                   code="request_too_large").body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class BodyTooLarge(Exception):
    pass


async def api_error(_: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def invalid_body(http: Request, e: RequestValidationError) -> JSONResponse:
    return await api_error(http, validation_error(e))


async def bad_value(http: Request, e: GptossError) -> JSONResponse:
    return await api_error(http, APIError(400, str(e)))


async def engine_failed(_: Request, e: EngineError) -> JSONResponse:
    if isinstance(e, QueueFull):
        return JSONResponse(APIError(429, str(e), type="rate_limit_error", code="queue_full").body(), status_code=429,
                            headers={"Retry-After": str(RETRY_AFTER_S)})
    return JSONResponse(server_error(e), status_code=500)


async def http_error(http: Request, e: HTTPException) -> JSONResponse:
    return await api_error(http, APIError(e.status_code, str(e.detail), code=str(e.status_code)))


async def stored_item_invalid(http: Request, e: ValidationError) -> JSONResponse:
    return JSONResponse(server_error(RuntimeError(f"a stored conversation does not parse: {e}")), status_code=500)


def create_app(engine: Engine, model_name: str, store: ResponseStore | None = None, api_key: str | None = None,
               request_timeout: float | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               hosted: HostedTools | None = None) -> FastAPI:
    """The FastAPI app serving `engine`'s model as `model_name`, keeping responses in `store` (default:
    in memory, gone with the process); `api_key`, `request_timeout`, `hosted` (the built-in tools it
    runs; default none) and `max_body_bytes` as in `Served` and `BodyLimit`. It starts the engine and
    closes it, and the hosted tools' sandboxes, on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        get_encoding(), get_tokenizer(), lltokenizer(engine.model.config.vocab_size)  # loaded now, not on a request
        engine.start()
        yield
        engine.close()
        app.state.served.hosted.close()

    app = FastAPI(title="gptoss", lifespan=lifespan)
    app.state.engine = engine  # for code that embeds the app
    app.state.served = Served(engine, model_name, store or ResponseStore(":memory:"), api_key, request_timeout,
                              hosted or HostedTools())
    for error, handler in ((APIError, api_error), (RequestValidationError, invalid_body), (GptossError, bad_value),
                           (EngineError, engine_failed), (HTTPException, http_error), (ValidationError, stored_item_invalid)):
        app.add_exception_handler(error, handler)
    app.include_router(open_router)
    app.include_router(router)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    return app

