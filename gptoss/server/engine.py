"""Continuous batching over a paged KV cache: one background thread owns the model and serves many
generations at once.

Memory: one `KVCache` pool of pages shared by every generation; a generation holds the pages its tokens
need (sliding layers only their window). Prefixes: a new generation takes the cached pages of the
longest prefix it shares with anything computed before (the same request earlier, the earlier turns of
its conversation, a system prompt that other requests share) and computes only the rest.

Each scheduler step:
1. generations whose client left are dropped, their pages given back (they stay cached);
2. waiting generations are admitted in order while fewer than `max_batch` run and the pool has the
   pages their prompt still needs; the first that does not fit waits, and those behind it with it;
3. prefill: at most `chunk` prompt tokens in all, for the admitted generations in order, so a long
   prompt takes several steps and delays the running streams by one chunk a step, not by its whole length;
4. decode: one token for every generation whose prompt is in, all in one batch.
A generation that needs a page when none is free preempts the youngest running one (possibly itself):
that one gives back its pages, which stay cached, and waits at the head of the queue; on resuming it
takes its own prefix back, recomputes at most a page, and goes on with the same tokens and the same
random stream.

Generations do not interact (each has its own positions and pages, and shared pages are never written),
so a request computes the same tokens alone, in a batch, after a preemption, and with reuse on or off.
Generations are created and consumed on an asyncio event loop; the engine thread hands each token over
with `loop.call_soon_threadsafe`, so consumers simply `async for token in generation.tokens()`.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from gptoss.errors import GptossError
from gptoss.generation.cache import PAGE_SIZE, PREFILL_CHUNK, CacheFull, ContextError, KVCache, Sequence
from gptoss.chat.grammar import Constraint
from gptoss.generation.sampling import SamplingParams, adjust, sample
from gptoss.generation.stopping import StopRule
from gptoss.model.transformer import Transformer

RATE_WINDOW_S = 10.0  # tokens per second in the metrics: over this many last seconds


class EngineError(GptossError):
    """The engine failed while computing a generation (or shut down before finishing it)."""


class QueueFull(EngineError):
    """More generations wait than the engine takes (`max_waiting`): the client should come back later."""


@dataclass(frozen=True)
class TokenLogprobs:
    """A token's log-probability under the model (before temperature, bias, penalties and grammar), and
    the likeliest tokens at its position with theirs."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]

    @classmethod
    def at(cls, logits: torch.Tensor, token: int, top: int) -> "TokenLogprobs":
        """logits [V] of the position that `token` takes."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        values, ids = logprobs.topk(top) if top else (logprobs[:0], logprobs[:0].long())
        return cls(token, float(logprobs[token]), tuple(zip(ids.tolist(), values.tolist())))


@dataclass(frozen=True)
class _Finished:
    """The last item of a generation's queue."""

    reason: str  # "stop" (a stop token), "length" (max_new_tokens), "cancelled" or "error"
    error: Exception | None = None


class Generation:
    """One request's generation: its prompt, budget and sampling, and the queue its tokens arrive on.

    Create it inside the event loop that consumes it. `tokens()` yields the new token ids, the stop token
    included; afterwards `finish_reason` says why it ended and `cached_tokens` how much of the prompt was
    reused from the cache. `cancel()` (or leaving `tokens()` early) frees its pages at the next step.
    """

    def __init__(self, prompt: Seq[int], max_new_tokens: int, params: SamplingParams = SamplingParams(),
                 stop_tokens: Seq[int] = (), constraint: Constraint | None = None, top_logprobs: int | None = None,
                 prompt_logprobs: bool = False, timeout: float | None = None):
        """constraint: the grammar every new token must fit (`gptoss.chat.grammar`). top_logprobs: record
        each new token's log-probability and the `top_logprobs` likeliest alternatives (None: nothing).
        prompt_logprobs: also those of the prompt's tokens (the prompt is then computed whole, not reused).
        timeout: seconds from now after which the generation ends as if its budget ran out."""
        if not prompt:
            raise ContextError("the prompt needs at least one token")
        if max_new_tokens < 1:
            raise ContextError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.prompt, self.max_new_tokens, self.params = list(prompt), max_new_tokens, params
        self.stop_rule = StopRule(max_new_tokens, stop_tokens)
        self.generator = None  # its own random stream (seeds hold in any batch), made on the model's device
        self.finish_reason: str | None = None
        self.cancelled = False
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[int | _Finished] = asyncio.Queue()
        self.constraint, self.top_logprobs, self.prompt_logprobs = constraint, top_logprobs, prompt_logprobs
        # One TokenLogprobs per new token (and per prompt token after the first, with prompt_logprobs),
        # appended by the engine before the token is delivered.
        self.logprobs: list[TokenLogprobs] = []
        self.prompt_token_logprobs: list[TokenLogprobs] = []
        self.cached_tokens = 0
        self.started = False
        # Engine-side state: the tokens made so far, and the sequence of pages its tokens are in (None while
        # waiting; a preempted generation waits again and resumes from its cached prefix).
        self.generated: list[int] = []
        self.sequence: Sequence | None = None

    @property
    def known_tokens(self) -> list[int]:
        """Prompt and generated tokens: what the cache must hold before the next token is sampled."""
        return self.prompt + self.generated

    def pending(self) -> list[int]:
        """The tokens not yet in the cache; while decoding, only the last generated one."""
        return self.known_tokens[self.sequence.length:]

    def decoding(self) -> bool:
        return bool(self.generated) and self.sequence.length == len(self.known_tokens) - 1

    def ended_early(self, now: float) -> str | None:
        """Why the generation must end before its next token: "cancelled" (its client left), "length" (past
        its deadline, which ends it as if its budget ran out), or None."""
        if self.cancelled:
            return "cancelled"
        return "length" if self.deadline is not None and now > self.deadline else None

    def cancel(self) -> None:
        """Stops the generation; the engine frees its pages before its next step. Safe to call twice."""
        self.cancelled = True

    async def tokens(self) -> AsyncIterator[int]:
        """The new tokens as they are made. Raises EngineError if the engine failed on this generation."""
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, _Finished):
                    self.finish_reason = item.reason
                    if item.error is not None:
                        raise EngineError(str(item.error)) from item.error
                    return
                yield item
        finally:
            self.cancel()  # a no-op if finished; frees the pages if the consumer left early

    def _deliver(self, item: int | _Finished) -> None:
        """Called from the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            self.cancelled = True


class Engine:
    """The scheduler thread and its KV cache. `start()`, then `submit()` generations; `close()` at the end."""

    def __init__(self, model: Transformer, max_batch: int = 8, context: int | None = None,
                 kv_memory: int | None = None, chunk: int = PREFILL_CHUNK, page_size: int = PAGE_SIZE,
                 prefix_reuse: bool = True, max_waiting: int = 256, stall_timeout: float = 300.0):
        """max_batch: generations running at once. context: tokens per request, prompt and completion
        (default: the model's), lowered to what the KV memory holds. kv_memory: bytes of the page pool
        (default: room for max_batch requests of `context` tokens). prefix_reuse: False computes every
        prompt whole (for comparison). max_waiting: generations that may wait; one more is refused
        (QueueFull). stall_timeout: seconds one scheduler step may take before the engine counts as
        stuck (`healthy`).

        chunk: prompt tokens prefilled per scheduler step, between two decode steps of the running
        requests. 512 (as `gptoss bench` and llama.cpp's micro-batch) against 128: a 1024-token prompt
        arriving beside 4 decoding streams gets its first token in 7.4 s instead of 15.2 s, and the
        streams wait up to 3.9 s instead of 2.1 s for one token (gpt-oss-20b geometry at 8 layers, 2 threads,
        `benchmarks/server_prefill_chunk.py`)."""
        cfg = model.config
        self.model, self.max_batch, self.chunk = model, max_batch, chunk
        wanted = cfg.max_context if context is None else min(context, cfg.max_context)
        if max_batch < 1 or wanted < 2:
            raise GptossError(f"the engine needs at least one slot (max_batch) and a context of 2 tokens, got "
                              f"max_batch {max_batch} and context {wanted}")
        options = dict(page_size=page_size, chunk=chunk, dtype=model.dtype, device=model.device, prefix_reuse=prefix_reuse,
                       kv_heads=model.kv_heads)
        self.cache = (KVCache.for_tokens(cfg, wanted, max_batch, **options) if kv_memory is None
                      else KVCache.for_bytes(cfg, kv_memory, **options))
        self.context = min(wanted, self.cache.max_tokens())
        if self.context < 2:
            raise GptossError(f"{kv_memory} bytes of KV memory hold no request; give it more")
        self.running: list[Generation] = []   # in the order they were admitted: the last is the youngest
        self._waiting: collections.deque[Generation] = collections.deque()
        self._wakeup = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="gptoss-engine", daemon=True)
        self.max_waiting, self.stall_timeout = max_waiting, stall_timeout
        self.step_started: float | None = None  # when the step in progress began (None between steps)
        self.counters = collections.Counter()  # requests, prompt_tokens, cached_tokens, generated_tokens, ...
        self._history: collections.deque[tuple[float, int, int]] = collections.deque()

    def start(self) -> Engine:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stops the thread; generations still waiting or running end with an EngineError."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        if self._thread.is_alive():
            self._thread.join()

    def submit(self, generation: Generation) -> Generation:
        """Queues `generation`; its tokens then arrive through `generation.tokens()`."""
        if len(generation.prompt) + generation.max_new_tokens > self.context:
            raise ContextError(f"prompt of {len(generation.prompt)} tokens plus {generation.max_new_tokens} new tokens "
                               f"exceeds the server's context of {self.context}")
        with self._wakeup:
            if self._closed:
                raise EngineError("the engine is shut down")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already; try again later")
            self._waiting.append(generation)
            self._wakeup.notify()
        return generation

    def busy_slots(self) -> int:
        return len(self.running)

    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    def healthy(self) -> tuple[bool, str]:
        """(ok, why not): the scheduler thread runs, and no step has lasted past `stall_timeout`."""
        if not self.alive():
            return False, "the engine has stopped"
        started = self.step_started
        if started is not None and time.monotonic() - started > self.stall_timeout:
            return False, f"the engine has been in one step for {time.monotonic() - started:.0f} s"
        return True, "ok"

    def stats(self) -> dict:
        """What /metrics reports: the pool, the queue, the counters, and tokens per second lately."""
        c = self.cache
        now, recent = time.monotonic(), list(self._history)
        rates = {"prompt_tokens_per_second": 0.0, "generation_tokens_per_second": 0.0}
        if len(recent) > 1 and recent[-1][0] > recent[0][0]:
            seconds = max(now, recent[-1][0]) - recent[0][0]
            rates = {"prompt_tokens_per_second": (recent[-1][1] - recent[0][1]) / seconds,
                     "generation_tokens_per_second": (recent[-1][2] - recent[0][2]) / seconds}
        return {"kv_pages": c.num_pages, "kv_pages_used": c.num_pages - c.free_pages, "kv_pages_cached": len(c.cached),
                "kv_pages_free": c.free_pages, "kv_page_tokens": c.page_size, "kv_bytes": c.nbytes,
                "waiting": len(self._waiting), "running": len(self.running), **dict(self.counters), **rates}

    # --- the scheduler thread -------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while self._next_step_ready():
                self.step_started = time.monotonic()
                try:
                    self._step()
                except Exception as e:  # a bug outside any one generation's work: those running fail, not the engine
                    for generation in list(self.running):
                        self._finish(generation, "error", e)
                self.step_started = None
        for generation in [*self._waiting, *self.running]:
            generation._deliver(_Finished("cancelled", EngineError("the server is shutting down")))

    def _step(self) -> None:
        self._drop_finished_early()
        self._admit()
        self._prefill()
        decoding = [g for g in self.running if g.decoding()]
        if decoding:
            self._guarded(decoding, self._decode)
        self._note_rates()

    def _next_step_ready(self) -> bool:
        """Sleeps until there is work (a waiting or running generation) or a close; False on close."""
        with self._wakeup:
            self._wakeup.wait_for(lambda: self._closed or self._waiting or self.running)
            return not self._closed

    def _drop_finished_early(self) -> None:
        """Generations cancelled (a client that left) or past their deadline end here, waiting or running;
        a late one ends as if its budget ran out ("length"), keeping what it made."""
        now = time.monotonic()
        for generation in list(self.running):
            if why := generation.ended_early(now):
                self._finish(generation, why)
        with self._wakeup:  # one verdict each: a client may cancel meanwhile, from the event loop's thread
            verdicts = [(g, g.ended_early(now)) for g in self._waiting]
            self._waiting = collections.deque(g for g, why in verdicts if why is None)
        for generation, why in verdicts:  # a consumer still reading tokens() learns it ended
            if why is not None:
                generation._deliver(_Finished(why))

    def _admit(self) -> None:
        """Moves waiting generations to the running ones, in order, while they fit (see the module doc)."""
        with self._wakeup:
            while self._waiting and len(self.running) < self.max_batch:
                generation = self._waiting[0]
                sequence = self.cache.sequence()
                try:
                    # prompt_logprobs needs the logits of every prompt position: computed, not reused
                    reused = 0 if generation.prompt_logprobs else sequence.reuse_prefix(generation.known_tokens)
                except Exception as e:  # this generation alone fails
                    sequence.release()
                    self._waiting.popleft()
                    generation._deliver(_Finished("error", e))
                    continue
                if self.running and sequence.pages_to_grow(len(generation.known_tokens)) > self.cache.free_pages:
                    sequence.release()
                    return
                self._waiting.popleft()
                generation.sequence = sequence
                if not generation.started:  # admitted for the first time, not resumed after a preemption
                    generation.started = True
                    generation.generator = generation.params.generator(self.model.device)
                    generation.cached_tokens = reused
                    self.counters.update(requests=1, prompt_tokens=len(generation.prompt), cached_tokens=reused,
                                         requests_with_cached_tokens=int(reused > 0))
                self.running.append(generation)

    def _prefill(self) -> None:
        """Up to `chunk` prompt tokens, generation by generation in order; a generation whose prompt is
        all in samples its first token."""
        budget = self.chunk
        for generation in [g for g in self.running if not g.decoding()]:
            if budget == 0:
                return
            if generation.sequence is None:  # preempted by an earlier prefill of this step
                continue
            piece = generation.pending()[:budget]
            self._guarded([generation], lambda gens: self._forward(gens, [piece]))
            self.counters.update(prefilled_tokens=len(piece))
            budget -= len(piece)

    def _decode(self, generations: list[Generation]) -> None:
        """One new token for each of `generations`, in one batch."""
        self._forward(generations, [[g.generated[-1]] for g in generations])

    def _forward(self, generations: list[Generation], tokens: list[list[int]]) -> None:
        """Feeds tokens[i] to generations[i] in one batch (preempting for pages if needed); each generation
        whose tokens are then all in the cache samples its next one."""
        batch, kept = self._batch(generations, tokens)
        if batch is None:
            return
        ids = torch.tensor([tokens[i] for i in kept], device=self.model.device)
        every_position = any(generations[i].prompt_logprobs and not generations[i].generated for i in kept)
        logits = self.model(ids, cache=batch, last_only=not every_position)
        for row, i in enumerate(kept):
            generation = generations[i]
            try:
                if generation.prompt_logprobs and not generation.generated:
                    self._record_prompt_logprobs(generation, tokens[i], logits[row])
                if generation.sequence.length == len(generation.known_tokens):
                    self._accept(generation, self._sample(generation, logits[row:row + 1, -1]))
            except Exception as e:  # this generation's grammar or sampling failed: it alone ends
                self._finish(generation, "error", e)

    def _sample(self, generation: Generation, logits: torch.Tensor) -> int:
        """The next token from logits [1, V]: bias and penalties, the grammar's mask, then sampling."""
        adjusted = adjust(logits, generation.params, generation.generated)  # a copy if it changes anything
        if generation.constraint is not None:
            if adjusted is logits:  # the mask writes in place, and the logprobs want the model's own logits
                adjusted = logits.clone()
            generation.constraint.mask(adjusted)
        token = int(sample(adjusted, generation.params, generation.generator))
        if generation.constraint is not None:
            generation.constraint.advance(token)
        if generation.top_logprobs is not None:
            generation.logprobs.append(TokenLogprobs.at(logits[0], token, generation.top_logprobs))
        return token

    def _record_prompt_logprobs(self, generation: Generation, fed: list[int], logits: torch.Tensor) -> None:
        """logits [T, V] of the `fed` prompt tokens: each position scores the next prompt token."""
        start = generation.sequence.length - len(fed)            # position of fed[0]
        for t in range(len(fed)):
            position = start + t + 1                             # the token this position predicts
            # (a prefill repeated after a preemption records nothing twice)
            if position == len(generation.prompt_token_logprobs) + 1 and position < len(generation.prompt):
                generation.prompt_token_logprobs.append(
                    TokenLogprobs.at(logits[t], generation.prompt[position], generation.top_logprobs or 0))

    def _batch(self, generations: list[Generation], tokens: list[list[int]]):
        """The cache of a pass, and the indices of the generations still in it: while pages run out, the
        youngest running generation is preempted (possibly one of these, which then leaves the pass)."""
        kept = list(range(len(generations)))
        while kept:
            try:
                return self.cache.batch([generations[i].sequence for i in kept], [tokens[i] for i in kept]), kept
            except CacheFull:
                if len(self.running) == 1:
                    raise  # a lone request always fits (submit checks it): this is a bug
                victim = self.running[-1]
                self._preempt(victim)
                kept = [i for i in kept if generations[i] is not victim]
        return None, []

    def _preempt(self, generation: Generation) -> None:
        generation.sequence.release()
        generation.sequence = None
        self.running.remove(generation)
        with self._wakeup:
            self._waiting.appendleft(generation)
        self.counters.update(preemptions=1)

    def _accept(self, generation: Generation, token: int) -> None:
        """Hands a new token to the generation; finishes it if that ends it (a stop token, the budget, or
        a grammar with nothing left to add)."""
        generation.generated.append(token)
        generation._deliver(token)
        self.counters.update(generated_tokens=1)
        if reason := generation.stop_rule.finish_reason(token, len(generation.generated)):
            self._finish(generation, reason)
        elif generation.constraint is not None and generation.constraint.finished:
            self._finish(generation, "stop")

    def _finish(self, generation: Generation, reason: str, error: Exception | None = None) -> None:
        """Ends the generation and gives its pages back at once (its registered pages stay cached)."""
        if generation in self.running:
            self.running.remove(generation)
        if generation.sequence is not None:
            generation.sequence.release()
            generation.sequence = None
        generation._deliver(_Finished(reason, error))  # after the release: a finished generation holds no pages

    def _guarded(self, generations: list[Generation], step) -> None:
        """Runs step(generations); if it raises, those generations fail with the error and the engine goes on."""
        try:
            step(generations)
        except Exception as e:  # a bug or out of memory: report it to the clients rather than hang them
            for generation in generations:
                if generation in self.running:
                    self._finish(generation, "error", e)

    def _note_rates(self) -> None:
        now = time.monotonic()
        self._history.append((now, self.counters["prefilled_tokens"], self.counters["generated_tokens"]))
        while len(self._history) > 2 and self._history[1][0] < now - RATE_WINDOW_S:
            self._history.popleft()
