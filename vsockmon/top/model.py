"""The model of ``vsockmon top``: tracker state and live diagnosis turned into snapshots.

Frames go in as ``(ts_ns, bytes, length on the wire)`` tuples (what a live capture or a
replayed file yields) through :meth:`LiveDiagnosis.feed_frames`, the same entry point as
``capture --diagnose``; the tracker, the digest and the rules are theirs. What this module
adds is what a *live* view needs and a capture analysis does not: rates over the last
interval, the receiver's free credit *now*, how long a stall has lasted so far, the last op,
a display filter over connections, a short recent ladder per connection, and forgetting.

Memory follows the open connections: per connection a few numbers, the header of its latest
frame and its last :data:`RECENT_ROWS` packets, dropped once a closed connection has lingered
:attr:`TopModel.linger_s`, when the tracker and the digest forget it too
(:meth:`LiveDiagnosis.forget`). No I/O, no terminal, no clock: the caller says what
time it is (the wall clock live, the capture's clock when replaying).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vsockmon.analysis import timeline as tl
from vsockmon.conntrack.model import CLIENT, SERVER, Close, Connection, Tags
from vsockmon.conntrack.streams import StreamRows
from vsockmon.decode.filter import compile_filter
from vsockmon.decode.frames import FrameBatch
from vsockmon.diagnose.engine import LiveDiagnosis
from vsockmon.diagnose.model import Finding, Severity, Thresholds
from vsockmon.diagnose.views import findings_by_stream, markers
from vsockmon.wire.protocol import Op, enum_name

RECENT_ROWS = 40
"""Packets kept per connection for its ladder: enough to see what it did last."""
LINGER_S = 5.0
"""How long a closed connection stays on screen (dimmed) before it goes."""

STATE_NAMES = {
    Close.OPEN: "open", Close.UNANSWERED: "connecting", Close.HALF_CLOSED: "half-closed",
    Close.CLOSING: "closing", Close.GRACEFUL: "closed", Close.RESET_BY_CLIENT: "reset",
    Close.RESET_BY_SERVER: "reset", Close.REFUSED: "refused",
}
"""The tracker's close kinds as live states: "unanswered" is still connecting while live."""
ENDED = frozenset({Close.GRACEFUL, Close.RESET_BY_CLIENT, Close.RESET_BY_SERVER, Close.REFUSED})
"""Close kinds after which a connection carries nothing more: it lingers, then goes."""

JSON_KEYS = ("stream", "client", "server", "type", "state", "bytes_c2s", "bytes_s2c",
             "rate_c2s", "rate_s2c", "peer_free_c2s", "peer_free_s2c", "stall_ms", "finding")
"""The keys of a connection in ``top --json``, in order (the issue's contract for scripts)."""


@dataclass(frozen=True)
class Row:
    """One connection as the view shows it."""

    stream: int
    client: str
    server: str
    type: str
    state: str
    age_s: float
    bytes_c2s: int
    bytes_s2c: int
    rate_c2s: float
    """Payload bytes per second client→server over the last interval."""
    rate_s2c: float
    peer_free_c2s: int | None
    """The server's free receive space for the client's bytes, now (None: not advertised)."""
    peer_free_s2c: int | None
    buf_alloc_c2s: int | None
    """The server's buf_alloc: the whole window client→server."""
    buf_alloc_s2c: int | None
    stall_ms: float
    """How long a sender of this connection has had no credit so far (0: none stalled)."""
    last_op: str
    finding: str | None
    """The worst live finding as ``SEVERITY rule``, or None."""
    ended: bool
    """Closed: shown dimmed until it goes."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["finding"] = self.finding.split(" ", 1)[1] if self.finding else None
        return {k: d[k] for k in JSON_KEYS}


@dataclass(frozen=True)
class Snapshot:
    """Everything the screen (or one ``--json`` line) shows at one moment."""

    time_ns: int
    rows: list[Row]
    findings: list[Finding]
    """The live findings of the shown connections and of the capture as a whole."""
    frames: int
    drops: int | None
    """Frames the kernel dropped for want of room (None: not a live capture)."""
    start_ns: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"time": round(self.time_ns / 1e9, 6),
                "connections": [r.to_dict() for r in self.rows],
                "findings": [f.to_dict(self.start_ns) for f in self.findings],
                "frames": self.frames, "drops": self.drops}


@dataclass
class _Track:
    """What the model keeps of one connection beyond the tracker."""

    flight: list[int] = field(default_factory=lambda: [-1, -1])
    limit: list[int] = field(default_factory=lambda: [-1, -1])
    last_op: int = -1
    last_fb: FrameBatch | None = None
    """Its latest frame as a one-row batch (headers only): what a new filter is tried on."""
    recent: dict[str, np.ndarray] | None = None
    prev_bytes: tuple[int, int] = (0, 0)


class _Feed(LiveDiagnosis):
    """The live diagnosis, with every decoded batch also handed to the model."""

    def __init__(self, thresholds: Thresholds | None,
                 observe: Callable[[FrameBatch, Tags], None]) -> None:
        super().__init__(thresholds)
        self._observe = observe

    def feed(self, fb: FrameBatch) -> Tags:
        tags = super().feed(fb)
        self._observe(fb, tags)
        return tags


class TopModel:
    """Connections and findings of a live capture (or a replay), snapshot by snapshot."""

    def __init__(self, thresholds: Thresholds | None = None, linger_s: float = LINGER_S,
                 recent_rows: int = RECENT_ROWS) -> None:
        self.diagnosis = _Feed(thresholds, self._observe)
        self.linger_s = linger_s
        self.recent_rows = recent_rows
        self.tracks: dict[int, _Track] = {}
        self.frames = 0
        self.filter_text: str | None = None
        self._filter: Callable[[FrameBatch], np.ndarray] | None = None
        self._matched: set[int] = set()
        self._prev_ns: int | None = None
        self._conns: dict[int, Connection] = {}
        self._findings: dict[int | None, list[Finding]] = {}

    # -- feeding --------------------------------------------------------------------------

    def feed(self, frames: Sequence[tuple[int, bytes, int]]) -> None:
        """Track a batch of captured frames, in capture order."""
        if frames:
            self.diagnosis.feed_frames(frames)

    def _observe(self, fb: FrameBatch, tags: Tags) -> None:
        self.frames += len(fb)
        stream = tags.stream
        rows = np.flatnonzero(stream >= 0)
        if not len(rows):
            return
        # the last row of each stream in this batch: its credit and op now
        sids, at = np.unique(stream[rows][::-1], return_index=True)
        last = rows[::-1][at]
        ops = fb.virtio["op"][last].tolist()
        flight, limit = tags.in_flight[last].tolist(), tags.limit[last].tolist()
        if self._filter is not None:
            self._matched.update(np.unique(stream[rows[self._filter(fb)[rows]]]).tolist())
        recent = StreamRows(sids)
        recent(fb, tags)
        for i, sid in enumerate(sids.tolist()):
            tr = self.tracks.get(sid)
            if tr is None:
                tr = self.tracks[sid] = _Track()
            tr.flight, tr.limit, tr.last_op = flight[i], limit[i], ops[i]
            tr.last_fb = _one_row(fb, int(last[i]))
            tr.recent = _tail(tr.recent, recent.columns(sid), self.recent_rows)

    # -- filtering ------------------------------------------------------------------------

    def set_filter(self, text: str | None) -> None:
        """Show only connections with a frame that matches ``text`` (the display-filter
        language of ``decode -Y``): tried on each connection's latest frame now, and on
        every frame from now on. None or blank: show all. Raises ``FilterError``."""
        if not text or not text.strip():
            self.filter_text, self._filter, self._matched = None, None, set()
            return
        flt = compile_filter(text)
        matched: set[int] = set()
        stubs = [(sid, tr.last_fb) for sid, tr in self.tracks.items() if tr.last_fb]
        if stubs:
            mask = flt(_concat([fb for _, fb in stubs]))
            matched = {sid for (sid, _), hit in zip(stubs, mask.tolist(), strict=True) if hit}
        self.filter_text, self._filter, self._matched = text.strip(), flt, matched

    # -- snapshots ------------------------------------------------------------------------

    def snapshot(self, now_ns: int, drops: int | None = None) -> Snapshot:
        """The connections open or lately closed at ``now_ns``, and the live findings.

        Rates are the bytes since the previous snapshot over the time since it (since the
        first frame for the first one). Closed connections older than :attr:`linger_s` are
        forgotten here.
        """
        d = self.diagnosis
        conns_now = list(d.tracker.finish(now_ns))
        table = {c.stream: c for c in conns_now}
        findings = d.findings(now_ns, final=False, conns=conns_now)
        by_stream = findings_by_stream(findings)
        since = self._prev_ns if self._prev_ns is not None else d.digest.start_ns
        dt = max((now_ns - since) / 1e9, 1e-9) if since is not None else 0.0
        rows, conns, gone = [], {}, set()
        for sid in sorted(self.tracks):
            conn = table[sid]
            ended = conn.close in ENDED
            if ended and (now_ns - conn.last_ts_ns) / 1e9 > self.linger_s:
                del self.tracks[sid]
                self._matched.discard(sid)
                gone.add(sid)
                continue
            conns[sid] = conn
            row = self._row(conn, self.tracks[sid], by_stream.get(sid, []), now_ns, dt)
            if self._filter is None or sid in self._matched:
                rows.append(row)
        d.forget(gone)  # the tracker and the digest let them go too
        self._prev_ns = now_ns
        self._conns = conns
        self._findings = by_stream
        shown = {r.stream for r in rows}
        live = [f for f in findings if f.stream is None or f.stream in shown]
        return Snapshot(now_ns, rows, live, self.frames, drops, d.digest.start_ns)

    def _row(self, c: Connection, tr: _Track, found: list[Finding], now_ns: int,
             dt: float) -> Row:
        sent = (c.client.bytes, c.server.bytes)
        rates = [(sent[i] - tr.prev_bytes[i]) / dt if dt else 0.0 for i in (CLIENT, SERVER)]
        tr.prev_bytes = sent
        free = [tr.limit[i] - tr.flight[i] if tr.limit[i] >= 0 else None
                for i in (CLIENT, SERVER)]
        stalls = [d.start_ns for (s, _), d in self.diagnosis.digest.open_stalls.items()
                  if s == c.stream]
        ended = c.close in ENDED
        stall_ms = (now_ns - min(stalls)) / 1e6 if stalls and not ended else 0.0
        worst = found[0] if found else None
        return Row(
            stream=c.stream, client=c.client.addr, server=c.server.addr, type=c.type_name,
            state=STATE_NAMES[c.close], age_s=round(max(now_ns - c.first_ts_ns, 0) / 1e9, 3),
            bytes_c2s=sent[CLIENT], bytes_s2c=sent[SERVER], rate_c2s=round(rates[0], 1),
            rate_s2c=round(rates[1], 1), peer_free_c2s=free[CLIENT],
            peer_free_s2c=free[SERVER],
            buf_alloc_c2s=tr.limit[CLIENT] if tr.limit[CLIENT] >= 0 else None,
            buf_alloc_s2c=tr.limit[SERVER] if tr.limit[SERVER] >= 0 else None,
            stall_ms=round(max(stall_ms, 0.0), 3),
            last_op=enum_name(Op, tr.last_op) if tr.last_op >= 0 else "",
            finding=f"{str(worst.severity).upper()} {worst.rule_id}" if worst else None,
            ended=ended)

    # -- one connection -------------------------------------------------------------------

    def findings_of(self, stream: int) -> list[Finding]:
        """The live findings of one connection as of the last snapshot, worst first."""
        return self._findings.get(stream, [])

    def ladder_lines(self, stream: int, max_rows: int = RECENT_ROWS,
                     style: Callable[..., str] | None = None) -> list[str]:
        """The recent packets of one connection as the timeline's terminal ladder, with its
        findings marked where their evidence lies; empty when the connection has gone."""
        conn, tr = self._conns.get(stream), self.tracks.get(stream)
        if conn is None or tr is None or tr.recent is None:
            return []
        lad = tl.ladder(conn, tr.recent)
        lad.marks = markers(self.findings_of(stream), (s.frame for s in lad.steps))
        return tl.text_lines(lad, max_rows, style)


def _tail(old: dict[str, np.ndarray] | None, new: dict[str, np.ndarray],
          keep: int) -> dict[str, np.ndarray]:
    """The last ``keep`` rows of ``old`` followed by ``new``."""
    if old is None:
        return {k: c[-keep:] for k, c in new.items()}
    return {k: np.concatenate([old[k], c])[-keep:] for k, c in new.items()}


_ROW_COLUMNS = tuple(f.name for f in dataclasses.fields(FrameBatch)
                     if f.name not in ("first", "buf"))


def _one_row(fb: FrameBatch, i: int) -> FrameBatch:
    """Row ``i`` of a batch as a batch of its own, without the frame bytes (kept per
    connection, it must not hold the whole batch's buffer alive)."""
    cols = {k: getattr(fb, k)[i:i + 1].copy() for k in _ROW_COLUMNS}
    cols["payload_off"][:] = 0
    return FrameBatch(first=fb.first + i, buf=b"", **cols)


def _concat(fbs: list[FrameBatch]) -> FrameBatch:
    """One-row batches side by side (for trying a filter on all of them at once)."""
    cols = {k: np.concatenate([getattr(fb, k) for fb in fbs]) for k in _ROW_COLUMNS}
    return FrameBatch(first=fbs[0].first, buf=b"", **cols)


def text_table(snap: Snapshot) -> list[str]:
    """The snapshot as plain text lines (``top -b``): a header like top's, then one line
    per connection."""
    when = _clock(snap.time_ns)
    drops = "" if snap.drops is None else f", {snap.drops} dropped"
    found = sum(1 for f in snap.findings if f.severity >= Severity.WARNING)
    head = (f"vsockmon top - {when}  {len(snap.rows)} connections, {snap.frames} frames"
            f"{drops}, {found} problem(s)")
    cols = ["stream", "client", "server", "type", "state", "age", "bytes c→s/s→c",
            "rate/s c→s/s→c", "free c→s/s→c", "stall", "last op", "finding"]
    lines = [head, "  ".join(cols)]
    for r in snap.rows:
        lines.append("  ".join([
            str(r.stream), r.client, r.server, r.type, r.state, f"{r.age_s:.1f}s",
            f"{r.bytes_c2s}/{r.bytes_s2c}", f"{rate(r.rate_c2s)}/{rate(r.rate_s2c)}",
            f"{credit(r.peer_free_c2s, r.buf_alloc_c2s)}/"
            f"{credit(r.peer_free_s2c, r.buf_alloc_s2c)}",
            f"{r.stall_ms:.0f}ms" if r.stall_ms else "-", r.last_op or "-",
            r.finding or "-"]))
    return lines


def rate(bps: float) -> str:
    """Bytes per second, short (``12.3M``)."""
    for unit in ("", "K", "M"):
        if bps < 1000:
            return f"{bps:.0f}{unit}" if not unit else f"{bps:.1f}{unit}"
        bps /= 1000
    return f"{bps:.1f}G"


def credit(free: int | None, buf: int | None) -> str:
    """Free credit of a window, as ``free of buf_alloc`` short (``12K:256K``)."""
    if free is None or buf is None:
        return "?"
    return f"{_size(free)}:{_size(buf)}"


def _size(n: int) -> str:
    if abs(n) < 1024:
        return str(n)
    if abs(n) < 1 << 20:
        return f"{n / 1024:.0f}K"
    return f"{n / (1 << 20):.1f}M"


def _clock(ns: int) -> str:
    sec, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%H:%M:%S", time.localtime(sec)) + f".{frac // 1_000_000:03d}"
