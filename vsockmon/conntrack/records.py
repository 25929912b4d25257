"""The tracker's results: the connection table, its flat records and how each connection closed.

:func:`results` turns the tracker's per-stream columns and control events into a
:class:`ConnTable`: :class:`~vsockmon.conntrack.model.Connection` objects on demand, and the
flat records of ``conns --json`` (:data:`RECORD_FIELDS`) as columns. No I/O here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vsockmon.conntrack.model import (
    CLIENT,
    NONE,
    PROTOCOL_VIOLATIONS,
    ROLES,
    SERVER,
    VIOLATIONS,
    Close,
    Connection,
    Event,
    Evidence,
    Side,
    Stalls,
    stall_end_ns,
)
from vsockmon.wire.protocol import Op, ShutdownFlag, SockType, enum_name

U32_MASK = (1 << 32) - 1


def first_per(keys: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """Minimum of ``values`` per key in ``range(size)`` (NONE where a key has none): the
    first frame of a kind per stream end, with no Python loop over the ends."""
    out = np.full(size, NONE, dtype=np.int64)
    np.minimum.at(out, keys, values)
    return out


def _or_per_key(keys: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """Bitwise OR of ``values`` per key in ``range(size)`` (0 where a key has none), the
    ``keys`` ascending: one reduction over their runs (``np.bitwise_or.at``, an unbuffered
    loop, was most of :func:`results`' time)."""
    out = np.zeros(size, dtype=np.int64)
    if len(keys):
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        out[keys[starts]] = np.bitwise_or.reduceat(values, starts)
    return out


def results(cols: dict[str, np.ndarray], events: dict[str, np.ndarray], n: int,
            end_ns: int) -> ConnTable:
    """The table of ``n`` streams from the tracker's columns and its control events (sorted
    by stream, then frame), closed off as the capture ended at ``end_ns``."""
    _end_stalls(cols, end_ns)
    _closes(cols, events, n)
    return ConnTable(cols, events)


def _end_stalls(c: dict[str, np.ndarray], end_ns: int) -> None:
    """A stall still running lasts until the capture's end (:func:`stall_end_ns`)."""
    open_ = c["stalled"]
    dur = np.where(open_, stall_end_ns(None, end_ns) - c["stall_ts"], 0)
    c["stall_total"] = c["stall_total"] + dur
    longer = open_ & (dur > c["stall_max"])
    c["stall_max"] = np.where(longer, dur, np.maximum(c["stall_max"], 0))
    c["stall_longest"] = np.where(longer, c["stall_frame"], c["stall_longest"])


def _closes(c: dict[str, np.ndarray], ev: dict[str, np.ndarray], n: int) -> None:
    """Handshake, shutdown, reset and close columns from the control events (sorted by
    stream, then frame)."""
    sid, frame, ts, op, sender, flags = (ev[k] for k in
                                         ("sid", "frame", "ts", "op", "sender", "flags"))
    side_key = sid * 2 + sender

    def first(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per stream: index of its first event matching ``mask`` (or -1), and whether."""
        pos = np.flatnonzero(mask)
        idx = np.full(n, -1, dtype=np.int64)
        streams, at = np.unique(sid[pos], return_index=True)
        idx[streams] = pos[at]
        return idx, idx >= 0

    def pick(col: np.ndarray, idx: np.ndarray, unset: int = NONE) -> np.ndarray:
        return np.where(idx >= 0, col[idx], unset) if len(col) else np.full(n, unset)

    req, has_req = first(op == Op.REQUEST)
    rst, has_rst = first(op == Op.RST)
    rst_frame = pick(frame, rst)
    resp, has_resp = first(op == Op.RESPONSE)
    c["request_frame"], c["response_frame"] = pick(frame, req), pick(frame, resp)
    resp_first = has_resp & (pick(frame, resp) < rst_frame)

    is_rst, is_shut = op == Op.RST, op == Op.SHUTDOWN
    c["rst_count"] = np.bincount(side_key[is_rst], minlength=2 * n).reshape(n, 2)
    c["rst_frame"] = first_per(side_key[is_rst], frame[is_rst], 2 * n).reshape(n, 2)
    c["shut_frame"] = first_per(side_key[is_shut], frame[is_shut], 2 * n).reshape(n, 2)
    # per side, the SHUTDOWNs' side keys ascend with their streams
    by_side = [is_shut & (sender == side) for side in (CLIENT, SERVER)]
    c["shut_flags"] = np.bitwise_or(*(_or_per_key(side_key[m], flags[m], 2 * n)
                                      for m in by_side)).reshape(n, 2)

    # Directions shut before the first RST: bit 0 client→server, bit 1 server→client. A
    # SEND shutdown closes the sender's direction, RCV the peer's.
    pre = is_shut & (frame < rst_frame[sid])
    send, rcv = (flags & ShutdownFlag.SEND) != 0, (flags & ShutdownFlag.RCV) != 0
    own_bit, peer_bit = 1 << sender, 1 << (1 - sender)
    bits = np.where(send, own_bit, 0) | np.where(rcv, peer_bit, 0)
    both = _or_per_key(sid[pre], bits[pre], n) == 3
    pre_pos = np.flatnonzero(pre)
    latest = np.r_[sid[pre_pos][1:] != sid[pre_pos][:-1], True] if len(pre_pos) else []
    last_shut = np.full(n, -1, dtype=np.int64)
    last_shut[sid[pre_pos[latest]]] = pre_pos[latest]

    rst_sender = pick(sender, rst, -1)
    refused = has_rst & ~both & has_req & ~resp_first & (rst_sender == SERVER)
    kinds = np.select(
        [has_rst & both, refused, has_rst & (rst_sender == CLIENT), has_rst,
         (last_shut >= 0) & both, last_shut >= 0, has_req & ~has_resp],
        [_CLOSE_CODE[k] for k in (Close.GRACEFUL, Close.REFUSED, Close.RESET_BY_CLIENT,
                                  Close.RESET_BY_SERVER, Close.CLOSING, Close.HALF_CLOSED,
                                  Close.UNANSWERED)],
        _CLOSE_CODE[Close.OPEN])
    c["close"] = kinds
    close_ev = np.where(has_rst, rst, last_shut)
    c["close_frame"] = pick(frame, close_ev)
    c["close_by"] = pick(sender, close_ev, -1)
    answer = np.where(refused, rst, np.where(has_resp, resp, -1))
    c["handshake"] = np.where(has_req & (answer >= 0), pick(ts, answer, 0) - pick(ts, req, 0),
                              NONE)


CLOSES = tuple(Close)
_CLOSE_CODE = {k: i for i, k in enumerate(CLOSES)}


@dataclass(frozen=True)
class RecordField:
    """One key of a connection's flat record (``conns --json``/``--csv``)."""

    name: str
    kind: type
    doc: str


def _fields(*specs: tuple[str, type, str]) -> tuple[RecordField, ...]:
    return tuple(RecordField(*s) for s in specs)


RECORD_FIELDS = _fields(
    ("stream", int, "stream index (the shared numbering rule)"),
    ("type", str, "STREAM or SEQPACKET (UNKNOWN(n) for other values)"),
    ("client", str, "client end as cid:port (the REQUEST's sender, or the guess)"),
    ("server", str, "server end as cid:port"),
    ("client_cid", int, "client CID"),
    ("client_port", int, "client port"),
    ("server_cid", int, "server CID"),
    ("server_port", int, "server port"),
    ("start_seen", bool, "the REQUEST was captured (false: mid-connection, roles guessed)"),
    ("start", float, "time of the first frame, seconds since the epoch"),
    ("end", float, "time of the last frame, seconds since the epoch"),
    ("duration", float, "end - start, seconds"),
    ("first_frame", int, "number of the first frame"),
    ("last_frame", int, "number of the last frame"),
    ("request_frame", int, "frame of the REQUEST"),
    ("response_frame", int, "frame of the first RESPONSE"),
    ("handshake_ms", float, "REQUEST to RESPONSE (or to the refusing RST), milliseconds"),
    ("close", str, "how it ended: " + ", ".join(CLOSES)),
    ("close_frame", int, "the first RST, or the last SHUTDOWN when there was no RST"),
    ("close_by", str, "client or server: who sent close_frame"),
    ("packets", int, "frames both ways"),
    ("bytes", int, "payload bytes both ways (sum of the virtio len of RW packets)"),
    ("packets_c2s", int, "frames the client sent"),
    ("packets_s2c", int, "frames the server sent"),
    ("bytes_c2s", int, "payload bytes the client sent"),
    ("bytes_s2c", int, "payload bytes the server sent"),
    ("rw_c2s", int, "RW packets the client sent"),
    ("rw_s2c", int, "RW packets the server sent"),
    ("messages_c2s", int, "SEQPACKET: messages (EOM) the client sent; null for STREAM"),
    ("messages_s2c", int, "SEQPACKET: messages (EOM) the server sent; null for STREAM"),
    ("records_c2s", int, "SEQPACKET: messages with EOR the client sent"),
    ("records_s2c", int, "SEQPACKET: messages with EOR the server sent"),
    ("first_rw_frame", int, "first RW frame either way"),
    ("last_rw_frame", int, "last RW frame either way"),
    ("shutdown_client", str, "SHUTDOWN flags the client sent (RCV|SEND)"),
    ("shutdown_server", str, "SHUTDOWN flags the server sent"),
    ("shutdown_client_frame", int, "first SHUTDOWN from the client"),
    ("shutdown_server_frame", int, "first SHUTDOWN from the server"),
    ("rst_client", int, "RSTs the client sent"),
    ("rst_server", int, "RSTs the server sent"),
    ("buf_alloc_client", int, "receive buffer the client advertised last"),
    ("buf_alloc_server", int, "receive buffer the server advertised last"),
    ("credit_updates_c2s", int, "CREDIT_UPDATEs the client sent"),
    ("credit_updates_s2c", int, "CREDIT_UPDATEs the server sent"),
    ("credit_requests_c2s", int, "CREDIT_REQUESTs the client sent"),
    ("credit_requests_s2c", int, "CREDIT_REQUESTs the server sent"),
    ("max_in_flight_c2s", int, "most client bytes not yet consumed by the server"),
    ("max_in_flight_s2c", int, "most server bytes not yet consumed by the client"),
    ("credit_stalls", int, "zero-credit stalls, both directions"),
    ("stalls_c2s", int, "stalls of the client as sender (server's buffer full)"),
    ("stalls_s2c", int, "stalls of the server as sender"),
    ("stall_time", float, "total stalled time, both directions, seconds"),
    ("max_stall_ms", float, "longest stall, milliseconds"),
    ("stalled_at_end", bool, "a sender still had no credit at the connection's last frame"),
    ("violations", int, "protocol violations (beyond credit, after shutdown, before response), "
                        "both directions; tap-length frames are not among them"),
    ("beyond_credit", int, "RW packets carrying more than the peer's free credit"),
    ("after_shutdown", int, "RW packets sent after the sender's own SHUTDOWN(SEND)"),
    ("before_response", int, "RW packets before the RESPONSE"),
    ("tap_length", int, "frames whose captured payload length differs from len (tap bug)"),
    ("first_violation_frame", int, "first frame with a protocol violation"),
)
"""The keys of a connection record, in output order."""


class ConnTable:
    """Every connection of a capture as columns, with :class:`Connection` objects on demand.

    Row ``i`` is stream ``i`` (``table[i]``), unless a live tracker forgot streams: then the
    rows are the streams it kept, in order, and each Connection says its stream.

    ``for conn in table`` and ``table[i]`` give dataclasses (what rule engines want);
    :meth:`columns` gives the flat record fields as numpy arrays or lists (what filters,
    sorting and the JSON/CSV writers want, a million connections at a time).
    """

    def __init__(self, cols: dict[str, np.ndarray], events: dict[str, np.ndarray]) -> None:
        self._c = cols
        self._ev = events
        self._n = len(cols["type"])
        self._ev_start = np.searchsorted(events["sid"], np.arange(self._n + 1)).tolist()
        self._lists: tuple[dict[str, list], tuple[dict[str, list], ...]] | None = None
        self._ev_rows: list[Event] | None = None
        self._records: dict[str, np.ndarray | list] | None = None
        self._arrays: dict[str, RecordColumn] | None = None

    def __len__(self) -> int:
        return self._n

    def take(self, rows: np.ndarray) -> ConnTable:
        """The table of ``rows`` (ascending) only: what a top ten of a million keeps."""
        ev = self._ev
        keep = np.isin(ev["sid"], rows)
        events = {k: c[keep] for k, c in ev.items()}
        events["sid"] = np.searchsorted(rows, events["sid"])
        return ConnTable({k: c[rows] for k, c in self._c.items()}, events)

    @staticmethod
    def concat(tables: Sequence[ConnTable]) -> ConnTable:
        """One table of ``tables``' rows, in that order (tables of ascending streams)."""
        cols = {k: np.concatenate([t._c[k] for t in tables]) for k in tables[0]._c}
        offsets = np.cumsum([0, *(len(t) for t in tables[:-1])]).tolist()
        events = {k: np.concatenate([t._ev[k] + at if k == "sid" else t._ev[k]
                                     for t, at in zip(tables, offsets, strict=True)])
                  for k in tables[0]._ev}
        return ConnTable(cols, events)

    def column(self, name: str) -> np.ndarray:
        """One of the tracker's own columns (``stream``, ``close`` as an index into
        :data:`CLOSES`, ``request_frame`` with :data:`~vsockmon.conntrack.model.NONE` for
        none, per-role ``cid`` and ``port``...): what a reader scanning a million
        connections for a few reads instead of a Connection each."""
        return self._c[name]

    def __iter__(self) -> Iterator[Connection]:
        if self._ev_rows is None:  # all events at once: far cheaper than per connection
            self._ev_rows = list(map(Event._make, zip(
                *(self._ev[k].tolist() for k in _EV_COLS), strict=True)))
        return (self[i] for i in range(self._n))

    def __getitem__(self, i: int) -> Connection:
        if not 0 <= i < self._n:
            raise IndexError(f"no stream {i}")
        c, roles = self._columns_as_lists()
        seq = c["type"][i] == SockType.SEQPACKET
        a, b = self._ev_start[i], self._ev_start[i + 1]
        if self._ev_rows is not None:
            events = tuple(self._ev_rows[a:b])
        else:
            events = tuple(map(Event._make, zip(*(self._ev[k][a:b].tolist() for k in _EV_COLS),
                                                strict=True)))
        return Connection(
            stream=c["stream"][i], type=c["type"][i],
            client=self._side(roles[CLIENT], i, CLIENT, seq),
            server=self._side(roles[SERVER], i, SERVER, seq), start_seen=c["start_seen"][i],
            first_frame=c["first_frame"][i], last_frame=c["last_frame"][i],
            first_ts_ns=c["first_ts"][i], last_ts_ns=c["last_ts"][i],
            request_frame=_opt(c["request_frame"][i]),
            response_frame=_opt(c["response_frame"][i]), handshake_ns=_opt(c["handshake"][i]),
            close=CLOSES[c["close"][i]], close_frame=_opt(c["close_frame"][i]),
            close_by=ROLES[c["close_by"][i]] if c["close_by"][i] >= 0 else None, events=events)

    def _columns_as_lists(self) -> tuple[dict[str, list], tuple[dict[str, list], ...]]:
        """The columns as Python lists: the per-stream ones, then one dict per role of the
        per-side ones (violation columns as ``name@kind``). Reading a Connection is then
        only list indexing."""
        if self._lists is None:
            common: dict[str, list] = {}
            roles: tuple[dict[str, list], ...] = ({}, {})
            for k, v in self._c.items():
                if v.ndim == 1:
                    common[k] = v.tolist()
                    continue
                for role in (CLIENT, SERVER):
                    if v.ndim == 2:
                        roles[role][k] = v[:, role].tolist()
                    else:
                        for j in range(v.shape[2]):
                            roles[role][f"{k}@{j}"] = v[:, role, j].tolist()
            self._lists = common, roles
        return self._lists

    @staticmethod
    def _side(c: dict[str, list], i: int, role: int, seq: bool) -> Side:
        violations = {}
        for j, kind in enumerate(VIOLATIONS):
            count = c[f"violation_count@{j}"][i]
            if count:
                violations[kind] = Evidence(count, c[f"violation_first@{j}"][i],
                                            c[f"violation_last@{j}"][i])
        stalls = _NO_STALLS if not c["stalls"][i] else Stalls(
            c["stalls"][i], c["stall_total"][i], c["stall_max"][i], _opt(c["stall_first"][i]),
            c["stall_longest"][i] or None, c["stalled"][i])
        known = c["credit_known"][i]
        return Side(
            role=ROLES[role], cid=c["cid"][i], port=c["port"][i], packets=c["packets"][i],
            rw_packets=c["rw_packets"][i], bytes=c["tx_bytes"][i],
            messages=c["eom_packets"][i] if seq else None,
            records=c["eor_packets"][i] if seq else None, credit_updates=c["credit_updates"][i],
            credit_requests=c["credit_requests"][i],
            buf_alloc=c["buf_alloc"][i] if known else None,
            fwd_cnt=(c["fwd_raw"][i] - c["fwd_unw"][i] + c["fwd_max"][i]) & U32_MASK
            if known else None,
            first_rw_frame=_opt(c["first_rw_frame"][i]),
            last_rw_frame=c["last_rw_frame"][i] or None,
            shutdown_flags=c["shut_flags"][i], shutdown_frame=_opt(c["shut_frame"][i]),
            rst_frame=_opt(c["rst_frame"][i]), rst_count=c["rst_count"][i],
            max_in_flight=_opt(c["max_in_flight"][i], -1), min_credit=_opt(c["min_credit"][i]),
            stalls=stalls, violations=violations)

    def columns(self) -> dict[str, np.ndarray | list]:
        """The record fields (:data:`RECORD_FIELDS`) as columns; None marks a missing value."""
        if self._records is None:
            self._records = {k: col.python() for k, col in self.record_columns().items()}
        return self._records

    def record_columns(self) -> dict[str, RecordColumn]:
        """The record fields as numpy arrays (:class:`RecordColumn`): what a writer of a
        million records formats without a Python object per record."""
        if self._arrays is None:
            self._arrays = _record_columns(self._c)
        return self._arrays

    def records(self, rows: Iterable[int] | None = None) -> list[dict[str, Any]]:
        """The flat records of ``rows`` (default: all), in that order: JSON values (int,
        float, str, bool or None, as :data:`RECORD_FIELDS` says). Only those rows' values
        are made: the top ten of a million cost ten records."""
        arrays = self.record_columns()
        idx = np.arange(self._n) if rows is None else np.fromiter(rows, dtype=np.int64)
        names = [f.name for f in RECORD_FIELDS]
        lists = [_as_list(arrays[name].take(idx).python()) for name in names]
        return [dict(zip(names, values, strict=True)) for values in zip(*lists, strict=True)]


_EV_COLS = ("frame", "ts", "op", "sender", "flags", "len", "buf", "fwd")
_NO_STALLS = Stalls()


def _opt(value: int, unset: int = NONE) -> int | None:
    return None if value == unset else value


def _as_list(col: np.ndarray | list) -> list:
    return col if isinstance(col, list) else col.tolist()


@dataclass(frozen=True)
class RecordColumn:
    """One record field over a table's rows as numpy arrays: what the JSON and CSV writers
    format without a Python object per connection, and what :meth:`ConnTable.columns`
    turns into Python values, so each field is derived once, here."""

    values: np.ndarray
    """The numbers or booleans; codes into :attr:`texts`; the CIDs of an end."""
    missing: np.ndarray | None = None
    """Where the value is missing (None), for a field that can miss one."""
    texts: tuple[str, ...] | None = None
    """The strings :attr:`values` index, for a string field other than an end."""
    port: np.ndarray | None = None
    """The ports of an end (client, server), shown ``cid:port``."""

    def take(self, rows: np.ndarray) -> RecordColumn:
        """The column at ``rows`` only."""
        return RecordColumn(self.values[rows],
                            None if self.missing is None else self.missing[rows], self.texts,
                            None if self.port is None else self.port[rows])

    def python(self) -> np.ndarray | list:
        """The column as :meth:`ConnTable.columns` gives it: the numpy array where nothing
        can be missing, else a list of Python values with None where missing."""
        if self.port is not None:
            return [f"{a}:{p}" for a, p in zip(self.values.tolist(), self.port.tolist(),
                                                strict=True)]
        if self.texts is not None:
            values = np.asarray(self.texts, dtype=object)[self.values].tolist()
        elif self.missing is None:
            return self.values
        else:
            values = self.values.tolist()
        if self.missing is not None:
            for i in np.flatnonzero(self.missing).tolist():
                values[i] = None
        return values


def _nullable(col: np.ndarray, unset: np.ndarray | int) -> RecordColumn:
    """``col``, missing where it equals ``unset`` (or where ``unset`` is True)."""
    missing = unset if isinstance(unset, np.ndarray) and unset.dtype == bool else col == unset
    return RecordColumn(col, missing)


def _coded(values: np.ndarray, name: Callable[[int], str]) -> RecordColumn:
    """A string column from a column of small numbers and how one is named."""
    distinct, codes = np.unique(values, return_inverse=True)
    return RecordColumn(codes.reshape(-1), texts=tuple(name(v) for v in distinct.tolist()))


def _flag_text(v: int) -> str:
    return "|".join(str(f.name) for f in ShutdownFlag if v & f)


def _both(col: np.ndarray, op: np.ufunc = np.add) -> np.ndarray:
    """``op`` of a per-side column's two sides: numpy's reductions along an axis of two
    take a step per row, several times an elementwise ufunc."""
    return op(col[:, 0], col[:, 1])


def _record_columns(c: dict[str, np.ndarray]) -> dict[str, RecordColumn]:
    """Every record field as a column, derived from the tracker's table."""
    cid, port = c["cid"], c["port"]
    seq = c["type"] == SockType.SEQPACKET
    plain = RecordColumn
    out: dict[str, RecordColumn] = {"stream": plain(c["stream"])}
    out["type"] = _coded(c["type"], lambda v: enum_name(SockType, v))
    for role, name in enumerate(ROLES):
        out[name] = RecordColumn(cid[:, role], port=port[:, role])
        out[f"{name}_cid"], out[f"{name}_port"] = plain(cid[:, role]), plain(port[:, role])
    out["start_seen"] = plain(c["start_seen"])
    out["start"], out["end"] = plain(c["first_ts"] / 1e9), plain(c["last_ts"] / 1e9)
    out["duration"] = plain((c["last_ts"] - c["first_ts"]) / 1e9)
    out["first_frame"], out["last_frame"] = plain(c["first_frame"]), plain(c["last_frame"])
    out["request_frame"] = _nullable(c["request_frame"], NONE)
    out["response_frame"] = _nullable(c["response_frame"], NONE)
    out["handshake_ms"] = _nullable(c["handshake"] / 1e6, c["handshake"] == NONE)
    out["close"] = RecordColumn(c["close"], texts=tuple(k.value for k in CLOSES))
    out["close_frame"] = _nullable(c["close_frame"], NONE)
    by = c["close_by"]
    out["close_by"] = RecordColumn(np.maximum(by, 0), by < 0, ROLES)
    out["packets"] = plain(_both(c["packets"]))
    out["bytes"] = plain(_both(c["tx_bytes"]))
    for d, suffix in enumerate(("c2s", "s2c")):
        out[f"packets_{suffix}"] = plain(c["packets"][:, d])
        out[f"bytes_{suffix}"] = plain(c["tx_bytes"][:, d])
        out[f"rw_{suffix}"] = plain(c["rw_packets"][:, d])
    for d, suffix in enumerate(("c2s", "s2c")):
        out[f"messages_{suffix}"] = _nullable(c["eom_packets"][:, d], ~seq)
    for d, suffix in enumerate(("c2s", "s2c")):
        out[f"records_{suffix}"] = _nullable(c["eor_packets"][:, d], ~seq)
    out["first_rw_frame"] = _nullable(_both(c["first_rw_frame"], np.minimum), NONE)
    out["last_rw_frame"] = _nullable(_both(c["last_rw_frame"], np.maximum), 0)
    for role, name in enumerate(ROLES):
        out[f"shutdown_{name}"] = _coded(c["shut_flags"][:, role], _flag_text)
    for role, name in enumerate(ROLES):
        out[f"shutdown_{name}_frame"] = _nullable(c["shut_frame"][:, role], NONE)
    for role, name in enumerate(ROLES):
        out[f"rst_{name}"] = plain(c["rst_count"][:, role])
    for role, name in enumerate(ROLES):
        out[f"buf_alloc_{name}"] = _nullable(c["buf_alloc"][:, role], ~c["credit_known"][:, role])
    for key in ("credit_updates", "credit_requests"):
        for d, suffix in enumerate(("c2s", "s2c")):
            out[f"{key}_{suffix}"] = plain(c[key][:, d])
    for d, suffix in enumerate(("c2s", "s2c")):
        out[f"max_in_flight_{suffix}"] = _nullable(c["max_in_flight"][:, d], -1)
    out["credit_stalls"] = plain(_both(c["stalls"]))
    out["stalls_c2s"], out["stalls_s2c"] = plain(c["stalls"][:, 0]), plain(c["stalls"][:, 1])
    out["stall_time"] = plain(_both(c["stall_total"]) / 1e9)
    out["max_stall_ms"] = plain(_both(c["stall_max"], np.maximum) / 1e6)
    out["stalled_at_end"] = plain(_both(c["stalled"], np.logical_or))
    counts = _both(c["violation_count"])  # (n, kinds)
    protocol = [VIOLATIONS.index(kind) for kind in PROTOCOL_VIOLATIONS]
    out["violations"] = plain(functools.reduce(np.add, (counts[:, j] for j in protocol)))
    for j, kind in enumerate(VIOLATIONS):
        out[kind.value.replace("-", "_")] = plain(counts[:, j])
    first = functools.reduce(np.minimum, (c["violation_first"][:, side, j]
                                             for side in (0, 1) for j in protocol))
    out["first_violation_frame"] = _nullable(first, NONE)
    return out
