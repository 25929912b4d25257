"""The packets of a few chosen connections, gathered during the analysis pass.

For views of a few connections (``timeline``, ``follow``): a visitor of
:func:`vsockmon.analysis.pipeline.analyse` whose memory is proportional to their packets only.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from vsockmon.conntrack.model import Tags
from vsockmon.decode.frames import FrameBatch


class StreamRows:
    """The packets of chosen streams as columns, gathered from :meth:`ConnTracker.feed`.

    For views of a few connections (timeline, follow): memory is proportional to their
    packets only. ``wanted`` names the streams, or None for the first ``first`` streams;
    ``payloads`` keeps each packet's payload (its first ``len`` bytes: the tap-length rule).
    """

    COLUMNS = ("frame", "ts", "sender", "op", "len", "flags", "buf", "fwd", "anomalies",
               "in_flight", "limit", "caplen")

    def __init__(self, wanted: Iterable[int] | None = None, first: int = 0,
                 payloads: bool = False) -> None:
        # a number past int64 names no stream (and would not fit the column): left out
        self.wanted = None if wanted is None else np.asarray(
            sorted({s for s in wanted if 0 <= s < 2**63}), np.int64)
        self.first = first
        self.payloads = payloads
        self._parts: dict[int, list[dict[str, np.ndarray]]] = {}
        self._data: dict[int, list[bytes]] = {}

    def __call__(self, fb: FrameBatch, tags: Tags) -> None:
        stream = tags.stream
        if self.wanted is None:
            pick = (stream >= 0) & (stream < self.first)
        else:
            pick = np.isin(stream, self.wanted)
        rows = np.flatnonzero(pick)
        if not len(rows):
            return
        v = fb.virtio[rows]
        length = v["len"].astype(np.int64)
        cols = {"frame": rows + fb.first, "ts": fb.ts_ns[rows],
                "sender": tags.sender[rows].astype(np.int64), "op": v["op"].astype(np.int64),
                "len": length, "flags": v["flags"].astype(np.int64),
                "buf": v["buf_alloc"].astype(np.int64), "fwd": v["fwd_cnt"].astype(np.int64),
                "anomalies": fb.anomalies[rows].astype(np.int64),
                "in_flight": tags.in_flight[rows], "limit": tags.limit[rows],
                "caplen": fb.payload_len[rows].astype(np.int64)}
        sids = stream[rows]
        for sid in np.unique(sids).tolist():
            sel = sids == sid
            self._parts.setdefault(sid, []).append({k: c[sel] for k, c in cols.items()})
            if self.payloads:
                data = self._data.setdefault(sid, [])
                for i, n in zip(rows[sel].tolist(), length[sel].tolist(), strict=True):
                    data.append(fb.payload(i)[:n])

    @property
    def streams(self) -> list[int]:
        return sorted(self._parts)

    def columns(self, stream: int) -> dict[str, np.ndarray]:
        """Every column of one stream's packets, in frame order."""
        parts = self._parts.get(stream, [])
        if not parts:
            return {k: np.zeros((0, 2) if k in ("in_flight", "limit") else 0, dtype=np.int64)
                    for k in self.COLUMNS}
        return {k: np.concatenate([p[k] for p in parts]) for k in self.COLUMNS}

    def payload(self, stream: int) -> list[bytes]:
        """Each packet's payload bytes (the first ``len`` captured), in frame order."""
        return self._data.get(stream, [])
