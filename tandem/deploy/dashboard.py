"""What `tandem deploy render` writes for monitoring: a Grafana dashboard over the frontends'
Prometheus metrics (every worker's figures reach the frontends, so one scrape target kind
suffices) and the Prometheus scrape config that finds them by their pod annotations.

Each frontend exports the whole fleet's engine figures (queues, KV usage, prefix hits), so
those take `max` across frontends; what each frontend counts itself (requests, tokens,
routing, migrations) takes `sum`."""

from __future__ import annotations

from typing import Any


def _quantile(q: float, histogram: str) -> str:
    return f"histogram_quantile({q}, sum(rate({histogram}_bucket[1m])) by (le))"


#: (panel title, unit, PromQL queries): what an operator watches, in that order.
PANELS: list[tuple[str, str, list[str]]] = [
    (
        "Time to first token (p50, p90, p99)",
        "s",
        [
            _quantile(q, "tandem_time_to_first_token_seconds") for q in (0.5, 0.9, 0.99)
        ],
    ),
    (
        "Inter-token latency (p50, p90, p99)",
        "s",
        [
            _quantile(q, "tandem_inter_token_latency_seconds") for q in (0.5, 0.9, 0.99)
        ],
    ),
    (
        "Throughput (tokens/s)",
        "short",
        [
            "sum(rate(tandem_generation_tokens_total[1m]))",
            "sum(rate(tandem_prompt_tokens_total[1m]))",
        ],
    ),
    (
        "Requests/s by status",
        "reqps",
        [
            "sum(rate(tandem_requests_total[1m])) by (status)",
            "sum(rate(tandem_requests_rejected_total[1m])) by (reason)",
        ],
    ),
    (
        "Queue: running and waiting sequences",
        "short",
        [
            "max(tandem_num_requests_running)",
            "max(tandem_num_requests_waiting)",
            "sum(tandem_frontend_requests_inflight)",
            "max(tandem_queued_prefill_tokens)",
        ],
    ),
    ("KV cache usage", "percentunit", ["max(tandem_kv_cache_usage_ratio)"]),
    (
        "Prefix-cache and KV tier hit rate",
        "percentunit",
        [
            "max(rate(tandem_prefix_cache_hits_total[5m]))"
            " / max(rate(tandem_prefix_cache_queries_total[5m]))",
            "max(rate(tandem_kv_tier_hits_total[5m])) by (tier) / ignoring(tier) group_left"
            " max(rate(tandem_prefix_cache_queries_total[5m]))",
        ],
    ),
    (
        "Router decisions and overlap",
        "short",
        [
            "sum(rate(tandem_router_decisions_total[1m])) by (policy)",
            "avg(tandem_router_overlap_ratio)",
        ],
    ),
    (
        "Disaggregation paths and fallbacks",
        "reqps",
        [
            "sum(rate(tandem_disagg_requests_total[1m])) by (path)",
            "sum(rate(tandem_disagg_fallbacks_total[1m])) by (reason)",
            "max(rate(tandem_kv_import_fallbacks_total[1m]))",
        ],
    ),
    ("Migrations", "short", ["sum(rate(tandem_migrations_total[5m]))"]),
    (
        "Planner: replicas and request rate",
        "short",
        ["max(tandem_planner_replicas) by (pool)", "max(tandem_planner_request_rate) by (kind)"],
    ),
]


def dashboard(title: str) -> dict[str, Any]:
    """A Grafana dashboard (schema 39) with one time-series panel per entry of PANELS, two
    panels a row, over a `datasource` variable."""
    panels = []
    for i, (name, unit, queries) in enumerate(PANELS):
        panels.append(
            {
                "id": i + 1,
                "type": "timeseries",
                "title": name,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [
                    {"refId": chr(ord("A") + j), "expr": q, "legendFormat": "__auto"}
                    for j, q in enumerate(queries)
                ],
            }
        )
    return {
        "title": title,
        "uid": f"tandem-{title}"[:40],
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "panels": panels,
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "type": "datasource",
                    "query": "prometheus",
                    "label": "Prometheus",
                }
            ]
        },
    }


def scrape_config(namespace: str) -> dict[str, Any]:
    """Prometheus: scrape the pods of `namespace` annotated `prometheus.io/scrape: "true"`, at
    their `prometheus.io/port` and `prometheus.io/path`."""
    keep = {
        "source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"],
        "action": "keep",
        "regex": "true",
    }
    address = {
        "source_labels": ["__address__", "__meta_kubernetes_pod_annotation_prometheus_io_port"],
        "action": "replace",
        "regex": r"([^:]+)(?::\d+)?;(\d+)",
        "replacement": "$1:$2",
        "target_label": "__address__",
    }
    path = {
        "source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_path"],
        "action": "replace",
        "regex": "(.+)",
        "target_label": "__metrics_path__",
    }
    pod = {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"}
    return {
        "scrape_configs": [
            {
                "job_name": "tandem",
                "scrape_interval": "15s",
                "kubernetes_sd_configs": [{"role": "pod", "namespaces": {"names": [namespace]}}],
                "relabel_configs": [keep, address, path, pod],
            }
        ]
    }
