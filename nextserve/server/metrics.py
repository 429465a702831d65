"""Prometheus metrics of one server, named `nextserve:*`, in a registry the app owns.

Two sources. Engine-wide numbers (queue lengths, cache occupancy, cumulative token and preemption counts) are read
from `engine.stats()` when /metrics is scraped; for `AsyncEngine` that returns the snapshot its engine thread last
published, so a scrape, which runs on the HTTP side, never walks structures the engine thread is mutating.
Latencies are observed by the server itself as outputs stream past (`RequestTimer`): time to first token, the gap
between token-bearing steps, end-to-end latency, and one `request_success_total{finish_reason}` per finished sequence
(aborted ones are not successes).

A private `CollectorRegistry` (not prometheus_client's global one) lets several apps live in one test process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from nextserve.outputs import RequestOutput

PREFIX = "nextserve:"

# (metric name, engine.stats() key, help); gauges are point-in-time values.
_GAUGES = [
    ("num_requests_running", "num_running", "Requests in the running batch"),
    ("num_requests_waiting", "num_waiting", "Requests waiting to be scheduled"),
    ("kv_pages_used", "kv_pages_used", "KV-cache pages in use by requests"),
    ("kv_pages_cached", "kv_pages_cached", "KV-cache pages held only by the prefix cache (evictable)"),
    ("kv_pages_total", "kv_pages_total", "KV-cache pages in the pool"),
    ("state_slots_used", "state_slots_used", "Recurrent-state slots in use by requests"),
    ("state_slots_total", "state_slots_total", "Recurrent-state slots for requests"),
    ("prefix_cache_snapshots", "prefix_cache_snapshots", "State snapshots held by the prefix cache"),
    ("spec_mean_acceptance_length", "spec_mean_acceptance_length", "Tokens committed per speculative verify step"),
    ("spec_num_draft_tokens", "spec_num_draft_tokens_chosen", "Draft tokens per step chosen by the adaptive policy"),
]
# Counters are cumulative in the engine; prometheus adds the `_total` suffix to these names.
_COUNTERS = [
    ("prompt_tokens", "prompt_tokens_total", "Prompt tokens processed"),
    ("generation_tokens", "generation_tokens_total", "Tokens generated"),
    ("num_preemptions", "num_preemptions", "Sequences preempted (cumulative)"),
    ("prefix_cache_queries", "prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache"),
    ("prefix_cache_hits", "prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache"),
    ("prefix_cache_snapshot_evictions", "prefix_cache_snapshot_evictions", "Prefix-cache snapshots evicted"),
    ("spec_draft_tokens", "spec_draft_tokens", "Draft tokens proposed by the MTP head"),
    ("spec_accepted_tokens", "spec_accepted_tokens", "Draft tokens accepted by verification"),
]

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class _EngineStatsCollector:
    """Turns one `engine.stats()` call per scrape into gauge and counter families."""

    def __init__(self, stats: Callable[[], dict[str, float]]) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []  # no describe-time call into the engine

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        for name, key, help_ in _GAUGES:
            yield GaugeMetricFamily(PREFIX + name, help_, value=float(stats.get(key, 0)))
        for name, key, help_ in _COUNTERS:
            yield CounterMetricFamily(PREFIX + name, help_, value=float(stats.get(key, 0)))
        per_position = GaugeMetricFamily(
            PREFIX + "spec_acceptance_rate", "Speculative acceptance rate by draft position", labels=["position"]
        )
        for key, value in stats.items():
            if key.startswith("spec_acceptance_rate_pos"):
                per_position.add_metric([key.removeprefix("spec_acceptance_rate_pos")], float(value))
        yield per_position


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], dict[str, float]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(engine_stats))
        self.request_success = Counter(
            PREFIX + "request_success", "Finished sequences by finish reason", ["finish_reason"],
            registry=self.registry,
        )  # fmt: skip
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds", "Time from request arrival to its first token",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds", "Time between consecutive token-bearing outputs",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.e2e_request_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Time from request arrival to its last output",
            buckets=_E2E_BUCKETS, registry=self.registry,
        )  # fmt: skip

    def timer(self) -> RequestTimer:
        return RequestTimer(self)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """Latency bookkeeping of one engine request; `observe` every output in arrival order."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._m = metrics
        self._start = time.monotonic()
        self._last: float | None = None
        self._tokens = 0

    def observe(self, out: RequestOutput) -> None:
        now = time.monotonic()
        tokens = sum(len(o.token_ids) for o in out.outputs)
        if tokens > self._tokens:
            if self._last is None:
                self._m.time_to_first_token.observe(now - self._start)
            else:
                self._m.inter_token_latency.observe(now - self._last)
            self._last = now
            self._tokens = tokens
        if out.finished:
            self._m.e2e_request_latency.observe(now - self._start)
            for o in out.outputs:
                if o.finish_reason not in (None, "abort"):
                    self._m.request_success.labels(finish_reason=o.finish_reason).inc()
