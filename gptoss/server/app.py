"""The OpenAI-compatible HTTP API on top of the engine: models, chat completions, responses, completions.

Each endpoint does the same four things: validate the request (`schemas`; bad input is a 4xx in
OpenAI's error shape), build the prompt (`prompts`: harmony for chat and responses, the raw text for
completions), check that prompt and completion fit the context, and turn the generated tokens into the
API's objects (`outputs`), streamed as server-sent events or summed up into one answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException

from gptoss.chat.harmony import get_encoding, render_for_completion, stop_tokens
from gptoss.chat.tokenizer import get_tokenizer
from gptoss.errors import GptossError
from gptoss.server.engine import RATE_WINDOW_S, Engine, EngineError, Generation
from gptoss.server.errors import APIError, validation_error
from gptoss.server.outputs import ChatOutput, CompletionOutput, Output, ResponsesOutput, new_id
from gptoss.server.prompts import chat_from_messages, chat_from_responses_input, token_budget
from gptoss.server.schemas import ChatCompletionRequest, CompletionRequest, ResponsesRequest


async def drive(engine: Engine, generation: Generation, output: Output) -> AsyncIterator:
    """Submits `generation` and yields what `output` makes of its tokens. Leaving early (a stop string, a
    client that went away) cancels the generation, which frees its slot."""
    engine.submit(generation)
    try:
        async for token in generation.tokens():
            for piece in output.feed(token):
                yield piece
            if output.stopped:
                return
        for piece in output.end():
            yield piece
    finally:
        generation.cancel()


def sse(data: dict | str, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def server_error(e: Exception) -> dict:
    return APIError(500, str(e), type="server_error").body()


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def chunk_events(head: dict, pieces: AsyncIterator, chunk: Callable[[Any], dict], empty: Any,
                       finish_reason: Callable[[], str], usage: Callable[[], dict] | None) -> AsyncIterator[str]:
    """The SSE of a chat or text completion: a chunk per piece, one with the finish reason, one with the
    usage if asked, then [DONE]. An engine failure ends the stream with an error, which clients raise."""
    try:
        async for piece in pieces:
            yield sse(chunk(piece))
    except EngineError as e:
        yield sse(server_error(e))
        return
    yield sse(chunk(empty, finish_reason()))
    if usage:
        yield sse({**head, "choices": [], "usage": usage()})
    yield sse("[DONE]")


def usage(prompt: list[int], output: Output, generation: Generation) -> dict:
    """Chat and text completions' usage; cached_tokens: the prompt tokens reused from the KV cache."""
    return {"prompt_tokens": len(prompt), "completion_tokens": output.completion_tokens,
            "total_tokens": len(prompt) + output.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": generation.cached_tokens}}


class MetricsCollector:
    """Reads `Engine.stats()` at each scrape, for a registry of its own (several apps, several engines)."""

    GAUGES = {"kv_pages": "pages in the KV cache", "kv_pages_used": "KV pages held by running requests",
              "kv_pages_cached": "free KV pages that keep a reusable prefix", "kv_pages_free": "KV pages a request can take",
              "kv_page_tokens": "positions per KV page", "kv_bytes": "bytes of the KV cache",
              "waiting": "requests waiting to start", "running": "requests being generated",
              "prompt_tokens_per_second": f"prompt tokens computed per second (last {RATE_WINDOW_S:.0f} s)",
              "generation_tokens_per_second": f"tokens generated per second (last {RATE_WINDOW_S:.0f} s)"}
    COUNTERS = {"requests": "requests started", "prompt_tokens": "prompt tokens of the requests started",
                "cached_tokens": "prompt tokens reused from the prefix cache",
                "requests_with_cached_tokens": "requests that reused a cached prefix",
                "prefilled_tokens": "prompt tokens computed", "generated_tokens": "tokens generated",
                "preemptions": "requests paused to free KV pages"}

    def __init__(self, engine: Engine):
        self.engine = engine
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def collect(self):
        stats = self.engine.stats()
        for name, help in self.GAUGES.items():
            yield GaugeMetricFamily(f"gptoss_{name}", help, value=stats.get(name, 0))
        for name, help in self.COUNTERS.items():
            yield CounterMetricFamily(f"gptoss_{name}", help, value=stats.get(name, 0))


@dataclass
class Served:
    """What the endpoints serve: the engine, the model id clients send, and when the server started."""

    engine: Engine
    model_name: str
    created: int = field(default_factory=lambda: int(time.time()))

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`.",
                           param="model", code="model_not_found")


def served(http: Request) -> Served:
    return http.app.state.served


ServedDep = Annotated[Served, Depends(served)]
router = APIRouter()


@router.get("/v1/models")
async def models(s: ServedDep):
    return {"object": "list",
            "data": [{"id": s.model_name, "object": "model", "created": s.created, "owned_by": "gptoss"}]}


@router.get("/health")
async def health(s: ServedDep):
    """200 while the engine runs, 503 once it has stopped."""
    if s.engine.alive():
        return {"status": "ok"}
    return JSONResponse({"status": "engine stopped"}, status_code=503)


@router.get("/metrics")
async def metrics(s: ServedDep):
    """The engine's figures in Prometheus' text format (`gptoss_...`)."""
    return Response(generate_latest(MetricsCollector(s.engine).registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, s: ServedDep):
    s.check_model(body.model)
    stops = body.stop_strings()
    prompt = render_for_completion(chat_from_messages(body))
    asked = body.max_completion_tokens or body.max_tokens
    budget = token_budget(len(prompt), asked, s.engine.context, "messages",
                          "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
    generation = Generation(prompt, budget, body.sampling(), stop_tokens())
    output = ChatOutput(stops)
    head = {"id": new_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()),
            "model": s.model_name}
    if not body.stream:
        deltas = [d async for d in drive(s.engine, generation, output)]
        return {**head, "usage": usage(prompt, output, generation),
                "choices": [{"index": 0, "message": ChatOutput.message(deltas), "logprobs": None,
                             "finish_reason": output.finish_reason(generation.finish_reason)}]}

    head["object"] = "chat.completion.chunk"

    def chunk(delta: dict, finish_reason: str | None = None) -> dict:
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    async def deltas():
        yield {"role": "assistant", "content": ""}
        async for delta in drive(s.engine, generation, output):
            yield delta

    return event_stream(chunk_events(head, deltas(), chunk, {}, lambda: output.finish_reason(generation.finish_reason),
                                     (lambda: usage(prompt, output, generation)) if body.include_usage() else None))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, s: ServedDep):
    s.check_model(body.model)
    stops = body.stop_strings()
    prompt = body.prompt if isinstance(body.prompt, list) else get_tokenizer().encode(body.prompt,
                                                                                      allowed_special="all")
    vocab = s.engine.model.config.vocab_size
    if any(not 0 <= t < vocab for t in prompt):
        raise APIError(400, f"prompt holds token ids outside 0..{vocab - 1}", param="prompt")
    budget = token_budget(len(prompt), body.max_tokens, s.engine.context, "prompt", "max_tokens")
    eos = s.engine.model.config.eos_token_ids
    generation = Generation(prompt, budget, body.sampling(), eos)
    output = CompletionOutput(stops, eos)
    head = {"id": new_id("cmpl-"), "object": "text_completion", "created": int(time.time()), "model": s.model_name}

    def chunk(text: str, finish_reason: str | None = None) -> dict:
        return {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}

    if not body.stream:
        text = "".join([t async for t in drive(s.engine, generation, output)])
        return {**chunk(text, output.finish_reason(generation.finish_reason)), "usage": usage(prompt, output, generation)}

    return event_stream(chunk_events(head, drive(s.engine, generation, output), chunk, "",
                                     lambda: output.finish_reason(generation.finish_reason),
                                     (lambda: usage(prompt, output, generation)) if body.include_usage() else None))


@router.post("/v1/responses")
async def responses(body: ResponsesRequest, s: ServedDep):
    s.check_model(body.model)
    if body.previous_response_id:
        raise APIError(400, "previous_response_id is not supported: this server stores no responses; send the "
                            "whole conversation as input", param="previous_response_id")
    prompt = render_for_completion(chat_from_responses_input(body))
    budget = token_budget(len(prompt), body.max_output_tokens, s.engine.context, "input", "max_output_tokens")
    generation = Generation(prompt, budget, body.sampling(), stop_tokens())
    output = ResponsesOutput()
    rid, created_at = new_id("resp_"), int(time.time())

    def response(status: str) -> dict:
        done = status != "in_progress"
        return {"id": rid, "object": "response", "created_at": created_at, "status": status, "model": s.model_name,
                "output": output.items if done else [], "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
                "temperature": body.temperature, "top_p": body.top_p, "parallel_tool_calls": False,
                "tool_choice": body.tool_choice or "auto", "tools": [t.model_dump() for t in body.tools or []],
                "reasoning": {"effort": body.reasoning.effort if body.reasoning else "medium", "summary": None},
                "text": {"format": {"type": "text"}}, "metadata": {},
                "usage": {"input_tokens": len(prompt), "output_tokens": output.completion_tokens,
                          "total_tokens": len(prompt) + output.completion_tokens,
                          "input_tokens_details": {"cached_tokens": generation.cached_tokens},
                          "output_tokens_details": {"reasoning_tokens": 0}} if done else None}

    def final_status() -> str:
        return "incomplete" if generation.finish_reason == "length" else "completed"

    if not body.stream:
        async for _ in drive(s.engine, generation, output):
            pass
        return response(final_status())

    async def events():
        sequence = 0

        def event(data: dict) -> str:
            nonlocal sequence
            sequence += 1
            return sse({**data, "sequence_number": sequence - 1}, event=data["type"])

        yield event({"type": "response.created", "response": response("in_progress")})
        yield event({"type": "response.in_progress", "response": response("in_progress")})
        try:
            async for data in drive(s.engine, generation, output):
                yield event(data)
        except EngineError as e:
            yield event({"type": "error", "code": "server_error", "message": str(e), "param": None})
            return
        status = final_status()
        yield event({"type": f"response.{status}", "response": response(status)})

    return event_stream(events())


# --- the app --------------------------------------------------------------------------------------------


async def api_error(_: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def invalid_body(http: Request, e: RequestValidationError) -> JSONResponse:
    return await api_error(http, validation_error(e))


async def bad_value(http: Request, e: GptossError) -> JSONResponse:
    return await api_error(http, APIError(400, str(e)))


async def engine_failed(_: Request, e: EngineError) -> JSONResponse:
    return JSONResponse(server_error(e), status_code=500)


async def http_error(http: Request, e: HTTPException) -> JSONResponse:
    return await api_error(http, APIError(e.status_code, str(e.detail), code=str(e.status_code)))


def create_app(engine: Engine, model_name: str) -> FastAPI:
    """The FastAPI app serving `engine`'s model as `model_name`. It starts the engine and closes it on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        get_encoding(), get_tokenizer()  # loaded now rather than on the first generation
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="gptoss", lifespan=lifespan)
    app.state.engine = engine  # for code that embeds the app
    app.state.served = Served(engine, model_name)
    for error, handler in ((APIError, api_error), (RequestValidationError, invalid_body), (GptossError, bad_value),
                           (EngineError, engine_failed), (HTTPException, http_error)):
        app.add_exception_handler(error, handler)
    app.include_router(router)
    return app
