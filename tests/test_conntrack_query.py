"""Choosing and ordering connections (``conns --cid/--port/--type/--close/--stream --sort``)
on the echo scenario, whose seven connections tests/conntrack_scenarios.py lists."""

from __future__ import annotations

from pathlib import Path

import pytest
from conntrack_scenarios import echo_capture

import vsockmon
from vsockmon.conntrack.query import matching, order
from vsockmon.conntrack.tracker import ConnTable


@pytest.fixture
def table(tmp_path: Path) -> ConnTable:
    return vsockmon.open(echo_capture(tmp_path / "echo.pcap")).analysis().table


def test_each_filter_alone_and_together(table: ConnTable) -> None:
    assert matching(table).tolist() == list(range(7))  # no filter passes everything
    assert matching(table, streams=[5, 1]).tolist() == [1, 5]
    assert matching(table, cids=[2]).tolist() == [3, 5, 6]  # either end
    assert matching(table, ports=[5007]).tolist() == [6]  # the server's port
    assert matching(table, ports=[60000]).tolist() == [3]  # the client's port
    assert matching(table, sock_type="seqpacket").tolist() == [3]
    assert matching(table, closes=["half-closed"]).tolist() == [4]
    assert matching(table, cids=[1], ports=[1234], streams=[1, 2]).tolist() == [1]
    assert matching(table, streams=[99]).tolist() == []
    # port 1234 is served on CID 1 only (streams 0, 1): with CID 3 required, nothing passes
    assert matching(table, cids=[3], ports=[1234]).tolist() == []
    # CID 3's connections are 3 (SEQPACKET), 5 and 6: the type narrows what the CID chose
    assert matching(table, cids=[3], sock_type="stream").tolist() == [5, 6]
    # graceful closes are 0 and 3; of the SEQPACKET ones (only 3) that leaves 3
    assert matching(table, sock_type="seqpacket", closes=["graceful"]).tolist() == [3]


def test_order_ascending_descending_and_missing_last(table: ConnTable) -> None:
    rows = matching(table)
    # handshake: 1000 ns for the answered or refused ones (0, 1, 2, 3, 4); none for the
    # unanswered (5) and the mid-capture one (6), which stay last either way
    assert order(table, rows, "handshake_ms").tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert order(table, rows, "-handshake_ms").tolist() == [0, 1, 2, 3, 4, 5, 6]
    # bytes both ways: 24, 5, 0, 21, 7, 0, 200 (ties keep stream order)
    assert order(table, rows, "bytes").tolist() == [2, 5, 1, 4, 3, 0, 6]
    assert order(table, rows, "-bytes").tolist() == [6, 0, 3, 4, 1, 2, 5]
    # text sorts as text: "3:60000" > "3:50003" > "2:1500000" > "1:50002" > …
    assert order(table, rows, "-client").tolist() == [3, 5, 6, 4, 2, 0, 1]
