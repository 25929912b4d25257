"""Diagnosis: find what went wrong in a vsock capture, explain it, and say how to fix it.

The rules (:mod:`vsockmon.diagnose.rules`, one module per family) read the connection
tracker's output (:mod:`vsockmon.conntrack`: connections, their control events, per-side
credit and stalls) plus a :class:`~vsockmon.diagnose.digest.Digest` of the few per-packet
facts the tracker does not keep. Each rule turns a pattern into a
:class:`~vsockmon.diagnose.model.Finding`: a stable rule id, a severity, the stream and frames
that prove it, the numbers that matter, a plain-language finding, the likely cause and the
fix. This module runs them.

Healthy Linux traffic must diagnose clean: port reuse, two RSTs at close, CREDIT_UPDATE counts
that vary, delayed packets carrying an older fwd_cnt and the SHUTDOWN-then-RST close are all
normal and never reported. Every threshold is a named field of
:class:`~vsockmon.diagnose.model.Thresholds`.

No I/O here. :meth:`vsockmon.api.Capture.findings` diagnoses a file; :class:`Diagnosis`
feeds batches yourself; :class:`LiveDiagnosis` reports findings as they become certain
during a capture.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import vsockmon.diagnose.rules  # noqa: F401 - registers every rule
from vsockmon.conntrack.tracker import Connection, ConnTable, ConnTracker, Tags
from vsockmon.decode.frames import FrameBatch, decode_batch
from vsockmon.diagnose.connections import Connections
from vsockmon.diagnose.digest import Digest
from vsockmon.diagnose.model import Finding, Thresholds, rank
from vsockmon.diagnose.registry import RULES, Context, in_order
from vsockmon.wire.pcapio import RecordBatch

__all__ = ["RULES", "Diagnosis", "LiveDiagnosis", "evaluate"]


def evaluate(conns: Iterable[Connection] | ConnTable | Connections, digest: Digest,
             thresholds: Thresholds | None = None, end_ns: int | None = None,
             final: bool = True) -> list[Finding]:
    """Every finding, ranked (most severe first, then by stream and frame).

    ``conns`` are the tracker's connections in stream order: a ConnTable or a list will
    do; a capture of a million takes :func:`tracked` (its objects made a few at a time); ``end_ns``
    is when the capture ended (default: its last packet); ``final`` False leaves out what only
    the capture's end can tell (connections it cut off), for live use.
    """
    end = max(end_ns or 0, digest.end_ns or 0)
    ctx = Context(conns, digest, thresholds or digest.t, end, final)
    for r in in_order(RULES):
        ctx.run(r)
    return rank(ctx.findings)




def tracked(tracker: ConnTracker) -> Connections:
    """Every connection of ``tracker`` for :func:`evaluate`, without holding them all as
    objects: memory follows the few the rules pick, not the connections ever seen."""
    return Connections.of_tracker(tracker.table, tracker.streams)


class Diagnosis:
    """Tracker and digest fed together; :meth:`findings` whenever you want them."""

    def __init__(self, thresholds: Thresholds | None = None) -> None:
        self.thresholds = thresholds or Thresholds()
        self.tracker = ConnTracker()
        self.digest = Digest(self.thresholds)

    def feed(self, fb: FrameBatch) -> Tags:
        tags = self.tracker.feed(fb)
        self.digest.feed(fb, tags)
        return tags

    def connections(self, end_ns: int | None = None) -> list[Connection]:
        """The connections so far, their open stalls ending at ``end_ns`` (default: the
        latest timestamp fed), as the findings' do."""
        return list(self.tracker.finish(end_ns))

    def findings(self, end_ns: int | None = None, final: bool = True,
                 conns: Sequence[Connection] | None = None) -> list[Finding]:
        return evaluate(self.connections(end_ns) if conns is None else conns, self.digest,
                        self.thresholds, end_ns, final)


class LiveDiagnosis(Diagnosis):
    """Findings reported once each, as soon as they are certain, during a capture.

    Call :meth:`update` with the current time after feeding (or on a timer while idle): it
    returns the findings not reported before. What depends on the capture's end waits for
    :meth:`close`.
    """

    def __init__(self, thresholds: Thresholds | None = None) -> None:
        super().__init__(thresholds)
        self._seen: set[tuple[str, str | None, int | None]] = set()
        self._next_frame = 1

    def feed(self, fb: FrameBatch) -> Tags:
        self._next_frame = fb.first + len(fb)
        return super().feed(fb)

    def feed_frames(self, frames: Sequence[tuple[int, bytes, int]]) -> Tags:
        """Feed captured ``(ts_ns, frame bytes, length on the wire)`` tuples, numbered on
        from the last frame fed (the live capture's frames, in the order it writes them)."""
        batch = RecordBatch(b"".join(data for _, data, _ in frames))
        offset = 0
        for ts, data, orig in frames:
            batch.offsets.append(offset)
            batch.caplens.append(len(data))
            batch.orig_lens.append(orig)
            batch.ts_ns.append(ts)
            offset += len(data)
        return self.feed(decode_batch(batch, self._next_frame))

    def forget(self, streams: set[int]) -> None:
        """Forget closed connections: tracker, digest and reported findings drop them."""
        self.tracker.forget(streams)
        self.digest.forget(streams)
        self._seen = {key for key in self._seen if key[2] not in streams}

    def update(self, now_ns: int) -> list[Finding]:
        return self._new(self.findings(now_ns, final=False))

    def close(self, now_ns: int | None = None) -> list[Finding]:
        return self._new(self.findings(now_ns, final=True))

    @property
    def last_frame(self) -> int:
        """The number of the last frame fed (0 before any)."""
        return self._next_frame - 1

    def file_differences(self, reported: Sequence[Finding], recorded_end_ns: int | None = None
                         ) -> tuple[list[Finding], list[Finding]]:
        """What ``vsockmon diagnose`` on the written file will report differently.

        A pcap file ends at its last frame: offline, every silence (a half-close, a stalled
        window, an unanswered REQUEST) is measured up to that frame, while live it runs up
        to the capture's stop. A pcapng file records the stop (``recorded_end_ns``), and the
        two agree. Returns (the ``reported`` findings the file will not show, the file's
        findings that were not reported), so the live report can say why the two differ
        instead of giving two unexplained answers for one capture.
        """
        offline = self.findings(recorded_end_ns, final=True)
        live_keys = {_key(f) for f in reported}
        file_keys = {_key(f) for f in offline}
        return ([f for f in reported if _key(f) not in file_keys],
                [f for f in offline if _key(f) not in live_keys])

    def replaced(self, reported: Sequence[Finding], stop_ns: int) -> list[Finding]:
        """The ``reported`` findings the live view itself no longer holds at ``stop_ns``.

        Each was true when it was said (a silence after a half-close: a hang), then the
        connection went on and made it something else (the close came: a stall). A file of
        the capture reports what it became, whatever the file can record of the capture's
        end, so the live report must not blame the file's end for the difference.
        """
        now = {_key(f) for f in self.findings(stop_ns, final=True)}
        return [f for f in reported if _key(f) not in now]

    def _new(self, findings: list[Finding]) -> list[Finding]:
        out = []
        for f in findings:
            key = _key(f)
            if key not in self._seen:
                self._seen.add(key)
                out.append(f)
        return out


def _key(f: Finding) -> tuple[str, str | None, int | None]:
    """What makes two findings the same one: a live report states each key once."""
    return (f.rule, f.kind, f.stream)
