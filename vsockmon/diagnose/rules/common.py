"""What several rule families share: connection states, event look-ups, times in words."""

from __future__ import annotations

from vsockmon.conntrack.tracker import Close, Connection, Event

OPEN_ENDS = (Close.OPEN, Close.HALF_CLOSED, Close.CLOSING, Close.UNANSWERED)
"""Closes that mean the connection had not ended when the capture did."""
FAILED = (Close.REFUSED, Close.UNANSWERED)
"""Closes of a connect() that failed."""


def event_at(conn: Connection, frame: int | None) -> Event | None:
    """The connection's control event at ``frame``, if any."""
    return next((e for e in conn.events if e.frame == frame), None)


def delay_text(ns: int | None) -> str:
    """A short delay in words: ``71 µs``, ``2.5 ms``; ``?`` when unknown."""
    if ns is None:
        return "?"
    return f"{ns / 1e3:.0f} µs" if ns < 1_000_000 else f"{ns / 1e6:.1f} ms"


def seconds_text(seconds: float) -> str:
    """A duration in words: ``3.0 s``, ``250 ms``."""
    return f"{seconds:.1f} s" if seconds >= 1 else f"{seconds * 1000:.0f} ms"


def request_ts(conn: Connection) -> int:
    """When the connection's REQUEST was sent (its first packet when none was captured).

    The two are one time: a REQUEST always starts a new stream (the tracker's numbering
    rule), so a captured REQUEST is its connection's first packet; no search of the events
    needed (a storm of refusals calls this for every one)."""
    return conn.first_ts_ns
