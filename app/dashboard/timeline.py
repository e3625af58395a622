"""A run's timeline laid out for an SVG Gantt chart drawn on the server: one row per step, one bar per attempt.

Each attempt is a bar from its start to its end (or now, while it runs), numbered, a failed one marked
with a cross as well as its colour; the backoff before a retry is a thin bar. ``wait`` and ``approval``
steps are one bar for the time they waited. A map step is one row whatever its number of items: a bar
from its first item's start to its last item's end, labelled with its items done, so a thousand items
stay one row. Every bar carries a sentence for its ``<title>`` and the table the chart comes with.
Pure: the run as ``runs_service.get_run`` reads it, and the time it is now.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

LABEL_W = 150.0
PLOT_W = 620.0
ROW_H = 26.0
BAR_H = 14.0
AXIS_H = 24.0
TICKS = 4
LABEL_ROOM = 70.0  # right of the plot, for the mark after the last bar
WAITING_KINDS = {"wait": "waited for a signal", "approval": "waited for an approval"}


@dataclass(frozen=True)
class Bar:
    kind: str  # attempt, backoff, wait, approval, map
    status: str
    x: float
    width: float
    label: str  # the short mark drawn in or after the bar ("#2", "✕ #1")
    title: str  # the whole sentence: what, status, from, to
    start: str
    end: str | None  # None: still going
    seconds: float


@dataclass(frozen=True)
class Row:
    step_id: str
    y: float
    bars: tuple[Bar, ...]


@dataclass(frozen=True)
class Tick:
    x: float
    at: str  # ISO, UTC
    label: str  # time since the start: "+1.25 s", "+40 s", "+12 min"


@dataclass(frozen=True)
class Timeline:
    rows: tuple[Row, ...]
    ticks: tuple[Tick, ...]
    width: float
    height: float
    start: str | None
    label_w: float = LABEL_W
    bar_h: float = BAR_H


def _at(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def timeline(run: dict[str, Any], now: datetime) -> Timeline:
    """The chart of ``run``'s attempts and waits; times after ``now`` are cut to it."""
    spans = list(_spans(run))
    starts = [start for _, _, _, start, _, _ in spans]
    t0 = min([*starts, *filter(None, [_at(run["started_at"])])], default=None)
    if t0 is None:
        return Timeline(rows=(), ticks=(), width=LABEL_W + PLOT_W, height=AXIS_H, start=None)
    t1 = max([now if end is None else end for *_, end, _ in spans] + [t0])
    scale = PLOT_W / max((t1 - t0).total_seconds(), 0.001)

    def x(at: datetime) -> float:
        return LABEL_W + (at - t0).total_seconds() * scale

    rows: dict[str, list[Bar]] = {step["id"]: [] for step in run["steps"]}
    for step_id, kind, status, start, end, label in spans:
        stop = min(now if end is None else end, t1)
        seconds = max((stop - start).total_seconds(), 0.0)
        what = {"attempt": f"attempt {label.lstrip('✕ #')}", "backoff": "backoff before a retry",
                "map": f"items ({label})"}.get(kind) or WAITING_KINDS.get(kind, kind)
        title = f"{step_id}: {what}, {status}, from {_iso(start)} " + (
            f"to {_iso(end)} ({_duration(seconds)})" if end is not None else f"until now ({_duration(seconds)} so far)")
        rows[step_id].append(Bar(kind=kind, status=status, x=x(start), width=max(x(stop) - x(start), 2.0),
                                 label=label, title=title, start=_iso(start),
                                 end=_iso(end) if end is not None else None, seconds=seconds))
    drawn = tuple(Row(step_id, AXIS_H + i * ROW_H, tuple(bars)) for i, (step_id, bars) in enumerate(rows.items()))
    ticks = tuple(Tick(x(t0 + (t1 - t0) * i / TICKS), _iso(t0 + (t1 - t0) * i / TICKS),
                       "+" + _duration((t1 - t0).total_seconds() * i / TICKS)) for i in range(TICKS + 1))
    return Timeline(rows=drawn, ticks=ticks, width=LABEL_W + PLOT_W + LABEL_ROOM,
                    height=AXIS_H + len(drawn) * ROW_H + 4, start=_iso(t0))


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 600:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 36_000 else f"{seconds / 3600:.0f} h"


Span = tuple[str, str, str, datetime, datetime | None, str]


def _spans(run: dict[str, Any]) -> list[Span]:
    """(step, kind, status, start, end or None, label) of every bar, in step order."""
    spans: list[Span] = []
    # A step that waits has no attempt: its wait starts when it began waiting (its event), if not started.
    began_waiting: dict[str, datetime] = {}
    for event in run["events"]:
        if event["type"] in ("step_waiting", "approval_requested") and event["step_id"]:
            at = _at(event["created_at"])
            if at is not None:
                began_waiting.setdefault(event["step_id"], at)
    for step in run["steps"]:
        if step["kind"] in WAITING_KINDS:
            start = _at(step["started_at"]) or began_waiting.get(step["id"])
            if start is not None:
                spans.append((step["id"], step["kind"], step["status"], start, _at(step["finished_at"]), ""))
            continue
        if step["items"]:
            starts = [at for item in step["items"] if (at := _at(item["started_at"]))]
            if starts:
                ends = [_at(item["finished_at"]) for item in step["items"]]
                done = sum(item["status"] == "succeeded" for item in step["items"])
                end = None if any(e is None for e in ends) else max(e for e in ends if e is not None)
                spans.append((step["id"], "map", step["status"], min(starts), end,
                              f"{done}/{len(step['items'])} done"))
            continue
        for attempt in step["attempts"]:
            queued, ready = _at(attempt["queued_at"]), _at(attempt["not_before"])
            if queued is not None and ready is not None and ready > queued:
                spans.append((step["id"], "backoff", "waiting", queued, ready, ""))
            start = _at(attempt["started_at"])
            if start is None:
                continue
            failed = attempt["status"] == "failed"
            spans.append((step["id"], "attempt", attempt["status"], start, _at(attempt["finished_at"]),
                          f"{'✕ ' if failed else ''}#{attempt['n']}"))
    return spans
