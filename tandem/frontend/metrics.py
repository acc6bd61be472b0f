"""Prometheus metrics of one frontend app, in the app's own registry.

A registry per app (not the process-global default) lets several apps live in one process,
as they do in tests and when one process serves several models. Engine load figures are read
from `engine.stats()` at scrape time by a custom collector, so they are never stale and cost
nothing between scrapes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tandem.protocol import LoadStats

PREFIX = "tandem"
_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
# Paths counted under their own label; anything else is "other", to bound label cardinality.
KNOWN_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}
)


class EngineStatsCollector(Collector):
    """Exposes the engine's load figures, read when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], LoadStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        try:
            s = self._stats()
        except Exception:  # a dead engine must not break the scrape
            return
        gauges = [
            ("num_requests_running", "Sequences the engine is running.", s.num_running),
            ("num_requests_waiting", "Sequences waiting for admission.", s.num_waiting),
            ("kv_cache_usage_ratio", "Fraction of KV blocks in use.", s.kv_usage),
            ("kv_blocks_active", "KV blocks referenced by running sequences.", s.active_blocks),
            ("kv_blocks_free", "KV blocks free or evictable.", s.free_blocks),
            ("kv_blocks_total", "KV blocks in the engine's pool.", s.total_blocks),
            ("queued_prefill_tokens", "Prompt tokens still to prefill.", s.queued_prefill_tokens),
            (
                "prefix_cache_hit_rate",
                "Prefix-cache hits over queries since the engine started.",
                s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0,
            ),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        yield CounterMetricFamily(
            f"{PREFIX}_prefix_cache_queries",
            "Prefix-cache block lookups.",
            value=s.prefix_cache_queries,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_prefix_cache_hits", "Prefix-cache block hits.", value=s.prefix_cache_hits
        )
        counters = [
            ("kv_imports", "Requests whose prompt KV arrived from a prefill worker.", s.kv_imports),
            (
                "kv_import_fallbacks",
                "KV transfers that failed, so the decode worker computed the prompt itself.",
                s.kv_import_fallbacks,
            ),
            (
                "kv_exports_expired",
                "Exported KV freed by its deadline: no decode worker confirmed it.",
                s.kv_exports_expired,
            ),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        hits = CounterMetricFamily(f"{PREFIX}_kv_tier_hits", "KV blocks loaded back from a tier"
                                   " below the device (host, disk).", labels=["tier"])  # fmt: skip
        hits.add_metric(["host"], s.kv_host_hits)
        hits.add_metric(["disk"], s.kv_disk_hits)
        yield hits
        yield CounterMetricFamily(
            f"{PREFIX}_kv_tier_load_failures",
            "Disk KV blocks refused (corrupt or unreadable) and recomputed.",
            value=s.kv_tier_load_failures,
        )


class FrontendMetrics:
    """Request-level metrics the frontend records itself."""

    def __init__(self, stats: Callable[[], LoadStats]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "HTTP requests by endpoint and status code.",
            ["endpoint", "status"],
            registry=r,
        )
        self.finished = Counter(
            f"{PREFIX}_request_finished",
            "Finished choices by finish reason.",
            ["finish_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one sequence.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds",
            "Time from request arrival to its last token.",
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of admitted requests.", registry=r
        )
        self.generation_tokens = Counter(
            f"{PREFIX}_generation_tokens", "Tokens generated for clients.", registry=r
        )
        self.inflight = Gauge(
            f"{PREFIX}_frontend_requests_inflight",
            "Generation requests this frontend is serving.",
            registry=r,
        )
        self.inflight_limit = Gauge(
            f"{PREFIX}_admission_inflight_limit",
            "Sequences admission lets in flight now (it adapts to keep time to first token"
            " near its unloaded figure).",
            registry=r,
        )
        self.rejected = Counter(
            f"{PREFIX}_requests_rejected",
            "Requests refused before reaching the engine, by reason: overloaded (503) or"
            " rate_limited (429).",
            ["reason"],
            registry=r,
        )
        r.register(EngineStatsCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestCounterMiddleware:
    """Counts every HTTP response by endpoint and status, errors and refusals included."""

    def __init__(self, app: ASGIApp, metrics: FrontendMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in KNOWN_PATHS else "other"
        status = 500

        async def send_and_count(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()


class RequestTimer:
    """Latency bookkeeping of one API request: TTFT once, ITL per sequence, E2E at the end."""

    def __init__(self, metrics: FrontendMetrics, arrival: float | None = None) -> None:
        self._m = metrics
        self.arrival = arrival if arrival is not None else time.perf_counter()
        self.first_token: float | None = None
        self._last: dict[int, float] = {}

    def on_tokens(self, index: int, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
            self._m.ttft.observe(now - self.arrival)
        last = self._last.get(index)
        if last is not None:
            gap = (now - last) / num_tokens
            for _ in range(num_tokens):
                self._m.itl.observe(gap)
        self._last[index] = now
        self._m.generation_tokens.inc(num_tokens)

    def on_finish(self) -> None:
        self._m.e2e.observe(time.perf_counter() - self.arrival)


class MigrationCollector(Collector):
    """`tandem_migrations_total`, read from the remote engine at scrape time."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "tandem_migrations",
            "Times a request moved to another worker after its worker was lost mid-stream.",
        )
        family.add_metric([], self._engine.migrations)
        yield family


class PlannerCollector(Collector):
    """The SLA planner's last decision: `tandem_planner_replicas{pool}` and the request rate
    it observed and forecast (nothing before a planner has reported)."""

    def __init__(self, follower) -> None:
        self._follower = follower

    def collect(self) -> Iterator[Metric]:
        report = self._follower.last
        if report is None:
            return
        replicas = GaugeMetricFamily(
            f"{PREFIX}_planner_replicas", "Workers the planner asks for, by pool.", labels=["pool"]
        )
        if report.aggregated:
            replicas.add_metric(["aggregated"], report.decode_replicas)
        else:
            replicas.add_metric(["prefill"], report.prefill_replicas)
            replicas.add_metric(["decode"], report.decode_replicas)
        yield replicas
        rate = GaugeMetricFamily(
            f"{PREFIX}_planner_request_rate",
            "Requests a second: observed over the planner's last interval, and the forecast"
            " it sized the pools for.",
            labels=["kind"],
        )
        rate.add_metric(["observed"], report.observed_rate)
        if report.forecast_rate is not None:
            rate.add_metric(["forecast"], report.forecast_rate)
        yield rate
