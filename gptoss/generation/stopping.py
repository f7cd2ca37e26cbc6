"""When a generation ends: the one rule that `stream_batch` and the server's engine both follow."""

from __future__ import annotations

from collections.abc import Iterable

from gptoss.generation.cache import ContextError


class StopRule:
    """A generation ends after a stop token (which is kept as its last token) or after `max_new_tokens`."""

    def __init__(self, max_new_tokens: int, stop_tokens: Iterable[int] = ()):
        if max_new_tokens < 0:
            raise ContextError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        self.max_new_tokens, self.stop_tokens = max_new_tokens, frozenset(stop_tokens)

    def finish_reason(self, token: int, count: int) -> str | None:
        """Why the generation ends with `token`, its `count`-th new token: "stop", "length", or None (it goes on)."""
        if token in self.stop_tokens:
            return "stop"
        return "length" if count >= self.max_new_tokens else None
