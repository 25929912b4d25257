"""``decode --table``: the compiled table (``_render.format_table``, ``render.table_text``)
against tabulate itself, the oracle it replaces, over every fixture, filtered and counted
selections, edge frames, and tables of arbitrary strings; a width, an alignment or a
separator off by one fails here."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from helpers import T0, frame, write_pcap
from hypothesis import given
from hypothesis import strategies as st
from tabulate import tabulate

from vsockmon import api
from vsockmon.cli import decode as cli_decode
from vsockmon.decode import _render
from vsockmon.decode.frames import FrameBatch, decode_batches
from vsockmon.decode.render import TABLE_HEADERS, row, table_text
from vsockmon.wire.pcapio import CaptureError, open_capture
from vsockmon.wire.protocol import Op

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = sorted(p for p in (ROOT / "fixtures").glob("**/*.pcap*"))
SELECTIONS = [(None, None), ("op == RW", None), (None, 7), ("len > 0 or anomaly", 3)]
"""(``-Y``, ``-c``) pairs: everything, a filter, a count, both."""


def oracle(fb: FrameBatch, idx: list[int], t0: int) -> bytes:
    """What ``decode --table`` printed through tabulate (as ``click.echo``: a newline after)."""
    rows = [row(fb.frame(i), t0) for i in idx]
    return (tabulate(rows, headers=TABLE_HEADERS, disable_numparse=True) + "\n").encode()


def assert_same(fb: FrameBatch, idx: list[int], t0: int) -> None:
    got = table_text(fb, np.asarray(idx, dtype=np.int64), t0).decode()
    assert got.splitlines() == oracle(fb, idx, t0).decode().splitlines()  # a readable diff
    assert got.encode() == oracle(fb, idx, t0)


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: str(p.relative_to(ROOT)))
@pytest.mark.parametrize(("expr", "count"), SELECTIONS)
def test_every_fixture_as_tabulate_made_it(path: Path, expr: str | None, count: int | None
                                           ) -> None:
    t0, blocks = None, 0
    try:
        for fb, idx in api.open(str(path)).frames(expr, count):
            t0 = int(fb.ts_ns[0]) if t0 is None else t0
            assert_same(fb, idx, t0)
            blocks += 1
    except CaptureError:
        pytest.skip("not a vsockmon capture")  # synthetic/ethernet.pcap: a one-line error
    if expr is None and count is None:
        assert blocks > 0


def decode_one_batch(tmp_path: Path, frames: list[bytes], step_ns: int = 1000) -> FrameBatch:
    path = write_pcap(tmp_path / "t.pcap", frames, step_ns)
    with open_capture(str(path)) as r:
        (fb,) = list(decode_batches(r.batches()))
    return fb


MON = struct.Struct("<QQIIHHHH")  # vsockmon.h: cids, ports, op, transport, trans_len, reserved

EDGE_FRAMES = [
    frame(Op.REQUEST),                                  # no payload: the last cell empty
    frame(Op.RW, b"hi", fwd_cnt=7),
    frame(Op.RW, b'a "quoted" \\ tab\t and\r\n'),        # escapes: wider than the payload
    frame(Op.RW, b"x" * 24),                            # exactly the preview, no "…"
    frame(Op.RW, b"y" * 25),                            # cut: "…", one code point, 3 bytes
    frame(Op.RW, bytes(range(256))),                    # binary: hex, cut
    frame(Op.RW, b"\x00\x01\xff", length=2),            # len shorter than the payload
    frame(Op.RW, b"abc", length=9),                     # longer: what was captured
    frame(Op.SHUTDOWN, type_=2, flags=3),               # SEQPACKET, flag names
    frame(Op.RW, b"m", type_=2, flags=0xFFFFFFFF),      # every flag bit: the widest cell
    frame(Op(7), src=(2**64 - 1, 2**32 - 1), dst=(0, 0),
          buf_alloc=2**32 - 1, fwd_cnt=2**32 - 1),      # the largest numbers
    frame(Op.RW, b"x")[:40],                            # vsockmon header only: "-" cells
    MON.pack(3, 2, 1025, 9999, 4, 0, 0, 0) + b"raw",    # no transport header, a payload
    b"\x01\x02",                                        # neither header: "?" ends
    b"",                                                # an empty frame
    frame(Op.RW, b"x", type_=9),                        # an unknown type's name
]


def test_edge_frames_each_kind_of_cell(tmp_path: Path) -> None:
    fb = decode_one_batch(tmp_path, EDGE_FRAMES)
    everything = list(range(len(fb)))
    assert_same(fb, everything, T0)
    for rows in ([0], [len(fb) - 1], [11, 12, 13], [4, 5], [1, 13]):  # -Y: some rows
        assert_same(fb, rows, T0)
    assert_same(fb, everything, T0 + 5_000)  # frames before t0: negative times
    assert_same(fb, everything, T0 - 1000 * 10**9 - 250_000)  # a time wider than its header


def test_only_rows_without_virtio_columns(tmp_path: Path) -> None:
    """Columns of nothing but ``-``, ``?`` and empty payloads: their widths are the
    headers' plus two, and the empty last column leaves no trailing space."""
    fb = decode_one_batch(tmp_path, [frame(Op.RW, b"")[:40], b"\x01\x02", b""])
    assert_same(fb, [0, 1, 2], T0)
    assert table_text(fb, np.arange(3), T0).decode().splitlines()[2].endswith("-")


def test_frame_numbers_wider_than_their_header(tmp_path: Path) -> None:
    """Frame 10000 is five digits, one more than ``no`` and its padding."""
    fb = decode_one_batch(tmp_path, [frame(Op.RW, b"z")] * 10_001, step_ns=1)
    assert_same(fb, [9_998, 9_999, 10_000], T0)
    assert_same(fb, [998, 999], T0)  # 3 digits: narrower than the header


def test_the_cli_prints_a_table_per_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    """Every TABLE_ROWS rows a new table: its own headers and widths, as before."""
    monkeypatch.setattr(cli_decode, "TABLE_ROWS", 4)
    path = write_pcap(tmp_path / "b.pcap", EDGE_FRAMES)
    with pytest.raises(SystemExit) as done:
        cli_decode.decode.main([str(path), "--table"], standalone_mode=True)
    assert done.value.code == 0
    fb = decode_one_batch(tmp_path, EDGE_FRAMES)
    blocks = [list(range(s, min(s + 4, len(fb)))) for s in range(0, len(fb), 4)]
    assert capsysbinary.readouterr().out == b"".join(oracle(fb, b, T0) for b in blocks)


# -- format_table itself: tables of arbitrary strings --------------------------------------

def strings_table(rows: list[tuple[str, ...]], headers: tuple[str, ...]) -> bytes:
    """``format_table`` of a table of strings: each column a dictionary-encoded K_STR."""
    templates: list[list[list[tuple[object, ...]]]] = [[]]
    for c in range(len(headers)):
        texts = sorted({r[c] for r in rows})
        codes = np.array([texts.index(r[c]) for r in rows], dtype=np.int32)
        templates[0].append([(_render.K_STR, codes, tuple(t.encode() for t in texts))])
    return _render.format_table(len(rows), np.zeros(len(rows), dtype=np.int8), templates,
                                headers)


def tabulated(rows: list[tuple[str, ...]], headers: tuple[str, ...]) -> bytes:
    return (tabulate(rows, headers=headers, disable_numparse=True) + "\n").encode()


@pytest.mark.parametrize("rows", [
    [],                                                   # headers and dashes only
    [("", "", "")],                                       # all empty: no trailing space
    [("abcd", "", "x")],                                  # one wider than "ab" + 2
    [("abc", "x", "")],                                   # as wide as "ab" + 2 less one
    [("a", "12345", "y"), ("abcdef", "-", "")],           # numbers are text: left-aligned
    [("…", "→→→→→", "a…b"), ("ab…", "", "…")],            # widths in code points
    [("True", "False", "1.5"), ("x", "-", "0x10")],       # no bool or number columns
    [("a b", "c  d", "e")],                               # inner spaces are kept
])
def test_format_table_is_tabulate(rows: list[tuple[str, ...]]) -> None:
    headers = ("ab", "c", "defgh")
    assert strings_table(rows, headers) == tabulated(rows, headers)


CELL = st.text(st.sampled_from("ab -\"\\…→é0.9xTrueFals"), max_size=8).filter(
    lambda s: s == s.strip())


@given(st.integers(1, 4).flatmap(lambda n: st.tuples(
    st.lists(CELL.filter(bool), min_size=n, max_size=n).map(tuple),
    st.lists(st.lists(CELL, min_size=n, max_size=n).map(tuple), max_size=6))))
def test_format_table_is_tabulate_on_any_strings(
        table: tuple[tuple[str, ...], list[tuple[str, ...]]]) -> None:
    headers, rows = table
    assert strings_table(rows, headers) == tabulated(rows, headers)


def test_format_table_refuses_bad_templates() -> None:
    which = np.zeros(1, dtype=np.int8)
    cell = [(_render.K_LIT, b"x")]
    with pytest.raises(ValueError, match="a cell per header"):
        _render.format_table(1, which, [[cell]], ("a", "b"))
    with pytest.raises(IndexError, match="template choice"):
        _render.format_table(1, np.ones(1, dtype=np.int8), [[cell]], ("a",))
    with pytest.raises(ValueError, match="shorter than the rows"):
        _render.format_table(2, which, [[cell]], ("a",))
    with pytest.raises(TypeError, match="headers must be str"):
        _render.format_table(1, which, [[cell]], (b"a",))
