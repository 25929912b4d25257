"""Capture statistics: op/type histogram, top CIDs, ports and connections, throughput.

A :class:`StatsCollector` takes each decoded batch (with the tracker's tags) and counts with
numpy; :meth:`StatsCollector.finish` adds what the connection table knows. Memory stays
bounded: throughput is kept in at most :data:`MAX_BUCKETS` time buckets, whose width
doubles whenever they would be more. No I/O here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from vsockmon.conntrack.tracker import ConnTable, Tags
from vsockmon.decode.frames import ANOMALY_NAMES, Anomaly, FrameBatch
from vsockmon.wire.protocol import Op, SockType, cid_label, enum_name

MAX_BUCKETS = 4096

MAX_BINS = 10_000
"""The most throughput intervals: each is a row, and a huge ``--bins`` over an hour-long
capture (3.6e9 microseconds) would otherwise be billions of them."""


@dataclass
class CidStats:
    cid: int
    label: str
    packets_sent: int = 0
    packets_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    connections: int = 0


@dataclass
class PortStats:
    port: int
    connections: int = 0
    bytes: int = 0
    closes: dict[str, int] = field(default_factory=dict)


@dataclass
class Bin:
    start: float
    """Seconds since the first frame."""
    packets: int
    bytes: int
    bytes_per_s: float


@dataclass
class Stats:
    """Everything ``vsockmon stats`` shows."""

    frames: int
    frames_without_virtio: int
    first_ts: float | None
    last_ts: float | None
    duration: float
    payload_bytes: int
    ops: dict[str, dict[str, int]]
    """Socket type name → op name → packets."""
    anomalies: dict[str, int]
    connections: int
    closes: dict[str, int]
    top_cids: list[CidStats]
    top_ports: list[PortStats]
    top_connections: list[dict[str, Any]]
    throughput: list[Bin]
    bin_width: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StatsCollector:
    """Counts over every batch of a capture; call it as a visitor, then :meth:`finish`."""

    def __init__(self, resolution_ns: int = 1000) -> None:
        self.frames = 0
        self.without_virtio = 0
        self.payload = 0
        self.ops: Counter[tuple[int, int]] = Counter()
        self.anomalies: Counter[int] = Counter()
        self.sent: dict[int, list[int]] = {}
        self.received: dict[int, list[int]] = {}
        self.resolution = resolution_ns
        self.buckets: dict[int, list[int]] = {}
        self.first_ts: int | None = None
        self.last_ts: int | None = None

    def __call__(self, fb: FrameBatch, tags: Tags) -> None:
        n = len(fb)
        if not n:
            return
        self.frames += n
        self.first_ts = int(fb.ts_ns[0]) if self.first_ts is None else self.first_ts
        self.last_ts = int(fb.ts_ns[-1])
        for bit in ANOMALY_NAMES:
            hits = int(np.count_nonzero(fb.anomalies & int(bit)))
            if hits:
                self.anomalies[int(bit)] += hits
        rows = np.flatnonzero(fb.has_virtio)
        self.without_virtio += n - len(rows)
        if not len(rows):
            return
        v = fb.virtio[rows]
        op, typ = v["op"].astype(np.int64), v["type"].astype(np.int64)
        rw_bytes = np.where(op == Op.RW, v["len"].astype(np.int64), 0)
        self.payload += int(rw_bytes.sum())
        keys, counts = np.unique(typ * 65536 + op, return_counts=True)
        for k, c in zip(keys.tolist(), counts.tolist(), strict=True):
            self.ops[divmod(k, 65536)] += c
        _add(self.sent, v["src_cid"], rw_bytes)
        _add(self.received, v["dst_cid"], rw_bytes)
        self._throughput(fb.ts_ns[rows], rw_bytes)

    def _throughput(self, ts: np.ndarray, nbytes: np.ndarray) -> None:
        keys, inv = np.unique(ts // self.resolution, return_inverse=True)
        packets = np.bincount(inv, minlength=len(keys))
        sums = np.bincount(inv, weights=nbytes, minlength=len(keys))
        for k, p, b in zip(keys.tolist(), packets.tolist(), sums.tolist(), strict=True):
            cell = self.buckets.setdefault(k, [0, 0])
            cell[0] += p
            cell[1] += int(b)
        while len(self.buckets) > MAX_BUCKETS:  # coarser buckets, same totals
            self.resolution *= 2
            merged: dict[int, list[int]] = {}
            for k, (p, b) in self.buckets.items():
                cell = merged.setdefault(k // 2, [0, 0])
                cell[0] += p
                cell[1] += b
            self.buckets = merged

    def finish(self, tables: ConnTable | Iterable[ConnTable], top: int = 10, bins: int = 20
               ) -> Stats:
        """The statistics, with what the connections add: ``tables`` is the connection
        table, or tables of consecutive streams in stream order (a spilled capture's), read
        one at a time so that a million connections are never held at once."""
        conns = _Connections(top)
        for table in [tables] if isinstance(tables, ConnTable) else tables:
            conns.add(table)
        duration = ((self.last_ts or 0) - (self.first_ts or 0)) / 1e9
        ops: dict[str, dict[str, int]] = {}
        for (typ, op), count in sorted(self.ops.items()):
            ops.setdefault(enum_name(SockType, typ), {})[enum_name(Op, op)] = count
        width, series = self._bins(bins)
        return Stats(
            frames=self.frames, frames_without_virtio=self.without_virtio,
            first_ts=None if self.first_ts is None else self.first_ts / 1e9,
            last_ts=None if self.last_ts is None else self.last_ts / 1e9,
            duration=duration, payload_bytes=self.payload, ops=ops,
            anomalies={ANOMALY_NAMES[Anomaly(bit)]: count
                       for bit, count in sorted(self.anomalies.items())},
            connections=conns.count, closes=dict(conns.closes.most_common()),
            top_cids=self._cids(conns.per_cid, top),
            top_ports=sorted(conns.ports.values(),
                             key=lambda s: (-s.connections, -s.bytes, s.port))[:top],
            top_connections=conns.top, throughput=series, bin_width=width)

    def _cids(self, conns: Counter[int], top: int) -> list[CidStats]:
        out: dict[int, CidStats] = {}
        for table, sent in ((self.sent, True), (self.received, False)):
            for cid, (packets, nbytes) in table.items():
                s = out.setdefault(cid, CidStats(cid, cid_label(cid), connections=conns[cid]))
                if sent:
                    s.packets_sent, s.bytes_sent = packets, nbytes
                else:
                    s.packets_received, s.bytes_received = packets, nbytes
        ranked = sorted(out.values(), key=lambda s: (-(s.packets_sent + s.packets_received),
                                                     s.cid))
        return ranked[:top]

    def _bins(self, bins: int) -> tuple[float, list[Bin]]:
        """The buckets regrouped into ``bins`` (at most :data:`MAX_BINS`) equal intervals
        from the first frame."""
        if not self.buckets or self.first_ts is None or self.last_ts is None:
            return 0.0, []
        span = max(self.last_ts - self.first_ts, 1)
        width = max(span / min(bins, MAX_BINS), self.resolution)
        count = int(span // width) + 1
        packets, nbytes = [0] * count, [0] * count
        for k, (p, b) in self.buckets.items():
            i = min(int((k * self.resolution - self.first_ts) // width), count - 1)
            i = max(i, 0)
            packets[i] += p
            nbytes[i] += b
        secs = width / 1e9
        return secs, [Bin(i * secs, packets[i], nbytes[i], nbytes[i] / secs)
                      for i in range(count)]


def _add(table: dict[int, list[int]], cids: np.ndarray, nbytes: np.ndarray) -> None:
    keys, inv = np.unique(cids, return_inverse=True)
    packets = np.bincount(inv, minlength=len(keys))
    sums = np.bincount(inv, weights=nbytes, minlength=len(keys))
    for k, p, b in zip(keys.tolist(), packets.tolist(), sums.tolist(), strict=True):
        cell = table.setdefault(k, [0, 0])
        cell[0] += p
        cell[1] += int(b)


class _Connections:
    """What the connection tables add to the statistics, summed a table at a time (in
    stream order: ties keep the order of first appearance, as over one table)."""

    KEEP = ("stream", "type", "client", "server", "bytes", "packets", "duration", "close",
            "credit_stalls")
    """The keys of a top connection."""

    def __init__(self, top: int) -> None:
        self.top_n = top
        self.count = 0
        self.closes: Counter[str] = Counter()
        self.per_cid: Counter[int] = Counter()
        """Connections with the CID at either end (once for a connection to itself)."""
        self.ports: dict[int, PortStats] = {}
        """Server ports: where connections go (a mid-capture guess counts as guessed)."""
        self.top: list[dict[str, Any]] = []
        """The connections that carried the most bytes (the earliest stream of equals)."""

    def add(self, table: ConnTable) -> None:
        cols = table.record_columns()
        self.count += len(table)
        close = cols["close"]
        assert close.texts is not None
        codes = close.values
        self.closes.update(_in_first_order(close.texts, codes))
        client, server = cols["client_cid"].values, cols["server_cid"].values
        cids, n = np.unique(np.concatenate([client, server[server != client]]),
                            return_counts=True)
        self.per_cid.update(dict(zip(cids.tolist(), n.tolist(), strict=True)))
        nbytes = cols["bytes"].values
        self._ports(cols["server_port"].values, nbytes, codes, close.texts)
        order = np.lexsort((np.arange(len(nbytes)), -nbytes))[: self.top_n]
        best = [{k: r[k] for k in self.KEEP} for r in table.records(order.tolist())]
        # stable: a later table's equal never passes an earlier one's
        self.top = sorted(self.top + best, key=lambda r: -r["bytes"])[: self.top_n]

    def _ports(self, ports: np.ndarray, nbytes: np.ndarray, codes: np.ndarray,
               texts: tuple[str, ...]) -> None:
        """Connections, bytes and closes per server port: one Python step per port and
        close seen, not per connection (each port's closes in order of first appearance)."""
        key = ports.astype(np.int64) * len(texts) + codes
        pairs, first, inverse, counts = np.unique(key, return_index=True, return_inverse=True,
                                                  return_counts=True)
        pair_bytes = np.zeros(len(pairs), dtype=np.int64)
        np.add.at(pair_bytes, inverse.reshape(-1), nbytes)
        for i in np.argsort(first, kind="stable").tolist():
            port, code = divmod(int(pairs[i]), len(texts))
            s = self.ports.setdefault(port, PortStats(port))
            s.connections += int(counts[i])
            s.bytes += int(pair_bytes[i])
            how = texts[code]
            s.closes[how] = s.closes.get(how, 0) + int(counts[i])


def _in_first_order(texts: tuple[str, ...], codes: np.ndarray) -> dict[str, int]:
    """How often each code occurs, as its text, in the order the codes first occur (what a
    Counter fed the values one by one would hold)."""
    found, first, counts = np.unique(codes, return_index=True, return_counts=True)
    order = np.argsort(first, kind="stable")
    return {texts[int(found[i])]: int(counts[i]) for i in order.tolist()}
