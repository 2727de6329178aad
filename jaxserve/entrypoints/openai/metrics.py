"""Prometheus metrics for GET /metrics, with vLLM's names under the `jaxserve:` prefix.

One `ServerMetrics` per app owns its own `CollectorRegistry`. Engine-wide numbers (running
and waiting requests, KV cache usage, prefix cache, preemptions, tokens, compilations) are
read at scrape time from the stats the engine thread publishes; per-request latencies
(TTFT, inter-token, end-to-end) and successes by finish reason arrive as an EngineObserver.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_PREFIX = "jaxserve:"
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                50.0, 60.0, 120.0, 240.0, 480.0, 960.0)
# (name, kind, stats key, help) of what the engine's get_stats() reports.
_ENGINE_METRICS = (
    ("num_requests_running", "gauge", "num_running", "Requests in the running batch."),
    ("num_requests_waiting", "gauge", "num_waiting", "Requests waiting to be scheduled."),
    ("kv_cache_usage_perc", "gauge", "kv_cache_usage",
     "Fraction of KV cache blocks in use (1 = full)."),
    ("prefix_cache_queries", "counter", "prefix_cache_queries",
     "Prefix cache lookups, in tokens."),
    ("prefix_cache_hits", "counter", "prefix_cache_hits", "Prefix cache hits, in tokens."),
    ("num_preemptions", "counter", "num_preemptions", "Requests preempted (recompute)."),
    ("prompt_tokens", "counter", "prompt_tokens", "Prompt tokens received."),
    ("generation_tokens", "counter", "generation_tokens", "Tokens generated."),
    ("num_compilations", "counter", "num_compilations", "XLA compilations, warm-up included."),
    ("num_compilations_after_warm_up", "counter", "num_compilations_after_warm_up",
     "XLA compilations of steps (must stay 0: steps only run compiled programs)."),
    ("num_programs_compiled", "gauge", "num_programs_compiled",
     "Step programs compiled (the smallest buckets first)."),
    ("num_programs_pending", "gauge", "num_programs_pending",
     "Step programs still compiling in the background (their buckets wait)."),
)


class _EngineStatsCollector:
    """Turns the latest engine stats dict into metric families at scrape time."""

    def __init__(self, read_stats: Callable[[], dict], model_name: str):
        self._read_stats = read_stats
        self._model_name = model_name

    def collect(self):
        stats = self._read_stats()
        for name, kind, key, doc in _ENGINE_METRICS:
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
                _PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self._model_name], float(stats.get(key, 0)))
            yield family


class ServerMetrics:
    """The app's registry; also the AsyncEngine's observer (called from the engine thread)."""

    def __init__(self, read_stats: Callable[[], dict], model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineStatsCollector(read_stats, model_name))
        labels = dict(labelnames=["model_name"], registry=self.registry)
        self._ttft = Histogram(_PREFIX + "time_to_first_token_seconds",
                               "Time from arrival to the first output token.",
                               buckets=_TTFT_BUCKETS, **labels).labels(model_name)
        self._itl = Histogram(_PREFIX + "inter_token_latency_seconds",
                              "Time between two steps that gave a request tokens.",
                              buckets=_ITL_BUCKETS, **labels).labels(model_name)
        self._e2e = Histogram(_PREFIX + "e2e_request_latency_seconds",
                              "Time from arrival to the end of a request.",
                              buckets=_E2E_BUCKETS, **labels).labels(model_name)
        self._success = Counter(_PREFIX + "request_success",
                                "Finished samples by finish reason (stop, length, abort).",
                                labelnames=["model_name", "finished_reason"],
                                registry=self.registry)
        self._model_name = model_name
        for reason in ("stop", "length", "abort"):
            self._success.labels(model_name, reason)

    def on_first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def on_inter_token(self, seconds: float) -> None:
        self._itl.observe(seconds)

    def on_request_done(self, seconds: float, finish_reasons: list[str]) -> None:
        self._e2e.observe(seconds)
        for reason in finish_reasons:
            self._success.labels(self._model_name, reason or "abort").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
