"""Closed connections leave the tracker's working set (the spill), and nothing else changes.

The expected values: the same tracker without a spill (what the oracle and golden tests
check), and counts reasoned from the captures these tests write.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conntrack_scenarios import write
from helpers import T0, frame

from vsockmon.analysis import pipeline
from vsockmon.cli import main
from vsockmon.conntrack import tracker as tracker_mod
from vsockmon.conntrack.records import ConnTable
from vsockmon.conntrack.spill import Packed, key_hash
from vsockmon.conntrack.tracker import ConnTracker
from vsockmon.decode.frames import decode_batches
from vsockmon.wire.pcapio import CaptureReader
from vsockmon.wire.protocol import Op, ShutdownFlag

ROOT = Path(__file__).resolve().parent.parent
CAPTURES = sorted(p for p in (ROOT / "fixtures").rglob("*.pcap*") if p.is_file())


def feed(path: Path, spill_at: int | None, chunk: int = 1 << 20
         ) -> tuple[ConnTracker, list[list[int]]]:
    """A tracker fed ``path`` ``chunk`` bytes at a time, and the tags of each batch."""
    tracker = ConnTracker(spill_at=spill_at)
    tags: list[list[int]] = []
    with CaptureReader(str(path), chunk=chunk) as reader:
        for fb in decode_batches(reader.batches()):
            t = tracker.feed(fb)
            tags.append([*t.stream.tolist(), *t.sender.tolist(), *t.in_flight.ravel().tolist(),
                         *t.limit.ravel().tolist(), *t.beyond.tolist()])
    return tracker, tags


def same_tables(got: ConnTable, want: ConnTable) -> None:
    assert len(got) == len(want)
    assert got.records() == want.records()
    assert list(got) == list(want)  # Connection objects: sides, stalls, events


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name)
@pytest.mark.parametrize("chunk", [300, 1 << 20])
def test_spilling_every_closed_stream_changes_no_result(path: Path, chunk: int) -> None:
    """Spill after every batch (small batches put connections, and their late frames,
    across spills): the tags and the table equal the unspilled tracker's."""
    plain, want_tags = feed(path, None, chunk)
    spilling, got_tags = feed(path, 1, chunk)
    assert got_tags == want_tags
    want = plain.finish()
    same_tables(spilling.finish(), want)
    pieces = list(spilling.tables(size=3))
    assert all(0 < len(t) <= 3 for t in pieces)
    assert [r for t in pieces for r in t.records()] == want.records()


def test_a_late_frame_joins_its_spilled_stream_and_a_request_starts_a_new_one(
        tmp_path: Path) -> None:
    """Frames after a close, a batch later: an RST of the closed key joins it (taken back
    from the spill); a REQUEST on the same key starts stream 2; the next RST joins 2."""
    a, s, b = (3, 50000), (2, 1234), (3, 50001)
    frames = [frame(Op.REQUEST, src=a, dst=s), frame(Op.RST, src=s, dst=a),      # 0 refused
              frame(Op.REQUEST, src=b, dst=s), frame(Op.RESPONSE, src=s, dst=b),  # 1 open
              frame(Op.RST, src=a, dst=s),                                        # 0 again
              frame(Op.REQUEST, src=a, dst=s), frame(Op.RST, src=s, dst=a),       # 2
              frame(Op.RST, src=a, dst=s)]                                        # 2
    path = write(tmp_path / "late.pcap", [(T0 + i, f) for i, f in enumerate(frames)])
    tracker, tags = feed(path, spill_at=1, chunk=120)  # about one frame per batch
    streams = [sid for t in tags for sid in t[: len(t) // 7]]
    assert streams == [0, 0, 1, 1, 0, 2, 2, 2]
    table = tracker.finish()
    assert [c.stream for c in table] == [0, 1, 2]
    assert (table[0].client.rst_count, table[0].server.rst_count) == (1, 1)
    assert (table[2].client.rst_count, table[2].server.rst_count) == (1, 1)
    assert table[0].close.value == "refused" and table[1].close.value == "open"
    assert tracker.spilled == 2 and tracker.working_set == 1  # 0 and 2 closed; 1 open



def test_the_latest_spilled_stream_of_a_key_takes_its_late_frame(tmp_path: Path) -> None:
    """A key's first stream spilled and taken back three times (each late RST, a batch
    later: more chunks than streams), then a second stream on the key, spilled too: the
    next late frame joins the second, the latest stream of the key. The spill counts
    what it holds through every take and spill."""
    b, a, s = (3, 40000), (3, 50000), (2, 1234)
    frames = [frame(Op.REQUEST, src=b, dst=s), frame(Op.RST, src=s, dst=b),      # 0 refused
              frame(Op.REQUEST, src=a, dst=s), frame(Op.RST, src=s, dst=a),      # 1 refused
              *[frame(Op.RST, src=a, dst=s)] * 3,                                # 1 again
              frame(Op.REQUEST, src=a, dst=s), frame(Op.RST, src=s, dst=a),      # 2 refused
              frame(Op.RST, src=a, dst=s)]                                       # 2 again
    path = write(tmp_path / "again.pcap", [(T0 + i, f) for i, f in enumerate(frames)])
    tracker, tags = feed(path, spill_at=1, chunk=1)  # a batch per frame (92-byte records)
    assert len(tags) == len(frames)
    assert [t[0] for t in tags] == [0, 0, 1, 1, 1, 1, 1, 2, 2, 2]
    assert tracker.spilled == 3 and tracker.working_set == 0 and len(tracker) == 3
    table = tracker.finish()
    assert [(c.client.rst_count, c.server.rst_count) for c in table] == [(0, 1), (3, 1),
                                                                          (1, 1)]


def test_a_late_frame_finds_its_spilled_stream_with_a_cid_above_2_31(tmp_path: Path) -> None:
    """A CID of 3e9 fits the 32 bits of a packed key but makes it exceed 2**63: the key
    must stay an exact unsigned number for the late RST to find its spilled stream."""
    a, s = (3_000_000_000, 50000), (2, 1234)
    frames = [frame(Op.REQUEST, src=a, dst=s), frame(Op.RST, src=s, dst=a),
              frame(Op.RST, src=a, dst=s)]
    path = write(tmp_path / "bigcid.pcap", [(T0 + i, f) for i, f in enumerate(frames)])
    tracker, tags = feed(path, spill_at=1, chunk=1)  # a batch per frame
    assert [t[0] for t in tags] == [0, 0, 0]
    assert len(tracker) == 1 and tracker.finish()[0].client.cid == 3_000_000_000

def storm(path: Path, n: int, open_first: bool) -> Path:
    """``n`` refused connects, each on its own client port; ``open_first``: before them,
    one connection that is answered and never closed, and one that shuts down both ways."""
    s = (2, 1234)
    frames: list[bytes] = []
    if open_first:
        c, d = (3, 1025), (3, 1026)
        frames += [frame(Op.REQUEST, src=c, dst=s), frame(Op.RESPONSE, src=s, dst=c),
                   frame(Op.REQUEST, src=d, dst=s), frame(Op.RESPONSE, src=s, dst=d),
                   frame(Op.SHUTDOWN, src=d, dst=s, flags=ShutdownFlag.SEND),
                   frame(Op.SHUTDOWN, src=s, dst=d, flags=ShutdownFlag.SEND)]
    for i in range(n):
        client = (3, 40000 + i)
        frames += [frame(Op.REQUEST, src=client, dst=s), frame(Op.RST, src=s, dst=client)]
    return write(path, [(T0 + 1000 * i, f) for i, f in enumerate(frames)])


@pytest.mark.parametrize("open_first", [False, True])
def test_the_working_set_follows_open_connections_not_all_connections(
        tmp_path: Path, open_first: bool) -> None:
    """Feeding 4x more closed connections leaves the same Python-level working set (table
    rows and dictionary keys): at most the spill threshold plus one batch's streams, and
    the open connection always in it."""
    spill_at, chunk = 100, 8192  # a frame is 100 bytes: about 40 connections per batch
    held = []
    for n in (1000, 4000):
        tracker, _ = feed(storm(tmp_path / f"s{n}.pcap", n, open_first), spill_at, chunk)
        assert tracker.spilled + tracker.working_set == n + 2 * open_first == len(tracker)
        assert tracker.working_set < spill_at + chunk // 100
        assert tracker.keys <= tracker.working_set
        held.append((tracker.working_set, tracker.keys))
        table = tracker.finish()
        assert len(table) == n + 2 * open_first
        closes = [c.close.value for c in table]
        assert closes.count("refused") == n
        if open_first:
            assert closes[:2] == ["open", "closing"]
            assert 0 in tracker._t.stream[: tracker.working_set]  # the open one stays
    # flat: the working set of 4000 is no bigger than that of 1000 (same threshold)
    assert max(held[1]) <= max(spill_at + chunk // 100, max(held[0]))
    plain, _ = feed(tmp_path / "s4000.pcap", None, chunk)
    assert plain.working_set == 4000 + 2 * open_first  # without a spill: every one


NONE = 2**63 - 1


@pytest.mark.parametrize(("values", "width"), [
    ([0, 0, 0], 0),
    ([5, 300, 7], 2),
    ([-1, 2**63 - 1, 0], 1),                   # -1 next to 0, NONE the reserved offset
    ([-(2**63), 2**63 - 1], 1),                # modular: next to each other
    ([1 << 40, 3], 1),                         # one step, from the first value
    ([NONE, 70000, NONE, 70001, 70300], 2),    # NONE a reserved offset among small values
    ([NONE, 5, 2**40], 8),
    ([1 << 40, (1 << 40) + 3, (1 << 40) + 5, (1 << 40) + 300], 2),  # steps of at most 295
    ([NONE, NONE, 3], 1),
    ([0, 255, 0], 1),                          # a span of 255 fits one byte; steps do not
    ([0, 256, 0], 2),
    ([2**63 - 100, -(2**63) + 99, 2**63 - 100], 1),  # read unsigned: a span of 199
    ([-(2**62) - 1, 5, 3], 8),                 # a signed base no float holds exactly
    ([NONE, 1000, 1254], 1),                   # offsets 0..254, NONE the 255th: one byte
    ([NONE, 1000, 1255], 2),                   # offset 255 would be NONE's: two bytes
    ([NONE, NONE - 1000, NONE - 746], 1),      # two bytes as they are; NONE reserved: one
])
def test_packed_columns_give_back_their_values(values: list[int], width: int) -> None:
    col = np.array(values, dtype=np.int64)
    p = Packed(col)
    assert p.rows(0, len(values)).tolist() == values
    for a in range(len(values)):
        assert p.rows(a, len(values)).tolist() == values[a:]
        assert p.rows(a, a + 1).tolist() == values[a : a + 1]
    assert p.nbytes == width * len(values)
    flags = np.array([[True, False], [True, True]])
    assert Packed(flags).rows(0, 2).tolist() == flags.tolist()
    wide = np.array([[1, NONE], [NONE, 2], [3, 4]], dtype=np.int64)
    assert Packed(wide).rows(1, 3).tolist() == wide[1:].tolist()


@pytest.mark.parametrize(("args", "streams"), [
    ([], list(range(42))),
    (["--close", "refused"], list(range(2, 42))),
    (["-n", "5"], [0, 1, 2, 3, 4]),
    (["--close", "refused", "-n", "4"], [2, 3, 4, 5]),
    (["--port", "40003", "--port", "1025"], [0, 5]),
    (["--sort=-stream", "-n", "2"], [41, 40]),
    (["--close", "graceful"], []),
])
def test_conns_and_stats_print_the_same_from_a_spill_read_in_pieces(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], streams: list[int]
        ) -> None:
    """The writers read a spilled capture a few streams at a time: same bytes as from one
    table, filters and --limit across the pieces."""
    path = str(storm(tmp_path / "s.pcap", 40, open_first=True))

    def out(*extra: str) -> str:
        result = CliRunner().invoke(main, [*extra, path])
        assert result.exit_code == 0, result.output
        return result.stdout

    commands = (["conns", "--json", *args], ["conns", "--csv", *args], ["conns", *args],
                ["stats", "--json"], ["stats"])
    want = [out(*c) for c in commands]
    monkeypatch.setattr(pipeline, "SPILL_AT", 1)
    monkeypatch.setattr(tracker_mod, "CHUNK", 3)
    assert [out(*c) for c in commands] == want
    assert [json.loads(line)["stream"] for line in want[0].splitlines()] == streams


def test_the_key_hash_tells_apart_the_keys_of_a_connect_storm() -> None:
    """A spilled row is found by its key's hash, then confirmed on the key: hashes that
    collide cost a row decode each. The keys of a storm (20000 client ports on two CIDs,
    both socket types, to a server below and one above the clients' CIDs, so that the
    lower end and the higher end vary in turn) differ in one part at a time; none may
    collide."""
    ports = np.arange(1024, 21024, dtype=np.uint64)
    lo, hi, typ = [], [], []
    for server_cid in (2, 5):
        server = np.uint64((server_cid << 32) | 1234)
        for cid in (3, 4):
            client = (np.uint64(cid) << np.uint64(32)) | ports
            for t in (1, 2):
                typ.append(np.full(len(ports), t, dtype=np.uint64))
                lo.append(np.minimum(client, server))
                hi.append(np.maximum(client, server))
    h = key_hash(np.concatenate(typ), np.concatenate(lo), np.concatenate(hi))
    assert len(np.unique(h)) == len(h) == 160000


@pytest.mark.parametrize(("rows", "deflated"), [(4095, False), (4096, True)])
def test_packed_offsets_of_4096_bytes_are_deflated(rows: int, deflated: bool) -> None:
    """Alternating 0 and 200: one-byte offsets (the steps would need two), as compressible
    as data gets; from 4096 bytes of offsets on, they are deflated."""
    values = [0, 200] * (rows // 2) + [0] * (rows % 2)
    p = Packed(np.array(values, dtype=np.int64))
    assert p.rows(0, rows).tolist() == values
    assert p.rows(rows - 3, rows - 1).tolist() == values[-3:-1]
    assert (p.nbytes < rows // 10) if deflated else (p.nbytes == rows)


def test_packed_offsets_deflated_when_that_halves_them() -> None:
    """Offsets of 3 random bits a byte deflate to about 3/8 of their size: kept deflated,
    and read back exactly."""
    rng = np.random.default_rng(7)
    values = (rng.integers(0, 8, 8192) * 30).tolist()
    p = Packed(np.array(values, dtype=np.int64))
    assert 8192 // 3 < p.nbytes <= 8192 // 2
    assert p.rows(0, 8192).tolist() == values


def test_tables_in_pieces_skip_a_chunk_that_spans_a_piece_without_rows_in_it(
        tmp_path: Path) -> None:
    """Streams 0 and 5 close in one batch and are spilled together while 1-4 stay open: the
    chunk's stream range (0-5) covers the piece of streams 2-3, but none of its rows."""
    s = (2, 1234)
    clients = [(3, 40000 + i) for i in range(6)]
    frames = [frame(Op.REQUEST, src=c, dst=s) for c in clients]
    frames += [frame(Op.RST, src=s, dst=clients[0]), frame(Op.RST, src=s, dst=clients[5])]
    path = write(tmp_path / "gap.pcap", [(T0 + i, f) for i, f in enumerate(frames)])
    tracker, _ = feed(path, spill_at=2)
    assert tracker.spilled == 2 and tracker.working_set == 4
    pieces = [[c.stream for c in t] for t in tracker.tables(size=2)]
    assert pieces == [[0, 1], [2, 3], [4, 5]]
    assert [c.close.value for t in tracker.tables(size=2) for c in t] == [
        "refused", "unanswered", "unanswered", "unanswered", "unanswered", "refused"]


def test_a_connection_shut_both_ways_is_spilled_without_an_rst(tmp_path: Path) -> None:
    """Both directions shut (one SHUTDOWN with RCV and SEND) close a connection for the
    spill as an RST does: it leaves the working set."""
    a, s = (3, 50000), (2, 1234)
    frames = [frame(Op.REQUEST, src=a, dst=s), frame(Op.RESPONSE, src=s, dst=a),
              frame(Op.SHUTDOWN, src=a, dst=s, flags=ShutdownFlag.RCV | ShutdownFlag.SEND)]
    tracker, _ = feed(write(tmp_path / "shut.pcap", [(T0 + i, f) for i, f in enumerate(frames)]),
                      spill_at=1)
    assert (tracker.spilled, tracker.working_set) == (1, 0)
    assert tracker.finish()[0].close.value == "closing"


def test_a_closed_stream_with_a_cid_of_2_32_stays_in_the_working_set(tmp_path: Path) -> None:
    """CID 2**32 does not fit the 32 bits of a packed key: its closed stream is not spilled,
    and a late frame still joins it."""
    a, s = (1 << 32, 50000), (2, 1234)
    frames = [frame(Op.REQUEST, src=a, dst=s), frame(Op.RST, src=s, dst=a),
              frame(Op.RST, src=a, dst=s)]
    path = write(tmp_path / "cid32.pcap", [(T0 + i, f) for i, f in enumerate(frames)])
    tracker, tags = feed(path, spill_at=1, chunk=1)  # a batch per frame
    assert [t[0] for t in tags] == [0, 0, 0]
    assert (tracker.spilled, tracker.working_set) == (0, 1)
    c = tracker.finish()[0]
    assert (c.client.cid, c.client.rst_count, c.server.rst_count) == (1 << 32, 1, 1)
