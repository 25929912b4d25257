"""Frames from capture records: header fields, payload bounds and anomalies, in bulk.

One decoder, vectorised with numpy over a :class:`~vsockmon.wire.pcapio.RecordBatch`: a capture of a
million packets becomes columns without a Python object per packet. The per-packet view
(:class:`Frame`) reads one row of those columns, so the text, JSON and tree outputs and the
bulk analyses can never disagree about a field. No I/O here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Any

import numpy as np

from vsockmon.decode import _render
from vsockmon.decode.rows import Rows
from vsockmon.wire import _walk
from vsockmon.wire.pcapio import RecordBatch
from vsockmon.wire.protocol import (
    LINKTYPE_VSOCK,
    MON_HDR_LEN,
    MON_OP_OF,
    VIRTIO_HDR_LEN,
    VIRTIO_HEADER,
    VSOCKMON_HEADER,
    MonOp,
    Op,
    SockType,
    Transport,
    enum_name,
    flag_names,
)

MON_DTYPE = VSOCKMON_HEADER.numpy_dtype()
VIRTIO_DTYPE = VIRTIO_HEADER.numpy_dtype()
_HDRS_LEN = MON_HDR_LEN + VIRTIO_HDR_LEN


class Anomaly(IntFlag):
    """Something odd about one frame; flagged on the frame, never raised."""

    TRUNCATED = 1 << 0
    """The frame is shorter than the headers it announces."""
    SNAPLEN = 1 << 1
    """The capture kept fewer bytes than the packet had (snap length)."""
    PAYLOAD_LEN = 1 << 2
    """The captured payload length differs from the virtio header's ``len`` (tap bug)."""
    UNKNOWN_OP = 1 << 3
    UNKNOWN_TYPE = 1 << 4
    UNKNOWN_TRANSPORT = 1 << 5
    OP_MISMATCH = 1 << 6
    """The vsockmon op is not the one the kernel maps the virtio op to."""
    ADDR_MISMATCH = 1 << 7
    """CIDs or ports differ between the vsockmon and the virtio header."""
    TRANS_LEN = 1 << 8
    """A VIRTIO transport header whose announced length is not 44."""
    LINKTYPE = 1 << 9
    """The packet's interface is not a vsockmon one (mixed pcapng)."""


ANOMALY_NAMES: dict[Anomaly, str] = {
    Anomaly.TRUNCATED: "truncated",
    Anomaly.SNAPLEN: "snaplen",
    Anomaly.PAYLOAD_LEN: "payload-len-mismatch",
    Anomaly.UNKNOWN_OP: "unknown-op",
    Anomaly.UNKNOWN_TYPE: "unknown-type",
    Anomaly.UNKNOWN_TRANSPORT: "unknown-transport",
    Anomaly.OP_MISMATCH: "op-mismatch",
    Anomaly.ADDR_MISMATCH: "addr-mismatch",
    Anomaly.TRANS_LEN: "trans-len",
    Anomaly.LINKTYPE: "not-vsock",
}


def anomaly_names(bits: int) -> list[str]:
    """The names of the anomaly bits set in ``bits``, in a stable order."""
    return [name for flag, name in ANOMALY_NAMES.items() if bits & flag]


# Lookup tables indexed by a u16 field: the vsockmon op the kernel writes for each virtio
# op, and which ops and types are known.
_EXPECTED_MON_OP = np.full(65536, MonOp.UNKNOWN, dtype=np.uint16)
for _op, _mon in MON_OP_OF.items():
    _EXPECTED_MON_OP[_op] = _mon
_KNOWN_OPS = np.zeros(65536, dtype=bool)
_KNOWN_OPS[[int(o) for o in Op if o != Op.INVALID]] = True
_KNOWN_TYPES = np.zeros(65536, dtype=bool)
_KNOWN_TYPES[[int(t) for t in SockType]] = True


@dataclass
class FrameBatch:
    """Decoded columns for the packets of one batch (row i is frame ``first + i``)."""

    first: int
    buf: bytes
    ts_ns: np.ndarray
    caplen: np.ndarray
    orig_len: np.ndarray
    mon: np.ndarray
    virtio: np.ndarray
    has_mon: np.ndarray
    has_virtio: np.ndarray
    payload_off: np.ndarray
    payload_len: np.ndarray
    anomalies: np.ndarray

    def __len__(self) -> int:
        return len(self.ts_ns)

    def frame(self, i: int) -> Frame:
        return Frame(self, i)

    def frames(self) -> Iterator[Frame]:
        return (Frame(self, i) for i in range(len(self)))

    def payload(self, i: int) -> bytes:
        off = int(self.payload_off[i])
        return self.buf[off : off + int(self.payload_len[i])]

    def rows(self, idx: np.ndarray) -> slice | np.ndarray:
        """An index for the columns selecting rows ``idx`` (increasing, distinct): all of
        them as a slice, which numpy serves without a copy, when ``idx`` is every row."""
        return slice(None) if len(idx) == len(self) else idx

    def json_text(self, idx: np.ndarray) -> bytes:
        """Rows ``idx`` (increasing) as JSON Lines (UTF-8), each equal to
        ``json.dumps(records()[i])``.

        ``decode --json`` is a hot path: rows that carry both headers (nearly all) are
        formatted by compiled code from one template over the columns; the rest go through
        :meth:`records`. A test holds the two equal on every fixture.
        """
        return self.json_rows(idx).text()

    def json_rows(self, idx: np.ndarray) -> Rows:
        """:meth:`json_text` with the text itself not made yet (:class:`Rows`)."""
        sel = self.rows(idx)
        full = self.has_mon[sel] & self.has_virtio[sel]
        templates = [self._json_template(idx)]
        if not full.all():
            slow = [None if ok else _json(self.records(i, i + 1)[0]).encode()
                    for i, ok in zip(idx.tolist(), full.tolist(), strict=True)]
            templates.append([(_render.K_OPT, slow, b"")])
        return Rows(len(idx), np.where(full, 0, 1).astype(np.int8), templates)

    def _json_template(self, idx: np.ndarray) -> list[tuple[object, ...]]:
        """The JSON of a row with both headers, in the key order of :meth:`records`."""
        sel = self.rows(idx)
        mon, vio = self.mon[sel], self.virtio[sel]
        ts = self.ts_ns[sel]
        numbers: list[tuple[str, tuple[object, ...]]] = [
            ("frame.number", (_render.K_INT, (self.first + idx).astype(np.int64), 0)),
            ("frame.time_epoch", (_render.K_EPOCH, ts)),
            ("frame.time_ns", (_render.K_INT, ts, 0)),
            ("frame.len", (_render.K_INT, self.orig_len[sel], 0)),
            ("frame.cap_len", (_render.K_INT, self.caplen[sel], 0)),
        ]
        numbers += [(f.json_key, (_render.K_UINT, mon[f.name].astype(np.uint64)))
                    for f in VSOCKMON_HEADER.fields]
        numbers += [(f.json_key, (_render.K_UINT, vio[f.name].astype(np.uint64)))
                    for f in VIRTIO_HEADER.fields]
        op, typ = vio["op"].astype(np.int64), vio["type"].astype(np.int64)
        names: list[tuple[str, tuple[object, ...]]] = [
            ("vsock.op_name", dictionary_column(mon["op"], _json_name(MonOp))),
            ("vsock.trans_name", dictionary_column(mon["transport"], _json_name(Transport))),
            ("vsock.virtio.type_name", dictionary_column(typ, _json_name(SockType))),
            ("vsock.virtio.op_name", dictionary_column(op, _json_name(Op))),
            ("vsock.virtio.flags_names",
             dictionary_column(op << 48 | typ << 32 | vio["flags"], _json_flags)),
            ("payload_len", (_render.K_INT, self.payload_len[sel], 0)),
            ("anomalies", dictionary_column(self.anomalies[sel],
                                            lambda bits: _json(anomaly_names(bits)))),
        ]
        items: list[tuple[object, ...]] = []
        for i, (key, item) in enumerate(numbers + names):
            items += [(_render.K_LIT, ("{" if i == 0 else ",").encode() + _json(key).encode()
                       + b":"), item]
        return [*items, (_render.K_LIT, b"}")]

    def records(self, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
        """The flat JSON objects of rows ``start:stop``: Wireshark's vocabulary plus names.

        Built column-wise (``tolist`` once per column) because this is the ``--json`` hot
        path. Keys of an absent header are omitted; numbers stay numbers.
        """
        rows = slice(start, stop)
        n = len(self.ts_ns[rows])
        mon_keys = [(f.json_key, self.mon[f.name][rows].tolist()) for f in VSOCKMON_HEADER.fields]
        vio_keys = [(f.json_key, self.virtio[f.name][rows].tolist()) for f in VIRTIO_HEADER.fields]
        has_mon = self.has_mon[rows].tolist()
        has_virtio = self.has_virtio[rows].tolist()
        base = zip(
            range(self.first + start, self.first + start + n),
            self.ts_ns[rows].tolist(), self.orig_len[rows].tolist(), self.caplen[rows].tolist(),
            self.payload_len[rows].tolist(), self.anomalies[rows].tolist(), strict=True,
        )
        out = []
        for i, (number, ts, orig, cap, plen, bits) in enumerate(base):
            rec: dict[str, Any] = {
                # int / int is correctly rounded; ts / 1e9 would round ts to a float first
                "frame.number": number, "frame.time_epoch": ts / 1_000_000_000,
                "frame.time_ns": ts,
                "frame.len": orig, "frame.cap_len": cap,
            }
            if has_mon[i]:
                for key, col in mon_keys:
                    rec[key] = col[i]
            if has_virtio[i]:
                for key, col in vio_keys:
                    rec[key] = col[i]
            if has_mon[i]:
                rec["vsock.op_name"] = enum_name(MonOp, rec["vsock.op"])
                rec["vsock.trans_name"] = enum_name(Transport, rec["vsock.trans"])
            if has_virtio[i]:
                op, typ = rec["vsock.virtio.op"], rec["vsock.virtio.type"]
                rec["vsock.virtio.type_name"] = enum_name(SockType, typ)
                rec["vsock.virtio.op_name"] = enum_name(Op, op)
                rec["vsock.virtio.flags_names"] = flag_names(op, typ, rec["vsock.virtio.flags"])
            rec["payload_len"] = plen
            rec["anomalies"] = anomaly_names(bits) if bits else []
            out.append(rec)
        return out


_TRANSPORT_AT = next(f.offset for f in VSOCKMON_HEADER.fields if f.name == "transport")


def decode_batch(batch: RecordBatch, first: int) -> FrameBatch:
    """Decode every packet of ``batch``; ``first`` is the 1-based number of its first packet.

    The headers are copied out of the chunk by compiled code (``_walk.gather``), which zeroes
    a header the packet does not hold; everything else is a few numpy operations per column.
    """
    offs = np.frombuffer(batch.offsets, dtype=np.int64)
    cap = np.frombuffer(batch.caplens, dtype=np.int64)
    orig = np.frombuffer(batch.orig_lens, dtype=np.int64)
    mon = np.empty(len(offs), dtype=MON_DTYPE)
    virtio = np.empty(len(offs), dtype=VIRTIO_DTYPE)
    _walk.gather(batch.buf, offs, cap, MON_HDR_LEN, mon, VIRTIO_HDR_LEN, virtio, _TRANSPORT_AT,
                 Transport.VIRTIO)

    has_mon = cap >= MON_HDR_LEN
    trans_len = mon["trans_len"].astype(np.int64)
    # Like Wireshark, read a VIRTIO header whenever one fits, whatever ``trans_len`` claims
    # (a wrong claim is flagged); the payload starts where ``trans_len`` says.
    has_virtio = has_mon & (mon["transport"] == Transport.VIRTIO) & (cap >= _HDRS_LEN)

    hdrs = np.where(has_mon, MON_HDR_LEN + trans_len, 0)
    payload_len = np.where(has_mon, np.maximum(cap - hdrs, 0), 0)
    anomalies = _anomalies(batch, mon, virtio, has_mon, has_virtio, cap, orig, hdrs, payload_len)
    return FrameBatch(
        first=first,
        buf=batch.buf,
        ts_ns=np.frombuffer(batch.ts_ns, dtype=np.int64),
        caplen=cap,
        orig_len=orig,
        mon=mon,
        virtio=virtio,
        has_mon=has_mon,
        has_virtio=has_virtio,
        payload_off=offs + np.minimum(hdrs, cap),
        payload_len=payload_len,
        anomalies=anomalies,
    )


def _anomalies(batch: RecordBatch, mon: np.ndarray, virtio: np.ndarray, has_mon: np.ndarray,
               has_virtio: np.ndarray, cap: np.ndarray, orig: np.ndarray, hdrs: np.ndarray,
               payload_len: np.ndarray) -> np.ndarray:
    """The anomaly bits of every frame, computed column-wise."""
    out = np.zeros(len(cap), dtype=np.uint16)

    def flag(mask: np.ndarray, bit: Anomaly) -> None:
        out[mask] |= np.uint16(bit)

    snapped = orig > cap
    flag(~has_mon | (cap < hdrs), Anomaly.TRUNCATED)
    flag(snapped, Anomaly.SNAPLEN)
    transport = mon["transport"]
    flag(has_mon & ~np.isin(transport, [int(t) for t in Transport]), Anomaly.UNKNOWN_TRANSPORT)
    flag(has_mon & (transport == Transport.VIRTIO) & (mon["trans_len"] != VIRTIO_HDR_LEN),
         Anomaly.TRANS_LEN)
    other = np.frombuffer(batch.linktypes, dtype=np.int64) != LINKTYPE_VSOCK
    if other.any():  # no link types at all (a batch built by hand) means vsock
        flag(other, Anomaly.LINKTYPE)

    op, vtype = virtio["op"], virtio["type"]
    hv = has_virtio
    flag(hv & ~_KNOWN_OPS[op], Anomaly.UNKNOWN_OP)
    flag(hv & ~_KNOWN_TYPES[vtype], Anomaly.UNKNOWN_TYPE)
    whole = ~snapped & (cap >= hdrs)
    flag(hv & whole & (payload_len != virtio["len"]), Anomaly.PAYLOAD_LEN)
    flag(hv & (mon["op"] != _EXPECTED_MON_OP[op]), Anomaly.OP_MISMATCH)
    differ = np.zeros(len(cap), dtype=bool)
    for name in ("src_cid", "dst_cid", "src_port", "dst_port"):
        differ |= mon[name] != virtio[name]
    flag(hv & differ, Anomaly.ADDR_MISMATCH)
    return out


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _json_name(enum: type[IntEnum]) -> Callable[[int], str]:
    return lambda value: _json(enum_name(enum, value))


def _json_flags(key: int) -> str:
    """The JSON list of flag names of an ``op << 48 | type << 32 | flags`` key."""
    return _json(flag_names(key >> 48, key >> 32 & 0xFFFF, key & 0xFFFFFFFF))


def dictionary_column(keys: np.ndarray, text: Callable[[int], str]
                ) -> tuple[int, np.ndarray, tuple[bytes, ...]]:
    """A string column for ``_render.format_rows``, dictionary-encoded: each distinct key
    is rendered by ``text`` once, whatever the number of rows."""
    keys = keys.astype(np.int64)
    if len(keys) and keys.min() >= 0 and keys.max() < _SMALL_KEYS:
        # u16 fields (op, type, anomalies): a lookup table, no sort
        unique = np.flatnonzero(np.bincount(keys, minlength=1))
        code_of = np.zeros(int(unique[-1]) + 1, dtype=np.int32)
        code_of[unique] = np.arange(len(unique), dtype=np.int32)
        codes = code_of[keys]
    else:  # hashed in compiled code: np.unique sorts (7 ms per batch of 33k rows)
        codes = np.empty(len(keys), dtype=np.int32)
        unique = np.asarray(_render.factorize(keys, codes), dtype=np.int64)
    strings = tuple(text(int(k)).encode() for k in unique)
    return _render.K_STR, codes.astype(np.int32).reshape(-1), strings


_SMALL_KEYS = 1 << 17
"""Keys below this are dictionary-encoded by a lookup table instead of a sort."""


_EXACT_FROM_SEC = 1 << 29
"""From 2^29 s (1987) on, whole seconds plus the correctly rounded fraction is the double
nearest to the exact time: the fraction's error (at most 2^-54) is smaller than the distance
(1 / (10^9 · 2^(53-e)) for seconds in [2^e, 2^(e+1)), e ≥ 29) from any multiple of 10^-9
to a rounding midpoint, and no such multiple is a midpoint."""


def epoch_seconds(ts_ns: np.ndarray) -> np.ndarray:
    """Float seconds from integer nanoseconds, each the double nearest to the exact time
    (what Python's ``ns / 10**9`` gives), in bulk. ``ts_ns / 1e9`` rounds twice and
    misses by one unit in the last place for about a third of real capture times."""
    sec, frac = np.divmod(ts_ns.astype(np.int64), 1_000_000_000)
    out = sec.astype(np.float64) + frac / 1e9
    early = np.flatnonzero((sec < _EXACT_FROM_SEC) & (sec != 0))
    if len(early):  # before 1987, or relative times: exact, one at a time
        out[early] = [t / 1_000_000_000 for t in ts_ns[early].tolist()]
    return out


def decode_batches(batches: Iterable[RecordBatch]) -> Iterator[FrameBatch]:
    """Decode a stream of batches, numbering frames from 1 across them."""
    number = 1
    for batch in batches:
        fb = decode_batch(batch, number)
        number += len(fb)
        yield fb


class Frame:
    """One decoded frame: a row of a :class:`FrameBatch`, read field by field on demand."""

    __slots__ = ("_b", "_i")

    def __init__(self, batch: FrameBatch, index: int) -> None:
        self._b = batch
        self._i = index

    @property
    def number(self) -> int:
        return self._b.first + self._i

    @property
    def ts_ns(self) -> int:
        return int(self._b.ts_ns[self._i])

    @property
    def caplen(self) -> int:
        return int(self._b.caplen[self._i])

    @property
    def orig_len(self) -> int:
        return int(self._b.orig_len[self._i])

    @property
    def has_mon(self) -> bool:
        return bool(self._b.has_mon[self._i])

    @property
    def has_virtio(self) -> bool:
        return bool(self._b.has_virtio[self._i])

    @property
    def mon(self) -> dict[str, int]:
        row = self._b.mon[self._i]
        return {n: int(row[n]) for n in VSOCKMON_HEADER.names}

    @property
    def virtio(self) -> dict[str, int]:
        row = self._b.virtio[self._i]
        return {n: int(row[n]) for n in VIRTIO_HEADER.names}

    @property
    def payload(self) -> bytes:
        return self._b.payload(self._i)

    @property
    def payload_len(self) -> int:
        return int(self._b.payload_len[self._i])

    @property
    def anomalies(self) -> list[str]:
        return anomaly_names(int(self._b.anomalies[self._i]))

    @property
    def addr(self) -> tuple[int, int, int, int]:
        """(src_cid, src_port, dst_cid, dst_port), from the virtio header when present."""
        h = self.virtio if self.has_virtio else self.mon
        return h["src_cid"], h["src_port"], h["dst_cid"], h["dst_port"]

    def fields(self) -> dict[str, Any]:
        """The flat JSON object of this frame (see :meth:`FrameBatch.records`)."""
        return self._b.records(self._i, self._i + 1)[0]


def frames(batches: Iterable[RecordBatch]) -> Iterator[Frame]:
    """Every frame of a capture, in order."""
    for fb in decode_batches(batches):
        yield from fb.frames()
