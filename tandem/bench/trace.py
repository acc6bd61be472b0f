"""Reading Mooncake (FAST'25) request traces.

Each line is a JSON object: `timestamp` (ms since trace start), `input_length`,
`output_length` (tokens) and `hash_ids` (one id per 512-token block of the
prompt; equal ids mean equal block contents). Traces come from many hands, so
bad lines are collected with their line numbers and reported together instead
of stopping at the first with a traceback.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

MOONCAKE_BLOCK_SIZE = 512


@dataclass(frozen=True, slots=True)
class TraceEntry:
    line_no: int
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


@dataclass(slots=True)
class Trace:
    entries: list[TraceEntry]
    malformed: list[tuple[int, str]] = field(default_factory=list)
    """(line number, reason) for every line that was skipped."""


class TraceError(ValueError):
    """The trace has malformed lines and the caller asked for strict parsing."""

    def __init__(self, path: str, malformed: list[tuple[int, str]]) -> None:
        self.malformed = malformed
        shown = "\n".join(f"  line {n}: {why}" for n, why in malformed[:20])
        more = f"\n  ... and {len(malformed) - 20} more" if len(malformed) > 20 else ""
        super().__init__(f"{path}: {len(malformed)} malformed line(s):\n{shown}{more}")


def _int_field(obj: dict, name: str, minimum: int) -> int:
    v = obj.get(name)
    if isinstance(v, bool) or not isinstance(v, int | float) or v != int(v):
        raise ValueError(f"`{name}` must be an integer, got {v!r}")
    if v < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {v}")
    return int(v)


def parse_line(text: str) -> tuple[float, int, int, tuple[int, ...]]:
    """Validate one line; raises ValueError with a short reason."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    ts = obj.get("timestamp")
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts) or ts < 0:
        raise ValueError(f"`timestamp` must be a non-negative number, got {ts!r}")
    input_length = _int_field(obj, "input_length", 1)
    output_length = _int_field(obj, "output_length", 1)
    hash_ids = obj.get("hash_ids", [])
    if not isinstance(hash_ids, list) or not all(
        isinstance(h, int) and not isinstance(h, bool) for h in hash_ids
    ):
        raise ValueError("`hash_ids` must be a list of integers")
    return float(ts), input_length, output_length, tuple(hash_ids)


def load_trace(path: str | Path, strict: bool = False, limit: int | None = None) -> Trace:
    """Parse a trace file, sorted by timestamp (stable, so ties keep file order).

    Malformed lines are skipped and listed in `Trace.malformed`; with `strict`,
    any malformed line raises `TraceError` naming every one of them. Blank lines
    are ignored. `limit` keeps the earliest that many entries; the whole file is
    still checked, so every bad line is reported.
    """
    entries: list[TraceEntry] = []
    malformed: list[tuple[int, str]] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                ts, inp, out, hashes = parse_line(line)
            except ValueError as e:
                malformed.append((line_no, str(e)))
                continue
            entries.append(TraceEntry(line_no, ts, inp, out, hashes))
    if strict and malformed:
        raise TraceError(str(path), malformed)
    entries.sort(key=lambda e: e.timestamp_ms)
    return Trace(entries[:limit] if limit is not None else entries, malformed)
