"""PNG plots of a run: latency CDFs and throughput over time (matplotlib, Agg).

Imported only when plots are wanted, so `compare` and the tests that do not
plot never pay matplotlib's import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tandem.bench.records import RequestRecord

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def _cdf(ax: Axes, values_ms: list[float], label: str) -> None:
    import numpy as np

    if not values_ms:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    xs = np.sort(np.asarray(values_ms))
    ys = np.arange(1, len(xs) + 1) / len(xs)
    ax.plot(xs, ys, drawstyle="steps-post")
    for q in (0.5, 0.9, 0.99):
        ax.axhline(q, color="0.85", lw=0.8, zorder=0)
    ax.set_xlabel(f"{label} (ms)")
    ax.set_ylabel("fraction of " + ("requests" if label == "TTFT" else "tokens"))
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)


def write_plots(
    records: list[RequestRecord], elapsed_s: float, stem: str | Path, title: str = ""
) -> list[Path]:
    """Write `<stem>_cdf.png` and `<stem>_throughput.png`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    ok = [r for r in records if r.ok]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _cdf(axes[0], [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None], "TTFT")
    _cdf(axes[1], [x * 1e3 for r in ok for x in r.itl_s], "ITL")
    axes[0].set_title("time to first token")
    axes[1].set_title("inter-token latency")
    fig.suptitle(title)
    fig.tight_layout()
    cdf_path = stem.with_name(stem.name + "_cdf.png")
    fig.savefig(cdf_path, dpi=110)
    plt.close(fig)

    horizon = max(elapsed_s, 1e-3)
    width = max(horizon / 60, 0.05) if horizon < 60 else max(1.0, horizon / 120)
    edges = np.arange(0.0, horizon + width, width)
    token_times: list[float] = []
    for r in ok:
        if r.ttft_s is None:
            continue
        t = r.start_s + r.ttft_s
        token_times.append(t)
        token_times.extend((t + np.cumsum(r.itl_s)).tolist() if r.itl_s else [])
    done_times = [r.start_s + r.e2e_s for r in ok if r.e2e_s is not None]
    tok_hist, _ = np.histogram(token_times, bins=edges)
    req_hist, _ = np.histogram(done_times, bins=edges)
    # Requests in flight at each bin's midpoint.
    mids = (edges[:-1] + edges[1:]) / 2
    starts = np.sort([r.start_s for r in records])
    ends = np.sort([r.start_s + (r.e2e_s if r.e2e_s is not None else horizon) for r in records])
    inflight = np.searchsorted(starts, mids) - np.searchsorted(ends, mids)

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    ax1.step(edges[:-1], tok_hist / width, where="post")
    ax1.set_ylabel("output tokens/s")
    ax1.grid(alpha=0.3)
    ax2.step(edges[:-1], req_hist / width, where="post", label="completed req/s")
    ax2.plot(mids, inflight, color="tab:orange", label="in flight")
    ax2.set_xlabel("time since start (s)")
    ax2.set_ylabel("requests")
    ax2.legend(loc="upper right")
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    tp_path = stem.with_name(stem.name + "_throughput.png")
    fig.savefig(tp_path, dpi=110)
    plt.close(fig)
    return [cdf_path, tp_path]
