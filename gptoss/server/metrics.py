"""/metrics: the engine's figures in Prometheus' text format, read from `Engine.stats()` at each scrape."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from gptoss.server.engine import RATE_WINDOW_S, Engine


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
