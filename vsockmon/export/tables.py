"""The packets and connections tables, as Arrow record batches built from columns.

A packet batch comes straight from the decoder's numpy columns (and the tracker's per-row
tags) with no Python object per packet, so exporting a capture of millions of packets costs
little more than decoding it and memory stays at one batch. Column names and types derive
from the field tables in :mod:`vsockmon.wire.protocol` and
:data:`vsockmon.conntrack.tracker.RECORD_FIELDS`;
:data:`PACKET_COLUMNS` documents them (docs/export.md is checked against it). No I/O here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import pyarrow as pa

from vsockmon.conntrack.tracker import RECORD_FIELDS, ConnTable, Tags
from vsockmon.decode.frames import FrameBatch, anomaly_names
from vsockmon.payload import dissect_frame
from vsockmon.wire.protocol import (
    VIRTIO_HEADER,
    VSOCKMON_HEADER,
    Field,
    MonOp,
    Op,
    SockType,
    enum_name,
    flag_names,
)

_UINT = {1: pa.uint8(), 2: pa.uint16(), 4: pa.uint32(), 8: pa.uint64()}
TIME_TYPE = pa.timestamp("ns", tz="UTC")
_DICT = pa.dictionary(pa.int32(), pa.string())


@dataclass(frozen=True)
class Column:
    """One column of an exported table: its name, Arrow type and meaning."""

    name: str
    type: pa.DataType
    doc: str


_DOCS = {f.name: f.doc for f in (*VSOCKMON_HEADER.fields, *VIRTIO_HEADER.fields) if f.doc}


def _header_columns(prefix: str, fields: tuple[Field, ...], what: str) -> list[Column]:
    return [Column(f"{prefix}{f.name}", _UINT[f.size],
                   f"{what} {f.doc or _DOCS.get(f.name, f.name)} (Wireshark `{f.wireshark}`)")
            for f in fields]


PACKET_COLUMNS: tuple[Column, ...] = (
    Column("capture", pa.string(), "capture file the packet comes from (its name)"),
    Column("frame", pa.int64(), "frame number, from 1 (as in Wireshark)"),
    Column("ts_ns", pa.int64(), "capture time, nanoseconds since the epoch"),
    Column("time", TIME_TYPE, "capture time as a UTC timestamp (ns)"),
    Column("caplen", pa.int64(), "bytes captured"),
    Column("orig_len", pa.int64(), "bytes on the wire"),
    *_header_columns("mon_", VSOCKMON_HEADER.fields, "vsockmon header:"),
    Column("mon_op_name", _DICT, "vsockmon op name (CONNECT, DISCONNECT, CONTROL, PAYLOAD…)"),
    *_header_columns("", VIRTIO_HEADER.fields, "virtio header:"),
    Column("type_name", _DICT, "socket type name: STREAM, SEQPACKET (UNKNOWN(n) otherwise)"),
    Column("op_name", _DICT, "virtio op name; 7 is CREDIT_REQUEST"),
    Column("flag_names", _DICT, "flag bits by name for the op: RCV|SEND (SHUTDOWN), "
                                "EOM|EOR (SEQPACKET RW); empty when none"),
    Column("payload_len", pa.int64(), "payload bytes captured (the virtio `len` is the truth: "
                                      "the kernel's tap-length bug)"),
    Column("anomalies", pa.uint16(), "anomaly bits (vsockmon.decode.frames.Anomaly)"),
    Column("anomaly_names", _DICT, "anomaly names, comma-separated; empty when none"),
    Column("stream", pa.int64(), "connection index, as `vsockmon conns` and the Wireshark "
                                 "plugin's vsockmon.stream; null without a virtio header"),
    Column("dir", _DICT, "c2s (client to server) or s2c"),
    Column("in_flight", pa.int64(), "sender's bytes not yet consumed by the peer, after this "
                                    "packet; null while the peer's credit is unknown"),
    Column("credit_limit", pa.int64(), "the peer's advertised buf_alloc for this sender"),
)
"""Columns of the packets table, in order (virtio/vsockmon fields are null when absent)."""

PAYLOAD_COLUMNS: tuple[Column, ...] = (
    Column("payload_proto", _DICT, "payload protocol (ttrpc, json, sd_notify, http, text…); "
                                   "only with --payload"),
    Column("payload_summary", pa.string(), "one-line payload summary; only with --payload"),
)

_KIND = {int: pa.int64(), str: pa.string(), bool: pa.bool_(), float: pa.float64()}
CONNECTION_COLUMNS: tuple[Column, ...] = (
    Column("capture", pa.string(), "capture file the connection comes from (its name)"),
    *(Column(f.name, _KIND[f.kind], f.doc) for f in RECORD_FIELDS),
)
"""Columns of the connections table: the tracker's connection record."""


def schema(columns: tuple[Column, ...]) -> pa.Schema:
    return pa.schema([pa.field(c.name, c.type) for c in columns])


def packet_schema(payload: bool = False) -> pa.Schema:
    return schema(PACKET_COLUMNS + (PAYLOAD_COLUMNS if payload else ()))


def _named(values: np.ndarray, name: Callable[[int], str], mask: np.ndarray) -> pa.Array:
    """Names for integer codes as a dictionary array, one name lookup per distinct code."""
    uniq, inverse = np.unique(values, return_inverse=True)
    names = pa.array([name(int(u)) for u in uniq], type=pa.string())
    return pa.DictionaryArray.from_arrays(pa.array(inverse.astype(np.int32), mask=mask), names)


def _enum_names(enum: type[IntEnum]) -> Callable[[int], str]:
    return lambda v: enum_name(enum, v)


def _flag_texts(virtio: np.ndarray, mask: np.ndarray) -> pa.Array:
    """flag_names of each (op, type, flags) triple, computed once per distinct triple."""
    key = (virtio["op"].astype(np.uint64) << np.uint64(48)) \
        | (virtio["type"].astype(np.uint64) << np.uint64(32)) | virtio["flags"].astype(np.uint64)

    def name(k: int) -> str:
        return "|".join(flag_names((k >> 48) & 0xFFFF, (k >> 32) & 0xFFFF, k & 0xFFFFFFFF))

    return _named(key, name, mask)


def _payload_columns(fb: FrameBatch) -> list[pa.Array]:
    """Protocol and summary of each RW payload (Python per RW packet: opt-in)."""
    n = len(fb)
    protos: list[str | None] = [None] * n
    summaries: list[str | None] = [None] * n
    rw = fb.has_virtio & (fb.virtio["op"] == Op.RW) & (fb.virtio["len"] > 0)
    for i in np.flatnonzero(rw).tolist():
        info = dissect_frame(fb.frame(i))
        if info is not None:
            protos[i], summaries[i] = info.protocol, info.summary
    return [pa.array(protos, type=pa.string()).dictionary_encode(),
            pa.array(summaries, type=pa.string())]


def packet_batch(fb: FrameBatch, tags: Tags, capture: str, payload: bool = False
                 ) -> pa.RecordBatch:
    """One record batch of the packets table for a decoded batch and its tracker tags."""
    n = len(fb)
    no_mon, no_virtio = ~fb.has_mon, ~fb.has_virtio
    arrays: list[pa.Array] = [
        pa.repeat(pa.scalar(capture, pa.string()), n),
        pa.array(fb.first + np.arange(n, dtype=np.int64)),
        pa.array(fb.ts_ns),
        pa.array(fb.ts_ns).cast(TIME_TYPE),
        pa.array(fb.caplen),
        pa.array(fb.orig_len),
    ]
    arrays += [pa.array(np.ascontiguousarray(fb.mon[name]), mask=no_mon)
               for name in VSOCKMON_HEADER.names]
    arrays.append(_named(fb.mon["op"], _enum_names(MonOp), no_mon))
    arrays += [pa.array(np.ascontiguousarray(fb.virtio[name]), mask=no_virtio)
               for name in VIRTIO_HEADER.names]
    arrays += [
        _named(fb.virtio["type"], _enum_names(SockType), no_virtio),
        _named(fb.virtio["op"], _enum_names(Op), no_virtio),
        _flag_texts(fb.virtio, no_virtio),
        pa.array(fb.payload_len),
        pa.array(fb.anomalies),
        _named(fb.anomalies, lambda bits: ",".join(anomaly_names(bits)), np.zeros(n, bool)),
    ]
    no_stream = tags.stream < 0
    sender = np.maximum(tags.sender.astype(np.int64), 0)
    rows = np.arange(n)
    flight = tags.in_flight[rows, sender]
    limit = tags.limit[rows, sender]
    arrays += [
        pa.array(tags.stream, mask=no_stream),
        pa.DictionaryArray.from_arrays(pa.array(sender.astype(np.int32), mask=no_stream),
                                       pa.array(["c2s", "s2c"])),
        pa.array(flight, mask=no_stream | (flight < 0)),
        pa.array(limit, mask=no_stream | (limit < 0)),
    ]
    if payload:
        arrays += _payload_columns(fb)
    return pa.RecordBatch.from_arrays(arrays, schema=packet_schema(payload))


def connections_table(table: ConnTable, capture: str) -> pa.Table:
    """The connections table: one row per stream, the tracker's record fields."""
    cols = table.columns()
    n = len(table)
    arrays = [pa.repeat(pa.scalar(capture, pa.string()), n)]
    for f in RECORD_FIELDS:
        values = cols[f.name]
        kind = _KIND[f.kind]
        arrays.append(pa.array(values, type=kind) if isinstance(values, list)
                      else pa.array(np.asarray(values)).cast(kind))
    return pa.Table.from_arrays(arrays, schema=schema(CONNECTION_COLUMNS))
