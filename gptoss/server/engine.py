"""Continuous batching: one background thread owns the model and serves many generations at once.

The engine has a fixed number of slots (`max_batch`), each with its own row of one batch KVCache. A new
generation waits for a free slot, is prefilled alone into its row, one chunk per scheduler step, and then
joins the decode batch; every step decodes one token for all decoding rows at once. Each step also
advances every prefill by a chunk, so a burst of new generations fills the batch within a few steps (and
delays the running ones by that many chunks once). A generation that finishes (stop token or token
budget) or is cancelled leaves between two steps: its row is reset and its slot taken by the next
waiting generation. Rows do not interact (each has its own positions, and a
row's keys are invisible to the others), so a generation computes the same tokens alone or in a batch.

Requests are created and consumed on an asyncio event loop; the engine thread hands each token over
with `loop.call_soon_threadsafe`, so consumers simply `async for token in generation.tokens()`.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import torch

from gptoss.errors import GptossError
from gptoss.generation.cache import PREFILL_CHUNK, ContextError, KVCache
from gptoss.generation.sampling import SamplingParams, sample
from gptoss.generation.stopping import StopRule
from gptoss.model.transformer import Transformer


class EngineError(GptossError):
    """The engine failed while computing a generation (or shut down before finishing it)."""


@dataclass(frozen=True)
class _Finished:
    """The last item of a generation's queue."""

    reason: str  # "stop" (a stop token), "length" (max_new_tokens), "cancelled" or "error"
    error: Exception | None = None


class Generation:
    """One request's generation: its prompt, budget and sampling, and the queue its tokens arrive on.

    Create it inside the event loop that consumes it. `tokens()` yields the new token ids, the stop token
    included; afterwards `finish_reason` says why it ended. `cancel()` (or leaving `tokens()` early)
    frees its slot at the next step.
    """

    def __init__(self, prompt: Sequence[int], max_new_tokens: int, params: SamplingParams = SamplingParams(),
                 stop_tokens: Sequence[int] = ()):
        if not prompt:
            raise ContextError("the prompt needs at least one token")
        if max_new_tokens < 1:
            raise ContextError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.prompt, self.max_new_tokens, self.params = list(prompt), max_new_tokens, params
        self.stop_rule = StopRule(max_new_tokens, stop_tokens)
        self.generator = None  # its own random stream (seeds hold in any batch), made on the model's device
        self.finish_reason: str | None = None
        self.cancelled = False
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[int | _Finished] = asyncio.Queue()
        # Engine-side state: tokens made so far, and how much of the prompt is in the cache.
        self.generated: list[int] = []
        self.prefilled = 0

    def cancel(self) -> None:
        """Stops the generation; the engine frees the slot before its next step. Safe to call twice."""
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
            self.cancel()  # a no-op if finished; frees the slot if the consumer left early

    def _deliver(self, item: int | _Finished) -> None:
        """Called from the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            self.cancelled = True


class Engine:
    """The scheduler thread and its batch KV cache. `start()`, then `submit()` generations; `close()` at the end."""

    def __init__(self, model: Transformer, max_batch: int = 8, context: int | None = None,
                 chunk: int = PREFILL_CHUNK):
        """chunk: prompt tokens prefilled per scheduler step, between two decode steps of the running
        requests. 512 (as `gptoss bench` and llama.cpp's micro-batch) against 128: a 1024-token prompt
        arriving beside 4 decoding streams gets its first token in 7.4 s instead of 15.2 s, and the
        streams wait up to 3.9 s instead of 2.1 s for one token (gpt-oss-20b geometry at 8 layers, 2 threads,
        `benchmarks/server_prefill_chunk.py`)."""
        self.model = model
        self.context = model.config.max_context if context is None else context
        if max_batch < 1 or self.context < 2:
            raise GptossError(f"the engine needs at least one slot and a context of 2 tokens, got max_batch "
                              f"{max_batch} and context {self.context}")
        self.chunk = chunk
        self.cache = KVCache(model.config, max_batch, self.context, chunk=chunk, dtype=model.dtype,
                             device=model.device)
        self.slots: list[Generation | None] = [None] * max_batch
        self._waiting: collections.deque[Generation] = collections.deque()
        self._wakeup = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="gptoss-engine", daemon=True)

    @property
    def max_batch(self) -> int:
        return len(self.slots)

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
        """Queues `generation` for a slot; its tokens then arrive through `generation.tokens()`."""
        if len(generation.prompt) + generation.max_new_tokens > self.context:
            raise ContextError(f"prompt of {len(generation.prompt)} tokens plus {generation.max_new_tokens} new tokens "
                               f"exceeds the server's context of {self.context}")
        with self._wakeup:
            if self._closed:
                raise EngineError("the engine is shut down")
            self._waiting.append(generation)
            self._wakeup.notify()
        return generation

    def busy_slots(self) -> int:
        return sum(r is not None for r in self.slots)

    # --- the scheduler thread -------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while self._next_step_ready():
                self._free_cancelled()
                self._admit()
                for i, generation in enumerate(self.slots):
                    if generation is not None and generation.prefilled < len(generation.prompt):
                        self._guarded([i], self._prefill_chunk)
                decoding = [i for i, r in enumerate(self.slots) if r is not None and r.generated]
                if decoding:
                    self._guarded(decoding, self._decode)
        for generation in [*self._waiting, *filter(None, self.slots)]:
            generation._deliver(_Finished("cancelled", EngineError("the server is shutting down")))

    def _next_step_ready(self) -> bool:
        """Sleeps until there is work (a waiting generation, a busy slot) or a close; False on close."""
        with self._wakeup:
            self._wakeup.wait_for(lambda: self._closed or self._waiting or self.busy_slots())
            return not self._closed

    def _free_cancelled(self) -> None:
        for i, generation in enumerate(self.slots):
            if generation is not None and generation.cancelled:
                self._finish(i, "cancelled")
        with self._wakeup:
            cancelled = [r for r in self._waiting if r.cancelled]
            self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
        for generation in cancelled:  # a consumer still reading tokens() learns it ended
            generation._deliver(_Finished("cancelled"))

    def _admit(self) -> None:
        """Moves waiting generations into free slots (their rows were reset when the slot was freed)."""
        with self._wakeup:
            for i, generation in enumerate(self.slots):
                if generation is None and self._waiting:
                    self.slots[i] = admitted = self._waiting.popleft()
                    admitted.generator = admitted.params.generator(self.model.device)

    def _prefill_chunk(self, slots: list[int]) -> None:
        """The next chunk of slot i's prompt, alone in its own row; the first new token once it is all in."""
        (i,) = slots
        generation = self.slots[i]
        start = generation.prefilled
        ids = torch.tensor([generation.prompt[start:start + self.chunk]], device=self.model.device)
        positions = torch.arange(start, start + ids.shape[1], device=self.model.device)[None]
        logits = self.model(ids, positions, cache=self.cache.rows(i, i + 1), last_only=True)
        generation.prefilled += ids.shape[1]
        if generation.prefilled == len(generation.prompt):
            self._accept(i, sample(logits[:, -1], generation.params, generation.generator))

    def _decode(self, slots: list[int]) -> None:
        """One new token for each of `slots`; idle rows among them are padding (position -1)."""
        rows = max(slots) + 1  # rows after the last decoding one are left out altogether
        ids = torch.zeros(rows, 1, dtype=torch.long)
        positions = torch.full((rows, 1), -1, dtype=torch.long)
        for i in slots:
            generation = self.slots[i]
            ids[i, 0] = generation.generated[-1]
            positions[i, 0] = len(generation.prompt) + len(generation.generated) - 1
        device = self.model.device
        logits = self.model(ids.to(device), positions.to(device), cache=self.cache.rows(0, rows), last_only=True)
        for i in slots:
            generation = self.slots[i]
            self._accept(i, sample(logits[i:i + 1, -1], generation.params, generation.generator))

    def _accept(self, i: int, token: torch.Tensor) -> None:
        """Hands a new token to slot i's generation; frees the slot if that ends it."""
        generation = self.slots[i]
        token = int(token)
        generation.generated.append(token)
        generation._deliver(token)
        if reason := generation.stop_rule.finish_reason(token, len(generation.generated)):
            self._finish(i, reason)

    def _finish(self, i: int, reason: str, error: Exception | None = None) -> None:
        """Ends slot i's generation and resets its row at once, so the slot can take the next generation."""
        generation, self.slots[i] = self.slots[i], None
        self.cache.rows(i, i + 1).reset()
        generation._deliver(_Finished(reason, error))  # after the reset: a finished generation holds no cache

    def _guarded(self, slots: list[int], step) -> None:
        """Runs step(slots); if it raises, those generations fail with the error and the engine goes on."""
        try:
            step(slots)
        except Exception as e:  # a bug or out of memory: report it to the clients rather than hang them
            for i in slots:
                if self.slots[i] is not None:
                    self._finish(i, "error", e)
