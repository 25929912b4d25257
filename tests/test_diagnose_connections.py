"""The rules' view of the connections: an index to select on, objects only for the few picked.

A connect() storm must diagnose without a Connection object per connection (the cost model:
memory follows the findings, not the connections ever seen). Expected values are reasoned
from the synthetic scenarios: n refusals to one port give one no-listener finding over
every stream and one dial-retry run over every attempt.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conntrack_scenarios import MS, Conv, write

import vsockmon
from vsockmon.cli import main
from vsockmon.conntrack.records import ConnTable
from vsockmon.diagnose import connections
from vsockmon.diagnose.connections import CHUNK, FIELDS, Index
from vsockmon.diagnose.engine import Diagnosis, tracked
from vsockmon.wire.protocol import Op, ShutdownFlag

STORM = 2 * CHUNK + 10
"""Refusals in the storm: three ranges of streams, and more than the tracker holds before
it spills closed connections to compact columns (32,768)."""


def storm(n: int) -> list[tuple[int, bytes]]:
    """``n`` REQUESTs from new client ports to 2:1024, each refused by an RST 1 µs later,
    the next 1 ms after that."""
    out: list[tuple[int, bytes]] = []
    for i in range(n):
        c = Conv(out, client=(3, 50000 + i), server=(2, 1024))
        c.send(0, Op.REQUEST, delay=MS)
        c.send(1, Op.RST, buf=0)
    return out


@pytest.fixture(scope="module")
def storm_pcap(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(tmp_path_factory.mktemp("storm") / "storm.pcap", storm(STORM))


def test_a_storm_is_diagnosed_from_three_connection_objects(
        storm_pcap: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[int] = []
    plain = ConnTable.__getitem__

    def counted(self: ConnTable, i: int) -> object:
        made.append(i)
        return plain(self, i)

    monkeypatch.setattr(ConnTable, "__getitem__", counted)
    found = {f.rule: f for f in vsockmon.open(storm_pcap).findings()}
    assert sorted(found) == ["dial-retry", "no-listener"]
    listener, retry = found["no-listener"], found["dial-retry"]
    assert listener.streams == tuple(range(STORM))
    assert listener.frames == tuple(range(1, 2 * STORM + 1))  # each REQUEST and its RST
    assert listener.evidence["refusals"] == STORM
    assert retry.frames == tuple(range(1, 2 * STORM, 2))  # the REQUESTs
    assert (retry.evidence["attempts"], retry.evidence["failures"]) == (STORM, STORM)
    # a REQUEST comes 1 ms after the RST before it, which came 1 µs after its REQUEST
    assert retry.evidence["span_s"] == round((STORM - 1) * (MS + 1000) / 1e9, 3)
    # no-listener's first connection, dial-retry's first and last: not one per refusal
    assert len(made) <= 3


def test_the_storm_diagnosed_a_range_at_a_time_equals_it_from_every_object(
        storm_pcap: Path) -> None:
    cap = vsockmon.open(storm_pcap)
    by_ranges = [f.to_dict(cap.start_ns) for f in cap.findings()]
    d = Diagnosis()
    for fb, _ in vsockmon.open(storm_pcap).frames():
        d.feed(fb)
    whole = d.findings(conns=d.connections())  # every Connection object, in a list
    assert by_ranges == [f.to_dict(cap.start_ns) for f in whole]
    assert d.digest.resets == {}  # a refusal leaves no credit: small-packet-reset reads none


def test_a_trackers_index_is_packed_and_reads_as_its_table(
        storm_pcap: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The index of a tracker's connections holds a storm in a few bytes a connection (its
    columns are constant or step evenly), reads every column exactly as the wide table has
    it, and holds joined columns up to its budget (here two int64 columns' worth)."""
    monkeypatch.setattr(connections, "JOINED_BYTES", 2 * 8 * STORM)
    tracker = vsockmon.open(storm_pcap).analysis().tracker
    wide = Index.of_table(tracker.finish())
    tracemalloc.start()
    try:
        index = tracked(tracker).index
        held = tracemalloc.get_traced_memory()[0]
        for name in FIELDS:
            got, want = index.column(name), wide.column(name)
            assert got.dtype == want.dtype and np.array_equal(got, want), name
            assert not got.flags.writeable  # a rule cannot change what others read
        joined = tracemalloc.get_traced_memory()[0] - held
    finally:
        tracemalloc.stop()
    assert len(index) == STORM
    assert held < 4 * STORM  # the wide columns take 100 bytes a connection
    assert joined <= 2 * 8 * STORM + 65536
    # the last read stay joined (the same array), the budget lets the older go
    last = index.column("handshake")
    assert index.column("handshake") is last
    for name in ("first_frame", "last_frame", "first_ts"):
        index.column(name)
    assert index.column("handshake") is not last


def test_a_small_captures_columns_all_stay_joined(storm_pcap: Path) -> None:
    """Under the budget every column is joined once however often the rules read it."""
    index = tracked(vsockmon.open(storm_pcap).analysis().tracker).index
    first = {name: index.column(name) for name in FIELDS}
    assert all(index.column(name) is first[name] for name in FIELDS)


def test_a_packed_index_reads_rows_and_finds_streams_across_its_parts(storm_pcap: Path
                                                                     ) -> None:
    """Rows read from the parts that hold them (any order, repeated, one row alone) and a
    stream's row found in its part equal what the wide table gives."""
    tracker = vsockmon.open(storm_pcap).analysis().tracker
    wide = Index.of_table(tracker.finish())
    index = tracked(tracker).index
    shuffled = np.array([STORM - 1, 0, CHUNK, CHUNK - 1, 5, CHUNK, 2 * CHUNK + 3])
    ascending = np.array([1, CHUNK - 1, CHUNK, CHUNK, 2 * CHUNK + 5])
    many = np.arange(STORM)[::-1]  # most rows, out of order: read joined
    for name in ("stream", "close_frame", "client_port", "start_seen"):
        for rows in (shuffled, ascending, many):
            got = index.take(name, rows)
            assert got.dtype == wide.column(name).dtype
            assert got.tolist() == wide.column(name)[rows].tolist(), name
        assert int(index.take(name, CHUNK + 1)) == int(wide.column(name)[CHUNK + 1])
    assert index.take("stream", np.zeros(0, dtype=np.int64)).tolist() == []
    with pytest.raises(IndexError):
        index.take("stream", np.array([STORM]))
    streams = wide.column("stream").tolist()
    for stream in (0, CHUNK - 1, CHUNK, 2 * CHUNK, STORM - 1):
        assert index.row_of(stream) == streams.index(stream)
    with pytest.raises(KeyError):
        index.row_of(STORM)


def index(pairs: list[tuple[int, tuple[int, int], tuple[int, int]]]) -> Index:
    """An index of connections (type, client end, server end), one per stream."""
    n = len(pairs)
    zeros = np.zeros(n, dtype=np.int64)
    return Index(
        stream=np.arange(n), type=np.array([t for t, _, _ in pairs]),
        client_cid=np.array([c[0] for _, c, _ in pairs], dtype=np.uint64),
        client_port=np.array([c[1] for _, c, _ in pairs]),
        server_cid=np.array([s[0] for _, _, s in pairs], dtype=np.uint64),
        server_port=np.array([s[1] for _, _, s in pairs]),
        close=zeros, start_seen=np.ones(n, dtype=bool), request_frame=zeros,
        response_frame=zeros, close_frame=zeros, first_frame=zeros, last_frame=zeros,
        first_ts=zeros, last_ts=zeros, handshake=zeros)


@pytest.mark.parametrize("part", [None, 2, 5])
@pytest.mark.parametrize("rows", [9, 12])
def test_the_previous_connection_on_an_address_pair_is_found_whichever_end_dialled(
        part: int | None, rows: int) -> None:
    """On the index as given, and packed in parts of ``part`` rows (the pairs are packed
    into words a part at a time, with the widths of the whole index); the first 9 rows
    share words (33-bit CIDs), the 64-bit CIDs of the last 3 take a word each."""
    big = (1 << 32) + 3  # a CID beyond 32 bits: no packing of CID and port
    top = (1 << 64) - 1  # a CID of 64 bits: a word of its own
    pairs = [
        (1, (3, 50000), (2, 1024)),  # 0
        (1, (2, 1024), (3, 50000)),  # 1: the same pair, dialled from the other end
        (2, (3, 50000), (2, 1024)),  # 2: SEQPACKET: another pair
        (1, (3, 50001), (2, 1024)),  # 3: another client port
        (1, (big, 7), (2, 1024)),    # 4
        (1, (3, 50000), (2, 1024)),  # 5: the pair of 0 and 1 again
        (1, (2, 1024), (big, 7)),    # 6: the pair of 4
        (1, (2, 1024), (2, 1024)),   # 7: both ends equal
        (1, (2, 1024), (2, 1024)),   # 8
        (1, (top, 7), (2, 1024)),    # 9
        (1, (top, 8), (2, 1024)),    # 10: another client port
        (1, (2, 1024), (top, 7)),    # 11: the pair of 9
    ]
    del pairs[rows:]
    ix = index(pairs)
    if part is not None:
        ix = Index.packed(index(pairs[i:i + part]) for i in range(0, rows, part))
    want = [-1, 0, -1, -1, -1, 1, 4, -1, 7, -1, -1, 9]
    assert ix.previous_same_pair().tolist() == want[:rows]


@pytest.mark.parametrize("seed", range(8))
def test_the_previous_connection_on_a_pair_is_the_last_one_a_dictionary_of_pairs_saw(
        seed: int) -> None:
    """Random connections over few ends, so pairs repeat (either end dialling), with CIDs,
    ports and types of every width (the server's wider than any client's on odd seeds; on
    seed 2 a 1-bit type beside 64-bit CIDs that differ only in their top bit):
    the latest earlier row of each pair is what a dictionary keyed by (type, lower end,
    higher end) remembers, on the index as given and packed in parts."""
    rnd = np.random.default_rng(seed)
    wide = [[2, 3, 2**32 + 1], [1, 2**40, 2**63 + 5], [2**64 - 1, 2**63 - 1, 7], [3, 2**31]]
    servers = wide[seed % 4]
    clients = servers if seed % 2 == 0 else [2, 3]
    ports = [[1, 2**32 - 1, 1024], [1, 2, 3], [5, 2**16 + 1]][seed % 3]
    types = [[1, 2], [1], [1, 5, 2**15]][seed // 2 % 3]  # [1]: one bit, then 64 of CID

    def pick(values: list[int]) -> int:  # by position: a choice of the list goes via float64
        return values[int(rnd.integers(len(values)))]

    pairs = [(pick(types), (pick(clients), pick(ports)), (pick(servers), pick(ports)))
             for _ in range(400)]
    last: dict[tuple[int, tuple[int, int], tuple[int, int]], int] = {}
    want = []
    for row, (typ, client, server) in enumerate(pairs):
        key = (typ, min(client, server), max(client, server))
        want.append(last.get(key, -1))
        last[key] = row
    assert index(pairs).previous_same_pair().tolist() == want
    packed = Index.packed(index(pairs[i:i + 37]) for i in range(0, len(pairs), 37))
    assert packed.previous_same_pair().tolist() == want


def test_groups_come_in_order_of_their_first_row_and_small_ones_are_left_out() -> None:
    ix = index([(1, (3, 1), (2, 9)), (1, (4, 1), (2, 9)), (1, (3, 1), (2, 9)),
                (1, (5, 1), (2, 8)), (1, (4, 1), (2, 9)), (1, (3, 1), (2, 9))])
    keys = (ix.client_cid, ix.server_port)
    rows = np.arange(6)
    assert [g.tolist() for g in ix.groups(rows, keys)] == [[0, 2, 5], [1, 4], [3]]
    assert [g.tolist() for g in ix.groups(rows, keys, least=2)] == [[0, 2, 5], [1, 4]]
    assert [g.tolist() for g in ix.groups(np.array([1, 3, 5]), keys)] == [[1], [3], [5]]
    assert ix.groups(np.zeros(0, dtype=np.int64), keys) == []


@pytest.mark.parametrize("answered", [False, True])
def test_a_request_on_the_ports_of_a_connection_never_established_is_no_state_lost(
        tmp_path: Path, answered: bool) -> None:
    """Stream 0 shuts its sending side after its REQUEST, answered or not, and never closes;
    stream 1 dials again from the same ports. Only an established connection can have lost
    its state: without the RESPONSE there was none to lose."""
    out: list[tuple[int, bytes]] = []
    old = Conv(out, client=(3, 50000), server=(2, 1024))
    old.send(0, Op.REQUEST)
    if answered:
        old.send(1, Op.RESPONSE)
    old.send(0, Op.SHUTDOWN, flags=ShutdownFlag.SEND)
    new = Conv(out, client=(3, 50000), server=(2, 1024))
    new.open()
    new.close()
    found = vsockmon.open(write(tmp_path / "t.pcap", out)).findings()
    lost = [(f.stream, f.frames) for f in found if f.rule == "state-lost"]
    # frames: the old connection's last (its SHUTDOWN) and the new REQUEST
    assert lost == ([(1, (3, 4))] if answered else [])


def test_a_storm_makes_python_values_of_the_rows_it_reads_not_of_their_ranges(
        storm_pcap: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    listed: list[int] = []
    plain = ConnTable._columns_as_lists

    def counted(self: ConnTable) -> object:
        listed.append(len(self))
        return plain(self)

    monkeypatch.setattr(ConnTable, "_columns_as_lists", counted)
    vsockmon.open(storm_pcap).findings()
    assert listed and max(listed) == 1  # each pick a table of its one row, not of CHUNK


def test_a_storm_finding_holds_its_numbers_as_eight_bytes_each_and_prints_them_all(
        storm_pcap: Path) -> None:
    cap = vsockmon.open(storm_pcap)
    listener = next(f for f in cap.findings() if f.rule == "no-listener")
    assert listener.frames.array().nbytes == 8 * 2 * STORM
    assert listener.streams.array().nbytes == 8 * STORM
    line = listener.to_json(cap.start_ns)
    assert line == json.dumps(listener.to_dict(cap.start_ns), ensure_ascii=False)
    assert json.loads(line)["frames"] == list(range(1, 2 * STORM + 1))
    out = CliRunner().invoke(main, ["diagnose", str(storm_pcap)]).output
    every = ", ".join(str(n) for n in range(1, 2 * STORM + 1))
    assert f"ERROR no-listener  (at 0.000000 s, frames {every}; also stream 1, 2, " in out
    assert f", {STORM - 1})\n" in out


@pytest.mark.parametrize("seed", range(8))
def test_groups_are_those_of_the_key_tuples_however_wide_the_keys(seed: int) -> None:
    """Keys are packed into words as their largest values allow: small CIDs share one word,
    CIDs near 2**64 and ports near 2**32 need their own, a 33-bit CID and a 32-bit one make
    65 bits (one too many for a word); the groups must not change."""
    rnd = np.random.default_rng(seed)
    n = 3000
    narrow = {"cid": np.uint64, "port": np.uint32, "type": np.uint16}  # the tracker's types
    ix = Index(**{f: np.zeros(n, dtype=narrow.get(f.rsplit("_")[-1], np.int64))
                  for f in FIELDS})
    client, server = [([2, 3, 2**32 + 1], [2, 3, 2**32 + 1]),
                      ([1, 2**40, 2**63 + 5], [1, 2**40, 2**63 + 5]),
                      ([2**64 - 1, 2**64 - 2, 7], [2**64 - 1, 2**64 - 2, 7]),
                      ([2**32 + 3, 3, 2**32], [2**32 - 1, 2**31, 3])][seed % 4]
    ix.client_cid[:] = rnd.choice(np.array(client, dtype=np.uint64), n)
    ix.server_cid[:] = rnd.choice(np.array(server, dtype=np.uint64), n)
    ix.server_port[:] = rnd.choice(np.array([1, 2**32 - 1, 1024], dtype=np.uint32), n)
    ix.type[:] = rnd.choice(np.array([1, 5], dtype=np.uint16), n)
    rows = np.sort(rnd.choice(n, 2000, replace=False))
    keys = (ix.client_cid, ix.server_cid, ix.server_port, ix.type)
    expect: dict[tuple[int, ...], list[int]] = {}
    for r in rows.tolist():
        expect.setdefault(tuple(int(k[r]) for k in keys), []).append(r)
    assert [g.tolist() for g in ix.groups(rows, keys)] == list(expect.values())
    assert [g.tolist() for g in ix.groups(rows, keys, least=40)] == [
        g for g in expect.values() if len(g) >= 40]
