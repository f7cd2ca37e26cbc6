"""Rank 0 drives, the other ranks follow: every rank runs the same forward passes of a split model.

Rank 0 runs the command as one process would (generate, chat, bench, or the server's engine thread),
through a `Driver` in place of the model: before each forward pass it broadcasts one `Step` (the token
ids, the positions, and the cache's plan of the pass: which pool slots are written and read), then runs
its part. The other ranks run `follow`: receive a step, run the same pass on their part of the model
and their own pool (the same pages, their KV heads only), until rank 0 sends STOP. Each pass's
collectives then meet in the same order on every rank.

An idle driver (a server waiting for requests) sends a KEEPALIVE every `KEEPALIVE_S`, so that a
follower's wait for the next step can have a timeout: a rank 0 that died is noticed within the
collective timeout. A driver that loses a follower prints one line and ends the process (a server
cannot go on with part of its model).
"""

from __future__ import annotations

import atexit
import itertools
import os
import signal
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field

import torch

from gptoss.distributed import DistributedError, Parallel
from gptoss.generation.cache import KVCache, PagedBatch
from gptoss.model.transformer import Transformer

KEEPALIVE_S = 5.0
STOP, KEEPALIVE = "stop", "keepalive"


@dataclass
class Step:
    """One forward pass, as rank 0 makes it. cache: (id, pages, page size) of rank 0's pool, whose plan
    (`PagedBatch.plan`) the pass follows; None for a pass without cache. freed: ids of pools rank 0 let go."""

    input_ids: torch.Tensor
    positions: torch.Tensor | None
    last_only: bool
    cache: tuple[int, int, int] | None = None
    plan: dict | None = None
    freed: list[int] = field(default_factory=list)


class Driver:
    """A split model as rank 0 calls it: each call is broadcast to the followers, then computed. Every
    other attribute is the model's."""

    def __init__(self, model: Transformer, parallel: Parallel):
        self.model, self.parallel = model, parallel
        self._lock = threading.Lock()          # a step and its collectives go out whole, from any thread
        self._ids: weakref.WeakKeyDictionary[KVCache, int] = weakref.WeakKeyDictionary()
        self._next_id, self._freed = itertools.count(), []
        self._last_sent, self._stopped = time.monotonic(), False
        threading.Thread(target=self._keep_alive, name="gptoss-keepalive", daemon=True).start()
        atexit.register(self.stop)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: PagedBatch | None = None,
                 last_only: bool = False) -> torch.Tensor:
        step = Step(input_ids, positions, last_only)
        if cache is not None:
            step.positions = positions if positions is not None else cache.next_positions(input_ids.shape[1])
            cache.begin(step.positions)
            pool = cache.cache
            step.cache, step.plan = (self._pool_id(pool), pool.num_pages, pool.page_size), cache.plan()
        with self._lock:
            step.freed, self._freed = self._freed, []
            self._send(step)
            try:
                return self.model(input_ids, step.positions, cache, last_only)
            except DistributedError as e:
                self._abort(e)

    def stop(self) -> None:
        """Tells the followers that the job is over (once; also at exit)."""
        with self._lock:
            if not self._stopped:
                self._send(STOP)
                self._stopped = True
                self.parallel.close()

    def _pool_id(self, pool: KVCache) -> int:
        if pool not in self._ids:
            self._ids[pool] = pool_id = next(self._next_id)
            weakref.finalize(pool, self._freed.append, pool_id)
        return self._ids[pool]

    def _send(self, message) -> None:
        try:
            self.parallel.broadcast_object(message)
        except DistributedError as e:
            self._abort(e)
        self._last_sent = time.monotonic()

    def _keep_alive(self) -> None:
        while not self._stopped:
            time.sleep(KEEPALIVE_S / 5)
            if time.monotonic() - self._last_sent > KEEPALIVE_S and self._lock.acquire(blocking=False):
                try:
                    if not self._stopped:
                        self._send(KEEPALIVE)
                finally:
                    self._lock.release()

    def _abort(self, error: DistributedError):
        """The job cannot go on without the lost rank: one line, and this process ends (from any thread)."""
        print(f"gptoss: error: {error}", file=sys.stderr, flush=True)
        os._exit(1)


@torch.inference_mode()
def follow(model: Transformer, parallel: Parallel) -> None:
    """A follower's loop: the passes rank 0 broadcasts, on this rank's part of the model, until STOP.
    SIGTERM (torchrun passes a Ctrl-C or a stop on to every rank) is left to rank 0, which drains its
    requests and then stops the followers; a lost rank 0 ends the loop with a DistributedError."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pools: dict[int, KVCache] = {}
    while (step := parallel.broadcast_object()) != STOP:
        if step == KEEPALIVE:
            continue
        for pool_id in step.freed:
            pools.pop(pool_id, None)
        batch = None
        if step.cache is not None:
            pool_id, pages, page_size = step.cache
            if pool_id not in pools:
                pools[pool_id] = KVCache(model.config, pages, page_size, dtype=model.dtype, device=model.device,
                                         prefix_reuse=False, kv_heads=model.kv_heads)
            batch = PagedBatch.replay(pools[pool_id], step.plan)
        model(step.input_ids.to(model.device), step.positions, batch, step.last_only)
