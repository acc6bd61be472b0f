"""Reporting: the summary table, the JSON results file, and `compare`.

The JSON file holds `config`, `summary` and one `records` entry per request
(one per line, so a large run stays greppable); `compare` reads only the
summaries, so it also works on files from other versions of this tool.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import msgspec

from tandem.bench.records import RequestRecord

_LATENCIES = (("ttft_ms", "TTFT"), ("itl_ms", "ITL"), ("tpot_ms", "TPOT"), ("e2e_ms", "E2E"))
_COLUMNS = ("mean", "p50", "p90", "p99", "max")


def _num(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, int):
        return str(x)
    return f"{x:,.{digits}f}"


def _config_lines(cfg: dict[str, Any]) -> list[str]:
    wl = cfg.get("workload", {})
    wl_desc = ", ".join(f"{k} {v}" for k, v in wl.items() if k != "name" and v not in (None, []))
    arr = cfg.get("arrival", {})
    kind = arr.get("kind", "?")
    arr_desc = {
        "concurrency": f"concurrency {arr.get('concurrency')}",
        "poisson": f"Poisson {arr.get('rate')} req/s",
        "trace": "trace timestamps",
    }.get(kind, kind)
    if kind != "concurrency" and arr.get("max_concurrency"):
        arr_desc += f" (max {arr['max_concurrency']} in flight)"
    bounds = cfg.get("bounds", {})
    n = bounds.get("num_requests")
    return [
        f"target     {cfg.get('base_url')} · {cfg.get('api')} ({cfg.get('prompt_format')}) · "
        f"model {cfg.get('model')}",
        f"workload   {wl.get('name')}: {wl_desc}",
        f"arrival    {arr_desc} · bounds {n if n is not None else '∞'} requests, "
        f"{bounds.get('duration_s')} s",
    ]


def format_summary(summary: dict[str, Any], config: dict[str, Any] | None = None) -> str:
    """The human-readable table printed at the end of a run."""
    lines = ["", "=" * 27 + " tandem bench " + "=" * 27]
    if config:
        lines += _config_lines(config)
    req = summary["requests"]
    errors = ", ".join(f"{k}: {v}" for k, v in req.get("errors", {}).items())
    lines.append(
        f"requests   sent {req['sent']} · completed {req['completed']} · "
        f"failed {req['failed']}{f' ({errors})' if errors else ''} · "
        f"cancelled at the end {req['cancelled']}"
    )
    lines.append(f"elapsed    {_num(summary['elapsed_s'])} s")
    lines.append(
        f"throughput {_num(summary['request_throughput'])} req/s · "
        f"{_num(summary['output_token_throughput'], 1)} output tok/s · "
        f"{_num(summary['input_token_throughput'], 1)} input tok/s"
    )
    gp = summary.get("goodput")
    if gp:
        targets = []
        if gp.get("ttft_slo_ms") is not None:
            targets.append(f"TTFT ≤ {gp['ttft_slo_ms']:g} ms")
        if gp.get("itl_slo_ms") is not None:
            targets.append(f"{gp['itl_stat']} ITL ≤ {gp['itl_slo_ms']:g} ms")
        frac = gp.get("fraction")
        lines.append(
            f"goodput    {_num(gp['requests_per_s'])} req/s "
            f"({gp['good_requests']} requests, {_num(None if frac is None else frac * 100, 1)}%)"
            f" with {' and '.join(targets)}"
        )
    cached = summary.get("cached_tokens")
    if cached:
        frac = cached.get("fraction_of_input")
        lines.append(
            f"cached     {_num(None if frac is None else frac * 100, 1)}% of input tokens "
            f"({cached['cached']} tokens, reported on {cached['reported_requests']} requests)"
        )
    lag = summary.get("dispatch_lag_ms")
    if lag and lag.get("count"):
        lines.append(
            f"send lag   p50 {_num(lag['p50'])} ms · max {_num(lag['max'])} ms "
            "(actual minus scheduled send time)"
        )
    lines.append("")
    lines.append(f"{'':<11}" + "".join(f"{c:>11}" for c in _COLUMNS) + f"{'n':>9}")
    for key, label in _LATENCIES:
        d = summary.get(key) or {}
        row = "".join(f"{_num(d.get(c)):>11}" for c in _COLUMNS)
        lines.append(f"{label + ' (ms)':<11}{row}{d.get('count', 0):>9}")
    lines.append("=" * 68)
    return "\n".join(lines)


def write_results(
    path: str | Path,
    config: dict[str, Any],
    summary: dict[str, Any],
    records: list[RequestRecord],
) -> Path:
    """Write the results JSON (NaN becomes null); creates parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    enc = msgspec.json.Encoder()

    def pretty(obj: Any) -> bytes:
        return msgspec.json.format(enc.encode(obj), indent=2)

    with open(path, "wb") as f:
        f.write(b'{\n"config": ' + pretty(config) + b',\n"summary": ' + pretty(summary))
        f.write(b',\n"records": [\n')
        f.write(b",\n".join(enc.encode(r.to_dict()) for r in records))
        f.write(b"\n]}\n")
    return path


def load_results(path: str | Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return msgspec.json.decode(f.read())


def _get(summary: dict[str, Any], dotted: str) -> float | None:
    cur: Any = summary
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur if isinstance(cur, int | float) else None


_COMPARE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("requests completed", "requests.completed", "higher"),
    ("requests failed", "requests.failed", "lower"),
    ("requests cancelled", "requests.cancelled", "lower"),
    ("request throughput (req/s)", "request_throughput", "higher"),
    ("output throughput (tok/s)", "output_token_throughput", "higher"),
    ("input throughput (tok/s)", "input_token_throughput", "higher"),
    ("goodput (req/s)", "goodput.requests_per_s", "higher"),
    ("cached fraction of input", "cached_tokens.fraction_of_input", "higher"),
    *(
        (f"{label} {stat} (ms)", f"{key}.{stat}", "lower")
        for key, label in _LATENCIES
        for stat in ("mean", "p50", "p90", "p99")
    ),
)


def compare(a: str | Path | dict[str, Any], b: str | Path | dict[str, Any]) -> str:
    """Both runs side by side with B/A ratios; returns the table (the CLI prints it)."""
    runs = []
    for x in (a, b):
        data = load_results(x) if not isinstance(x, dict) else x
        label = (data.get("config") or {}).get("label") or (
            Path(x).stem if not isinstance(x, dict) else "?"
        )
        runs.append((label, data.get("summary") or {}))
    (la, sa), (lb, sb) = runs
    w = 30
    lines = [
        f"A: {la}",
        f"B: {lb}",
        "",
        f"{'metric':<{w}}{'A':>14}{'B':>14}{'B/A':>9}  better",
    ]
    for name, key, better in _COMPARE_ROWS:
        va, vb = _get(sa, key), _get(sb, key)
        if va is None and vb is None:
            continue
        ratio = "-"
        if va is not None and vb is not None and va != 0 and not math.isnan(va):
            r = vb / va
            ratio = "-" if math.isnan(r) else f"{r:.3f}"
        lines.append(f"{name:<{w}}{_num(va):>14}{_num(vb):>14}{ratio:>9}  {better}")
    return "\n".join(lines)
