"""The packets and connections tables, as Arrow record batches built from columns.

A packet batch comes straight from the decoder's numpy columns (and the tracker's per-row
tags) with no Python object per packet, so exporting a capture of millions of packets costs
little more than decoding it and memory stays at one batch. Column names and types derive
from the field tables in :mod:`vsockmon.wire.protocol` and
:data:`vsockmon.conntrack.tracker.RECORD_FIELDS`;
:data:`PACKET_COLUMNS` documents them (docs/export.md is checked against it). No I/O here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vsockmon.conntrack.records import RecordColumn
from vsockmon.conntrack.tracker import RECORD_FIELDS, ConnTable, Tags
from vsockmon.decode.frames import FrameBatch, anomaly_names, epoch_seconds
from vsockmon.payload import dissect_frame
from vsockmon.wire.protocol import (
    VIRTIO_HEADER,
    VSOCKMON_HEADER,
    Field,
    MonOp,
    Op,
    SockType,
    Transport,
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


def _flag_keys(virtio: np.ndarray) -> np.ndarray:
    """(op, type, flags) of each row packed in one integer: flag names depend on all three."""
    return (virtio["op"].astype(np.uint64) << np.uint64(48)) \
        | (virtio["type"].astype(np.uint64) << np.uint64(32)) | virtio["flags"].astype(np.uint64)


def _key_flag_names(k: int) -> list[str]:
    return flag_names((k >> 48) & 0xFFFF, (k >> 32) & 0xFFFF, k & 0xFFFFFFFF)


def _flag_texts(virtio: np.ndarray, mask: np.ndarray) -> pa.Array:
    """flag_names of each (op, type, flags) triple, computed once per distinct triple."""
    return _named(_flag_keys(virtio), lambda k: "|".join(_key_flag_names(k)), mask)


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


def connections_table(tables: ConnTable | Iterable[ConnTable], capture: str | None
                      ) -> pa.Table:
    """The connections table: one row per stream, the tracker's record fields (the keys of
    ``conns --json``), after a ``capture`` column naming the file unless ``capture`` is None.
    ``tables`` may be a tracker's ranges of streams (``Analysis.tables()``): each is turned
    into Arrow columns and let go, so a million connections are never held as a table of
    Python objects (or as the tracker's whole table)."""
    columns = CONNECTION_COLUMNS if capture is not None else CONNECTION_COLUMNS[1:]
    parts = [_connection_batch(t, capture, columns)
             for t in ([tables] if isinstance(tables, ConnTable) else tables)]
    if not parts:
        parts = [_connection_batch(None, capture, columns)]
    return pa.Table.from_batches(parts, schema=schema(columns))


def _connection_batch(table: ConnTable | None, capture: str | None,
                      columns: tuple[Column, ...]) -> pa.RecordBatch:
    """The Arrow columns of one table's records (no rows for None), from the record
    arrays: no Python value per connection."""
    if table is None:
        return pa.RecordBatch.from_pylist([], schema=schema(columns))
    cols = table.record_columns()
    arrays = [_record_array(cols[f.name], _KIND[f.kind]) for f in RECORD_FIELDS]
    if capture is not None:
        arrays.insert(0, pa.repeat(pa.scalar(capture, pa.string()), len(table)))
    return pa.RecordBatch.from_arrays(arrays, schema=schema(columns))


def _record_array(col: RecordColumn, kind: pa.DataType) -> pa.Array:
    """One record field as Arrow: ``cid:port`` of an end joined by Arrow, a coded string
    taken from its texts, numbers cast; null where the value is missing."""
    mask = col.missing
    if col.port is not None:
        return pc.binary_join_element_wise(pa.array(col.values).cast(pa.string()),
                                           pa.array(col.port).cast(pa.string()), ":")
    if col.texts is not None:
        codes = pa.array(col.values.astype(np.int64), mask=mask)
        return pa.array(col.texts, type=pa.string()).take(codes)
    return pa.array(col.values, mask=mask).cast(kind)


# -- the frames of ``decode --json`` as Arrow ------------------------------------------------

_NAMES = pa.list_(pa.string())
FRAME_SCHEMA = pa.schema(
    [pa.field("frame.number", pa.int64()), pa.field("frame.time_epoch", pa.float64()),
     pa.field("frame.time_ns", pa.int64()), pa.field("frame.len", pa.int64()),
     pa.field("frame.cap_len", pa.int64())]
    + [pa.field(f.json_key, _UINT[f.size]) for f in VSOCKMON_HEADER.fields]
    + [pa.field(f.json_key, _UINT[f.size]) for f in VIRTIO_HEADER.fields]
    + [pa.field("vsock.op_name", pa.string()), pa.field("vsock.trans_name", pa.string()),
       pa.field("vsock.virtio.type_name", pa.string()),
       pa.field("vsock.virtio.op_name", pa.string()),
       pa.field("vsock.virtio.flags_names", _NAMES),
       pa.field("payload_len", pa.int64()), pa.field("anomalies", _NAMES)])
"""One column per key of ``vsockmon decode --json``, in its order; a header the frame lacks
gives nulls where the JSON object leaves the keys out."""


def _lookup(codes: np.ndarray, value: Callable[[int], object], kind: pa.DataType,
            mask: np.ndarray | None = None) -> pa.Array:
    """``value(code)`` for every code, computed once per distinct code; null where ``mask``."""
    uniq, inverse = np.unique(codes, return_inverse=True)
    values = pa.array([value(int(u)) for u in uniq], type=kind)
    return values.take(pa.array(inverse.astype(np.int64), mask=mask))


def frames_batch(fb: FrameBatch) -> pa.RecordBatch:
    """The rows of ``decode --json`` for a decoded batch, as one Arrow record batch, column
    by column (no Python object per frame)."""
    no_mon, no_virtio = ~fb.has_mon, ~fb.has_virtio
    v = fb.virtio
    arrays: list[pa.Array] = [
        pa.array(fb.first + np.arange(len(fb), dtype=np.int64)),
        pa.array(epoch_seconds(fb.ts_ns)),
        pa.array(fb.ts_ns),
        pa.array(fb.orig_len),
        pa.array(fb.caplen),
        *(pa.array(np.ascontiguousarray(fb.mon[n]), mask=no_mon)
          for n in VSOCKMON_HEADER.names),
        *(pa.array(np.ascontiguousarray(v[n]), mask=no_virtio) for n in VIRTIO_HEADER.names),
        _lookup(fb.mon["op"], _enum_names(MonOp), pa.string(), no_mon),
        _lookup(fb.mon["transport"], _enum_names(Transport), pa.string(), no_mon),
        _lookup(v["type"], _enum_names(SockType), pa.string(), no_virtio),
        _lookup(v["op"], _enum_names(Op), pa.string(), no_virtio),
        _lookup(_flag_keys(v), _key_flag_names, _NAMES, no_virtio),
        pa.array(fb.payload_len),
        _lookup(fb.anomalies, anomaly_names, _NAMES),
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=FRAME_SCHEMA)
