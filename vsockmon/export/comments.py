"""Per-packet comments for an annotated pcapng: connection, state, credit, anomalies.

The comments come from the connection tracker's results (streams, control events, violation
evidence, stalls, closes) and the decoder's anomalies; nothing here re-tracks connections.
Callers add their own lines per frame (``extra``: frame number → strings), e.g. the
findings of ``vsockmon diagnose``. No I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from vsockmon.conntrack.tracker import CLIENT, ROLES, Close, Connection, ConnTable, Tags
from vsockmon.decode.frames import Frame, FrameBatch
from vsockmon.payload import dissect_frame
from vsockmon.wire.protocol import Op, ShutdownFlag

DIRS = ("c2s", "s2c")


def _states(conn: Connection) -> list[tuple[int, str]]:
    """(frame, state after it) for each control event of a connection.

    The names follow :class:`~vsockmon.conntrack.tracker.Close` once the connection is over:
    requested → established → half-closed → closing → graceful / reset-by-… / refused.
    """
    out: list[tuple[int, str]] = []
    shut = [False, False]  # client→server, server→client directions closed
    responded = False
    state = "established"
    for ev in conn.events:
        if ev.op == Op.REQUEST:
            state = "requested"
        elif ev.op == Op.RESPONSE:
            responded, state = True, "established"
        elif ev.op == Op.SHUTDOWN:
            if ev.flags & ShutdownFlag.SEND:
                shut[ev.sender] = True
            if ev.flags & ShutdownFlag.RCV:
                shut[1 - ev.sender] = True
            state = Close.CLOSING.value if all(shut) else Close.HALF_CLOSED.value
        elif ev.op == Op.RST and state not in _OVER:
            if all(shut):
                state = Close.GRACEFUL.value
            elif state == "requested" and not responded and ev.sender != CLIENT:
                state = Close.REFUSED.value
            else:
                state = (Close.RESET_BY_CLIENT if ev.sender == CLIENT
                         else Close.RESET_BY_SERVER).value
        else:
            continue
        out.append((ev.frame, state))
    return out


_OVER = {Close.GRACEFUL.value, Close.REFUSED.value, Close.RESET_BY_CLIENT.value,
         Close.RESET_BY_SERVER.value}


class Annotator:
    """Builds the comment of every frame from one tracked capture."""

    def __init__(self, table: ConnTable, extra: Mapping[int, Sequence[str]] | None = None
                 ) -> None:
        self._extra = extra or {}
        self._notes: dict[int, list[str]] = {}
        keys: list[int] = []
        labels: list[str] = []
        for conn in table:
            for frame, state in _states(conn):
                keys.append(conn.stream << 40 | frame)
                labels.append(state)
            self._evidence(conn)
        order = np.argsort(np.asarray(keys, dtype=np.int64), kind="stable")
        self._keys = np.asarray(keys, dtype=np.int64)[order]
        self._labels = [labels[i] for i in order.tolist()]

    def _note(self, frame: int | None, text: str) -> None:
        if frame is not None:
            self._notes.setdefault(frame, []).append(text)

    def _evidence(self, conn: Connection) -> None:
        """Frames the tracker singles out: closes, handshakes, first/last violations, stalls."""
        if conn.close_frame is not None and conn.close.value in _OVER:
            self._note(conn.close_frame, f"close: {conn.close.value} by {conn.close_by}")
        answer = conn.close_frame if conn.close == Close.REFUSED else conn.response_frame
        if conn.handshake_ns is not None and answer is not None:
            self._note(answer, f"handshake {conn.handshake_ns / 1e6:.3f} ms")
        for side, d in zip(conn.sides, DIRS, strict=True):
            for kind, ev in side.violations.items():
                self._note(ev.first_frame, f"violation {kind.value} ({d}): first of {ev.count}")
                if ev.last_frame != ev.first_frame:
                    self._note(ev.last_frame, f"violation {kind.value} ({d}): last of {ev.count}")
            st = side.stalls
            if st.count:
                self._note(st.first_frame, f"zero credit ({d}): first of {st.count} stalls")
                if st.longest_frame not in (None, st.first_frame):
                    self._note(st.longest_frame,
                               f"zero credit ({d}): longest stall, {st.max_ns / 1e6:.3f} ms")

    def states(self, streams: np.ndarray, frames: np.ndarray) -> list[str | None]:
        """State after each (stream, frame): that of the stream's latest event so far."""
        key = streams.astype(np.int64) << 40 | frames.astype(np.int64)
        idx = np.searchsorted(self._keys, key, side="right") - 1
        own = (idx >= 0) & (self._keys[np.maximum(idx, 0)] >> 40 == streams) \
            if len(self._keys) else np.zeros(len(key), dtype=bool)
        out: list[str | None] = []
        for s, i, mine in zip(streams.tolist(), idx.tolist(), own.tolist(), strict=True):
            if s < 0:
                out.append(None)
            else:  # before any event of its stream: the capture joined mid-connection
                out.append(self._labels[i] if mine else "established")
        return out

    def comments(self, fb: FrameBatch, tags: Tags, payload: bool = True) -> list[str]:
        """The comment of every frame of a batch (empty string: nothing to say)."""
        frames = fb.first + np.arange(len(fb))
        states = self.states(tags.stream, frames)
        out = []
        for i, (frame, state) in enumerate(zip(frames.tolist(), states, strict=True)):
            parts = list(self._parts(fb.frame(i), tags, i, state, payload))
            parts += self._notes.get(frame, [])
            parts += self._extra.get(frame, [])
            out.append("; ".join(parts))
        return out

    @staticmethod
    def _parts(f: Frame, tags: Tags, i: int, state: str | None, payload: bool
               ) -> Iterable[str]:
        stream = int(tags.stream[i])
        if stream >= 0:
            d = int(tags.sender[i])
            text = f"vsockmon stream {stream} {DIRS[d]} ({ROLES[d]}) {state}"
            flight, limit = int(tags.in_flight[i, d]), int(tags.limit[i, d])
            if flight >= 0:
                text += f", in flight {flight}/{limit}"
            yield text
        if f.anomalies:
            yield "anomalies: " + ",".join(f.anomalies)
        if payload and f.has_virtio and f.virtio["op"] == Op.RW:
            info = dissect_frame(f)
            if info is not None:
                yield f"{info.protocol}: {info.summary}"
