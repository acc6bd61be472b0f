"""How long one engine step takes, as a function of what the step computes."""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Protocol


class PerfModel(Protocol):
    def prefill_ms(self, tokens: int) -> float:
        """A step computing `tokens` uncached prompt tokens (summed over the batch)."""

    def decode_ms(self, batch: int, context_tokens: int, kv_usage: float) -> float:
        """A step decoding `batch` sequences holding `context_tokens` KV tokens in all."""


class PolynomialPerfModel:
    """The public Dynamo mocker's default fit: prefill by uncached tokens, decode by KV usage."""

    def prefill_ms(self, tokens: int) -> float:
        return 4.209989e-7 * tokens**2 + 0.01518344 * tokens + 16.50142

    def decode_ms(self, batch: int, context_tokens: int, kv_usage: float) -> float:
        p = kv_usage
        return max(1.0, -25.74 * p**2 + 54.01 * p + 5.74)


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear through the points, extended linearly past both ends."""
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


class ProfilePerfModel:
    """Step times measured on a real engine (`tandem profile`), interpolated between points.

    File format (JSON): {"prefill": [[tokens, ms], ...],
                         "decode": [[batch, context_per_seq, ms], ...]}
    Decode points form a grid; between batch sizes and between context lengths the time is
    interpolated linearly (first over context at each batch size, then over batch size).
    """

    def __init__(self, prefill: list[list[float]], decode: list[list[float]]) -> None:
        if not prefill or not decode:
            raise ValueError("a profile needs at least one prefill and one decode point")
        prefill = sorted(prefill)
        self._prefill_x = [float(p[0]) for p in prefill]
        self._prefill_y = [float(p[1]) for p in prefill]
        grid: dict[float, list[tuple[float, float]]] = {}
        for batch, context, ms in decode:
            grid.setdefault(float(batch), []).append((float(context), float(ms)))
        self._batches = sorted(grid)
        self._decode = {b: sorted(points) for b, points in grid.items()}

    @classmethod
    def from_file(cls, path: str | Path) -> ProfilePerfModel:
        try:
            data = json.loads(Path(path).read_text())
            return cls(data["prefill"], data["decode"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot read performance profile {path}: {exc}") from exc

    def prefill_ms(self, tokens: int) -> float:
        return _interp(self._prefill_x, self._prefill_y, tokens)

    def decode_ms(self, batch: int, context_tokens: int, kv_usage: float) -> float:
        per_seq = context_tokens / max(batch, 1)
        at_batch = []
        for b in self._batches:
            points = self._decode[b]
            at_batch.append(_interp([c for c, _ in points], [m for _, m in points], per_seq))
        return _interp(self._batches, at_batch, batch)


def load_perf_model(spec: str | None) -> PerfModel:
    """`None` or "polynomial" for the default fit, else the path of a profile JSON file."""
    if spec in (None, "", "polynomial"):
        return PolynomialPerfModel()
    return ProfilePerfModel.from_file(spec)
