"""The compiled tracker's key map and per-row pass (conntrack/_track.c) against plain Python:
its constants against the wire enums, its columns against the StreamTable, the key map
against a dict fed the same rows (growth, removal, shrinking), and bad input refused with
an exception, never a crash."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from helpers import frame, write_pcap

from vsockmon.conntrack import _track
from vsockmon.conntrack.model import VIOLATIONS, Violation
from vsockmon.conntrack.spill import key_hash
from vsockmon.conntrack.table import StreamTable
from vsockmon.conntrack.tracker import _EVENTS, _LAYOUT, ConnTracker
from vsockmon.decode.frames import VIRTIO_DTYPE, Anomaly, decode_batches
from vsockmon.wire.pcapio import CaptureReader
from vsockmon.wire.protocol import Op, SeqFlag, ShutdownFlag, SockType

U32 = 0xFFFFFFFF
Row = tuple[int, int, int, int, int, int]
"""(type, src_cid, src_port, dst_cid, dst_port, op) of one header."""


def _headers(rows: list[Row]) -> np.ndarray:
    v = np.zeros(len(rows), dtype=VIRTIO_DTYPE)
    for name, col in zip(("type", "src_cid", "src_port", "dst_cid", "dst_port", "op"),
                         zip(*rows, strict=True), strict=True):
        v[name] = col
    return v


def _assign(km: _track.KeyMap, rows: list[Row], first: int) -> tuple[list[int], list[int]]:
    v = _headers(rows)
    idx = np.arange(len(rows), dtype=np.int64)
    sid = np.empty(len(rows), dtype=np.int64)
    starts = np.empty(len(rows), dtype=np.uint8)
    stop, nxt = km.assign(v, _LAYOUT, idx, 0, first, sid, starts, ())
    assert stop == len(rows) and nxt == first + int(np.count_nonzero(starts))
    return sid.tolist(), np.flatnonzero(starts).tolist()


def _key(r: Row) -> tuple[int, ...]:
    """The connection key as the tracker's docstring defines it: type and the unordered
    pair of (cid, port) ends."""
    a, b = (r[1], r[2]), (r[3], r[4])
    return (r[0], *min(a, b), *max(a, b))


def test_the_compiled_constants_are_the_wire_enums() -> None:
    c = _track.CONSTANTS
    for op in (Op.REQUEST, Op.RESPONSE, Op.RST, Op.SHUTDOWN, Op.RW, Op.CREDIT_UPDATE,
               Op.CREDIT_REQUEST):
        assert c[op.name] == op.value
    assert c["SEQPACKET"] == SockType.SEQPACKET
    assert (c["RCV"], c["SEND"]) == (ShutdownFlag.RCV, ShutdownFlag.SEND)
    assert (c["EOM"], c["EOR"]) == (SeqFlag.EOM, SeqFlag.EOR)
    assert c["PAYLOAD_LEN"] == Anomaly.PAYLOAD_LEN
    order = (Violation.BEYOND_CREDIT, Violation.AFTER_SHUTDOWN, Violation.BEFORE_RESPONSE,
             Violation.TAP_LENGTH)
    assert c["VIOLATIONS"] == tuple(VIOLATIONS.index(v) for v in order)


def test_the_compiled_columns_are_the_stream_tables() -> None:
    t = StreamTable()
    t.grow(3)
    for name, itemsize, width in _track.COLUMNS:
        col = getattr(t, name)
        assert col.itemsize == itemsize and col.size // len(col) == width, name
        assert col.flags.c_contiguous
    # what the pass leaves alone is what _new_streams writes (and the bookkeeping)
    left = set(t.columns()) - {name for name, _, _ in _track.COLUMNS}
    assert left == {"stream", "type", "cid", "port", "first_frame", "first_ts"}


def test_the_header_fields_read_are_the_header_tables() -> None:
    assert VIRTIO_DTYPE.fields is not None
    for (name, size), off in zip(_track.HEADER_FIELDS, _LAYOUT[1:], strict=True):
        assert VIRTIO_DTYPE.fields[name][0].itemsize == size
        assert VIRTIO_DTYPE.fields[name][1] == off
    assert _LAYOUT[0] == VIRTIO_DTYPE.itemsize


def test_a_cid_of_u32_max_and_of_2_pow_32_are_different_connections_from_both_sides(
) -> None:
    km = _track.KeyMap()
    rows = [(1, 2, 1024, U32, 7, Op.REQUEST),       # CID 0xFFFFFFFF: fits 32 bits
            (1, 2, 1024, U32 + 1, 7, Op.REQUEST),   # CID 2**32: does not
            (1, U32, 7, 2, 1024, Op.RESPONSE),      # the first, from its other end
            (1, U32 + 1, 7, 2, 1024, Op.RESPONSE),  # the second, from its other end
            (2, 2, 1024, U32, 7, Op.RW)]            # another type: its own key
    sid, new = _assign(km, rows, 10)
    assert sid == [10, 11, 10, 11, 12] and new == [0, 1, 4] and len(km) == 3


@pytest.mark.parametrize("seed", range(4))
def test_the_key_map_equals_a_dict_through_growth_removal_and_shrinking(seed: int) -> None:
    rng = random.Random(seed)
    km = _track.KeyMap()
    model: dict[tuple[int, ...], int] = {}
    nxt = 0
    ends = [(rng.choice([2, 3, U32, U32 + 1, 1 << 63]), rng.randrange(4000)) for _ in range(900)]
    for _ in range(12):
        rows: list[Row] = []
        for _ in range(rng.randint(1, 3000)):
            a, b = rng.sample(ends, 2)
            op = rng.choice([Op.REQUEST, Op.RW, Op.RW, Op.RST])
            rows.append((rng.choice([1, 2]), *a, *b, op))
        sid, _ = _assign(km, rows, nxt)
        want = []
        for r in rows:
            k = _key(r)
            if r[5] == Op.REQUEST or k not in model:
                model[k] = nxt
                nxt += 1
            want.append(model[k])
        assert sid == want and len(km) == len(model)
        # forget about half the streams; the others must still be found
        gone = sorted({s for s in model.values() if rng.random() < 0.5})
        km.drop(np.array(gone, dtype=np.int64))
        model = {k: s for k, s in model.items() if s not in set(gone)}
        assert len(km) == len(model)
    # remove one key at a time, only where it still holds the stream named
    keys = list(model.items())
    rng.shuffle(keys)
    for (typ, lc, lp, hc, hp), s in keys[: len(keys) // 2]:
        stale = rng.random() < 0.3
        km.discard(np.array([typ], dtype=np.uint16), np.array([[hc, lc]], dtype=np.uint64),
                   np.array([[hp, lp]], dtype=np.uint32),
                   np.array([s + 1 if stale else s], dtype=np.int64))
        if not stale:
            del model[(typ, lc, lp, hc, hp)]
    assert len(km) == len(model)
    rows = [(k[0], k[1], k[2], k[3], k[4], Op.RW) for k in model]
    sid, new = _assign(km, rows, nxt)
    assert sid == list(model.values()) and new == []


def _spilled(rows: list[Row]) -> np.ndarray:
    """The spill's index (its ascending key hashes) of chunk rows with these keys."""
    k = np.array([_key(r) for r in rows], dtype=np.uint64)
    return np.sort(key_hash(k[:, 0], k[:, 1] << np.uint64(32) | k[:, 2],
                            k[:, 3] << np.uint64(32) | k[:, 4]))


def test_assign_stops_at_the_first_row_of_a_key_the_spill_may_hold_and_resumes() -> None:
    km = _track.KeyMap()
    _assign(km, [(1, 2, 5, 3, 6, Op.REQUEST)], 0)          # key A held by stream 0
    rows = [(1, 2, 5, 3, 6, Op.RW),                       # A: held, no stop
            (1, 3, 6, 2, 7, Op.RW),                       # B: absent, spilled -> stop
            (1, 2, 7, 3, 6, Op.RW),                       # B again: joins what put gave
            (1, 2, 8, 3, 6, Op.REQUEST),                  # C: spilled, but a REQUEST
            (1, 2, 9, 3, 6, Op.RST),                      # D: absent, spilled -> stop
            (1, 2, 10, 3, 6, Op.RST),                     # E: absent, not spilled
            (1, 2, 9, U32 + 1, 6, Op.RST)]                # F: CID beyond 32 bits: never
    v = _headers(rows)
    idx = np.arange(len(rows), dtype=np.int64)
    sid = np.full(len(rows), -9, dtype=np.int64)
    starts = np.zeros(len(rows), dtype=np.uint8)
    # one chunk holds B and C, another D and what F's key would hash to with its CID cut
    # to 32 bits (2**32 << 32 wraps to 0): both chunks searched, F never
    cut = key_hash(*(np.array([x], dtype=np.uint64) for x in (1, 2 << 32 | 9, 6)))
    spilled = (_spilled([rows[1], rows[3]]), np.sort(np.r_[_spilled([rows[4]]), cut]))
    assert km.assign(v, _LAYOUT, idx, 0, 100, sid, starts, spilled) == (1, 100)
    assert sid[:1].tolist() == [0] and len(km) == 1          # B not entered
    km.put(v, _LAYOUT, idx[1:2], np.array([40], dtype=np.int64))  # B's stream taken back
    assert km.assign(v, _LAYOUT, idx, 1, 100, sid, starts, spilled) == (4, 101)
    km.put(v, _LAYOUT, idx[4:5], np.array([-1], dtype=np.int64))  # D: the spill had none
    assert km.assign(v, _LAYOUT, idx, 4, 101, sid, starts, spilled) == (7, 104)
    assert sid.tolist() == [0, 40, 40, 100, 101, 102, 103]
    assert np.flatnonzero(starts).tolist() == [3, 4, 5, 6]


def test_a_started_stream_says_which_end_of_its_key_its_first_source_is() -> None:
    """The key's lower end is the lower (cid, port) pair, a looped frame's source counting
    as lower; a row that joins a stream says 0."""
    lower, higher = _track.CONSTANTS["START_LOWER"], _track.CONSTANTS["START_HIGHER"]
    assert {lower, higher, 0} == {0, 1, 2}
    rows = [(1, 2, 5, 3, 6, Op.REQUEST),   # (2, 5) < (3, 6)
            (1, 3, 6, 2, 5, Op.RESPONSE),  # joins it
            (1, 3, 6, 2, 9, Op.REQUEST),   # CID first: (3, 6) > (2, 9)
            (1, 2, 7, 2, 5, Op.REQUEST),   # same CID: port 7 > 5
            (1, 2, 5, 2, 5, Op.REQUEST),   # looped: both ends equal
            (1, U32 + 1, 1, 2, 9, Op.RW)]  # a CID beyond 32 bits, higher
    v = _headers(rows)
    sid, starts = np.empty(len(rows), dtype=np.int64), np.empty(len(rows), dtype=np.uint8)
    _track.KeyMap().assign(v, _LAYOUT, np.arange(len(rows)), 0, 0, sid, starts, ())
    assert starts.tolist() == [lower, 0, higher, higher, lower, higher]


def test_bad_input_is_refused_not_a_crash() -> None:
    km = _track.KeyMap()
    v = _headers([(1, 2, 5, 3, 6, Op.RW)])
    out, starts = np.empty(1, dtype=np.int64), np.empty(1, dtype=np.uint8)
    one = np.zeros(1, np.int64)
    with pytest.raises(IndexError):
        km.assign(v, _LAYOUT, np.array([1], dtype=np.int64), 0, 0, out, starts, ())
    with pytest.raises(IndexError):  # a start beyond the rows
        km.assign(v, _LAYOUT, one, 2, 0, out, starts, ())
    with pytest.raises(ValueError):
        km.assign(v, _LAYOUT, one, 0, 0, np.empty(2, np.int64), starts, ())
    with pytest.raises(ValueError):  # starts_out the wrong size
        km.assign(v, _LAYOUT, one, 0, 0, out, np.empty(2, np.uint8), ())
    with pytest.raises(ValueError):  # a spill index that is not u64
        km.assign(v, _LAYOUT, one, 0, 0, out, starts, (np.zeros(3, np.uint8),))
    with pytest.raises(ValueError):
        km.assign(v, (_LAYOUT[0], *_LAYOUT[1:-1], 1000), one, 0, 0, out, starts, ())
    assert len(km) == 0
    t = StreamTable()
    t.grow(1)
    t.client_is_lower[0] = True  # the client is (2, 5), the row's source
    cols = tuple(getattr(t, name) for name, _, _ in _track.COLUMNS)
    tags = (np.zeros(1, np.int8), np.zeros(2, np.int64), np.zeros(2, np.int64),
            np.zeros(1, bool))
    events = _events(1)
    args = (v, _LAYOUT, one, 0, np.zeros(1, np.int64), np.zeros(1, np.uint16))
    with pytest.raises(IndexError):  # a slot outside the table
        _track.track(*args, np.array([len(t.type)], np.int64), one, len(t.type), cols, *tags,
                     events)
    with pytest.raises(ValueError):  # a column too short for the capacity claimed
        _track.track(*args, one, one, len(t.type) + 1, cols, *tags, events)
    with pytest.raises(ValueError):  # an event column of the wrong type
        _track.track(*args, one, one, len(t.type), cols, *tags,
                     (*events[:3], np.zeros(1, np.uint32), *events[4:]))
    with pytest.raises(ValueError):  # an event column missing
        _track.track(*args, one, one, len(t.type), cols, *tags, events[:-1])
    assert _track.track(*args, one, one, len(t.type), cols, *tags, events) == 0
    assert t.packets[0].tolist() == [1, 0]


def _events(n: int) -> tuple[np.ndarray, ...]:
    return tuple(np.full(n, 99, dtype=dtype) for _, dtype in _EVENTS)


def test_the_compiled_event_columns_are_the_trackers() -> None:
    assert [(name, itemsize) for name, itemsize, _ in _track.EVENT_COLUMNS] == [
        (name, np.dtype(dtype).itemsize) for name, dtype in _EVENTS]


def test_the_pass_writes_the_control_events_by_stream_then_frame() -> None:
    # header rows 0..7, row 4 without a header; streams 10, 11, 12 at table rows 0, 1, 2
    ops = [Op.REQUEST, Op.RW, Op.SHUTDOWN, Op.CREDIT_UPDATE, Op.RW, Op.RST, Op.RESPONSE,
           Op.CREDIT_REQUEST]
    v = _headers([(1, 2, 5, 3, 6, op) for op in ops])
    v["flags"][2] = 3
    v["len"], v["buf_alloc"], v["fwd_cnt"] = np.arange(8), 100 + np.arange(8), 200 + np.arange(8)
    rows = np.array([0, 1, 2, 3, 5, 6, 7], dtype=np.int64)
    slots = np.array([2, 0, 0, 1, 2, 0, 1], dtype=np.int64)
    t = StreamTable()
    t.grow(3)
    t.client_is_lower[:3] = [True, False, True]  # stream 11's client is (3, 6): sender 1
    cols = tuple(getattr(t, name) for name, _, _ in _track.COLUMNS)
    tags = (np.zeros(8, np.int8), np.zeros(16, np.int64), np.zeros(16, np.int64),
            np.zeros(8, bool))
    events = _events(len(rows))
    k = _track.track(v, _LAYOUT, rows, 100, 1000 + 10 * np.arange(8, dtype=np.int64),
                     np.zeros(8, np.uint16), slots, slots + 10, len(t.type), cols, *tags,
                     events)
    # the events are rows 0 (REQUEST), 2 (SHUTDOWN), 5 (RST), 6 (RESPONSE) and 7
    # (CREDIT_REQUEST): stream 10 has rows 2 and 6, stream 11 row 7, stream 12 rows 0 and 5
    assert k == 5
    got = {name: c[:k].tolist() for (name, _), c in zip(_EVENTS, events, strict=True)}
    assert got == {"sid": [10, 10, 11, 12, 12], "frame": [102, 106, 107, 100, 105],
                   "ts": [1020, 1060, 1070, 1000, 1050],
                   "op": [Op.SHUTDOWN, Op.RESPONSE, Op.CREDIT_REQUEST, Op.REQUEST, Op.RST],
                   "sender": [0, 0, 1, 0, 0], "flags": [3, 0, 0, 0, 0], "len": [2, 6, 7, 0, 5],
                   "buf": [102, 106, 107, 100, 105], "fwd": [202, 206, 207, 200, 205]}
    assert all((c[k:] == 99).all() for c in events)  # the rest left as it was


def test_a_looped_frame_is_the_clients_and_a_reply_the_servers(tmp_path: Path) -> None:
    # source and destination the same end: one key, and such a frame counts as the client's
    # (sender 0) whichever way the stream's ends are ordered; the RESPONSE of a normal
    # connection is the server's (sender 1)
    path = write_pcap(tmp_path / "c.pcap", [
        frame(Op.REQUEST, src=(3, 5), dst=(3, 5)), frame(Op.RW, b"x", src=(3, 5), dst=(3, 5)),
        frame(Op.REQUEST, src=(3, 9000), dst=(2, 80)),
        frame(Op.RESPONSE, src=(2, 80), dst=(3, 9000))])
    tracker = ConnTracker()
    with CaptureReader(str(path)) as reader:
        tags = [tracker.feed(fb) for fb in decode_batches(reader.batches())]
    assert np.concatenate([t.stream for t in tags]).tolist() == [0, 0, 1, 1]
    assert np.concatenate([t.sender for t in tags]).tolist() == [0, 0, 0, 1]
    assert tracker.keys == 2
