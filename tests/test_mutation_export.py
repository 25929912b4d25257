"""Exports at their edges: the state named in each packet comment through every way a
connection closes, the evidence notes, and the table columns of frames without headers.

Comments are read back in-process (``helpers.pcapng_comments``, which test_export.py checks
against tshark), tables by pyarrow; the expected states are reasoned from the packets each
test sends (docs/conns.md: a SHUTDOWN's SEND bit closes the
sender's direction, RCV the peer's; an RST after both directions closed is graceful).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import T0, frame, pcapng_comments, write_pcap

from vsockmon.export import ExportError, export_many, export_pcapng, export_tables, find_captures
from vsockmon.export.run import CAPTURE_SUFFIXES
from vsockmon.wire.pcapio import open_capture
from vsockmon.wire.protocol import Op

C, S = (3, 50000), (2, 1024)
RCV, SEND = 1, 2


def c2s(op: Op, **kw: object) -> bytes:
    return frame(op, src=C, dst=S, **kw)  # type: ignore[arg-type]


def s2c(op: Op, **kw: object) -> bytes:
    return frame(op, src=S, dst=C, **kw)  # type: ignore[arg-type]


def states(tmp_path: Path, frames: list[bytes], step_ns: int = 1000) -> list[str]:
    """The state each packet's comment names (the word after ``(client)``/``(server)``)."""
    src = write_pcap(tmp_path / "in.pcap", frames, step_ns=step_ns)
    out = tmp_path / "out.pcapng"
    export_pcapng(str(src), str(out), force=True, payload=False)
    got = pcapng_comments(out)
    return [c.split(") ", 1)[1].split(",")[0].split(";")[0] for c in got]


def comments(tmp_path: Path, frames: list[bytes], step_ns: int = 1000) -> list[str]:
    src = write_pcap(tmp_path / "in.pcap", frames, step_ns=step_ns)
    out = tmp_path / "out.pcapng"
    export_pcapng(str(src), str(out), force=True, payload=False)
    return pcapng_comments(out)


OPEN = [c2s(Op.REQUEST), s2c(Op.RESPONSE)]


@pytest.mark.parametrize(("close", "want"), [
    # each side shuts its own sending direction, then the RST: graceful
    ([c2s(Op.SHUTDOWN, flags=SEND), s2c(Op.SHUTDOWN, flags=SEND), s2c(Op.RST)],
     ["half-closed", "closing", "graceful"]),
    # RCV closes the peer's direction: the client's RCV|SEND closes both at once
    ([c2s(Op.SHUTDOWN, flags=RCV | SEND), s2c(Op.RST)], ["closing", "graceful"]),
    # RCV alone closes only the peer's direction
    ([c2s(Op.SHUTDOWN, flags=RCV), c2s(Op.SHUTDOWN, flags=RCV)], ["half-closed", "half-closed"]),
    ([s2c(Op.SHUTDOWN, flags=RCV), c2s(Op.SHUTDOWN, flags=RCV), c2s(Op.RST)],
     ["half-closed", "closing", "graceful"]),
    # an RST before both directions are shut is a reset, by whoever sent it
    ([c2s(Op.SHUTDOWN, flags=SEND), c2s(Op.RST)], ["half-closed", "reset-by-client"]),
    ([s2c(Op.RST)], ["reset-by-server"]),
    ([c2s(Op.RST)], ["reset-by-client"]),
    # once over, a second RST changes nothing
    ([s2c(Op.RST), c2s(Op.RST)], ["reset-by-server", "reset-by-server"]),
])
def test_state_through_every_close(tmp_path: Path, close: list[bytes], want: list[str]) -> None:
    got = states(tmp_path, [*OPEN, *close])
    assert got == ["requested", "established", *want]


def test_refused_only_when_the_server_answers_the_request_with_rst(tmp_path: Path) -> None:
    assert states(tmp_path, [c2s(Op.REQUEST), s2c(Op.RST)]) == ["requested", "refused"]
    # the client giving up on its own request is a reset by the client, not a refusal
    assert states(tmp_path, [c2s(Op.REQUEST), c2s(Op.RST)]) == ["requested",
                                                                 "reset-by-client"]


def test_joined_mid_connection_is_established_until_an_event(tmp_path: Path) -> None:
    got = states(tmp_path, [c2s(Op.RW, payload=b"x"), s2c(Op.CREDIT_UPDATE),
                            c2s(Op.SHUTDOWN, flags=SEND)])
    assert got == ["established", "established", "half-closed"]


def test_notes_on_the_frames_the_tracker_singles_out(tmp_path: Path) -> None:
    """Handshake time on the RESPONSE (1.5 ms apart here), the close on its RST."""
    got = comments(tmp_path, [*OPEN, s2c(Op.RST)], step_ns=1_500_000)
    assert got[1].endswith("; handshake 1.500 ms")
    assert got[2].endswith("; close: reset-by-server by server")
    assert "handshake" not in got[0] and "close" not in got[1]


def test_refused_handshake_is_timed_on_the_rst(tmp_path: Path) -> None:
    got = comments(tmp_path, [c2s(Op.REQUEST), s2c(Op.RST)], step_ns=2_000_000)
    assert got[1].endswith("close: refused by server; handshake 2.000 ms")


def test_zero_credit_stall_notes(tmp_path: Path) -> None:
    """A receiver advertising buf_alloc 4 that has taken in 4 bytes: the sender has no credit
    left until it consumes them (fwd_cnt 4); the notes mark the first and longest stall."""
    frames = [
        c2s(Op.REQUEST), s2c(Op.RESPONSE, buf_alloc=4),
        c2s(Op.RW, payload=b"abcd"),                    # 3: credit exhausted
        s2c(Op.CREDIT_UPDATE, buf_alloc=4, fwd_cnt=4),  # 4: stall ends
    ]
    got = comments(tmp_path, frames, step_ns=3_000_000)
    text = "\n".join(got)
    assert "zero credit (c2s): first of 1 stalls" in got[2]
    assert "in flight 4/4" in got[2]
    # the server's own direction: nothing sent, against the client's buf_alloc (262144)
    assert "s2c (server) established, in flight 0/262144" in got[3]
    assert "longest stall" not in text  # the first is the longest: one note


def test_packets_table_for_frames_without_headers(tmp_path: Path) -> None:
    full = c2s(Op.RW, payload=b"abc")
    src = write_pcap(tmp_path / "in.pcap", [full, full[:40], full[:10]])
    export_tables(str(src), tmp_path / "t", "parquet")
    rows = pq.read_table(tmp_path / "t" / "packets.parquet").to_pylist()
    assert [r["frame"] for r in rows] == [1, 2, 3]
    assert [r["mon_op"] for r in rows] == [4, 4, None]
    assert [r["mon_op_name"] for r in rows] == ["PAYLOAD", "PAYLOAD", None]
    assert [r["op"] for r in rows] == [5, None, None]
    assert [r["op_name"] for r in rows] == ["RW", None, None]
    assert [r["type_name"] for r in rows] == ["STREAM", None, None]
    assert [r["flag_names"] for r in rows] == ["", None, None]
    assert [r["len"] for r in rows] == [3, None, None]
    assert [r["anomaly_names"] for r in rows] == ["", "truncated", "truncated"]
    assert [r["stream"] for r in rows] == [0, None, None]
    assert [r["dir"] for r in rows] == ["c2s", None, None]
    assert rows[0]["caplen"] == rows[0]["orig_len"] == 79 and rows[2]["caplen"] == 10
    assert "payload_proto" not in rows[0]  # payload columns only when asked for


def test_connections_table_of_a_capture_without_connections(tmp_path: Path) -> None:
    """Frames too short for any header make no connection: an empty table, still typed."""
    from vsockmon.export.tables import CONNECTION_COLUMNS, schema

    src = write_pcap(tmp_path / "in.pcap", [c2s(Op.RW, payload=b"abc")[:10]])
    res = export_tables(str(src), tmp_path / "t", "parquet")
    table = pq.read_table(tmp_path / "t" / "connections.parquet")
    assert (res.connections, table.num_rows) == (0, 0)
    assert table.schema.remove_metadata() == schema(CONNECTION_COLUMNS)


def test_unknown_format_and_no_captures(tmp_path: Path) -> None:
    with pytest.raises(ExportError) as e:
        export_tables("x.pcap", tmp_path, "xml")
    assert str(e.value) == "unknown table format 'xml'; choose parquet, csv, json"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError) as e:
        export_many(tmp_path / "empty", tmp_path / "o", "csv")
    assert str(e.value) == (f"{tmp_path / 'empty'}: no capture files (.pcap, .pcapng, "
                            ".pcap.gz, .pcapng.gz, .cap)")


def test_find_captures_by_suffix_in_order(tmp_path: Path) -> None:
    for name in ("b.pcap", "a.pcapng", "sub/c.pcap.gz", "sub/d.pcapng.gz", "e.cap",
                 "f.txt", "g.pcap.bak", "sub/h.ntar"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "dir.pcap").mkdir()
    got = [p.relative_to(tmp_path).as_posix() for p in find_captures(tmp_path)]
    assert got == ["a.pcapng", "b.pcap", "e.cap", "sub/c.pcap.gz", "sub/d.pcapng.gz"]
    assert len(CAPTURE_SUFFIXES) == 5


def test_one_job_exports_in_order_and_reports_each(tmp_path: Path) -> None:
    caps = tmp_path / "caps"
    caps.mkdir()
    for name in ("b.pcap", "a.pcap"):
        write_pcap(caps / name, [*OPEN])
    done: list[str] = []
    results = export_many(caps, tmp_path / "o", "json", jobs=1,
                          on_done=lambda r: done.append(Path(r.source).name))
    assert done == ["a.pcap", "b.pcap"]
    assert [(Path(r.source).name, r.packets, r.connections, r.error) for r in results] == [
        ("a.pcap", 2, 1, None), ("b.pcap", 2, 1, None)]
    rows = [json.loads(x) for x in
            (tmp_path / "o" / "a.pcap" / "packets.jsonl").read_text().splitlines()]
    assert [r["capture"] for r in rows] == ["a.pcap", "a.pcap"]


def test_header_columns_name_type_and_doc() -> None:
    """Column i of a header is prefix+name, the unsigned type of its width, and a doc naming
    Wireshark's field; a virtio field without its own doc borrows the vsockmon one."""
    import pyarrow as pa

    from vsockmon.export.tables import Column, _header_columns
    from vsockmon.wire.protocol import VIRTIO_HEADER, VSOCKMON_HEADER, Field

    mon = _header_columns("mon_", VSOCKMON_HEADER.fields[:1], "vsockmon header:")
    assert mon == [Column("mon_src_cid", pa.uint64(),
                          "vsockmon header: source context id (Wireshark `vsock.src_cid`)")]
    virtio = {c.name: c for c in _header_columns("", VIRTIO_HEADER.fields, "virtio header:")}
    assert virtio["src_cid"] == Column(
        "src_cid", pa.uint64(), "virtio header: source context id (Wireshark "
                                "`vsock.virtio.src_cid`)")
    assert virtio["src_port"].doc.endswith("(Wireshark `vsock.virtio.src_prot`)")
    assert virtio["type"] == Column("type", pa.uint16(),
                                    "virtio header: socket type (Wireshark `vsock.virtio.type`)")
    assert virtio["len"].type == pa.uint32()
    odd = _header_columns("p_", (Field("zz", 0, 1, "x.zz", "x.zz"),), "w:")
    assert odd == [Column("p_zz", pa.uint8(), "w: zz (Wireshark `x.zz`)")]


def test_frames_batch_columns_for_every_kind_of_frame(tmp_path: Path) -> None:
    """The Arrow rows of ``decode --json``: names from the kernel headers (virtio_vsock.h:
    RW=5, SHUTDOWN=4, STREAM=1, SEQPACKET=2, SHUTDOWN_RCV=1/_SEND=2, SEQ_EOM=1/_EOR=2;
    vsockmon.h: DISCONNECT=2, PAYLOAD=4, VIRTIO=2; the kernel taps a SHUTDOWN as DISCONNECT),
    nulls where a frame lacks a header."""
    from fractions import Fraction

    from helpers import T0

    from vsockmon.decode.frames import decode_batches
    from vsockmon.export.tables import FRAME_SCHEMA, frames_batch
    from vsockmon.wire.pcapio import open_capture

    full = c2s(Op.RW, payload=b"abc")
    src = write_pcap(tmp_path / "f.pcap", [
        full,                                                   # 1: STREAM RW, no flags
        c2s(Op.RW, payload=b"xy", type_=2, flags=3),            # 2: SEQPACKET EOM|EOR
        s2c(Op.SHUTDOWN, flags=RCV | SEND),                     # 3: RCV|SEND
        full[:40],                                              # 4: vsockmon header only
        s2c(Op.RW, payload=b"abcdef", length=2),                # 5: payload longer than len
        full[:10],                                              # 6: no header at all
    ], step_ns=1_234_567)
    with open_capture(str(src)) as r:
        (fb,) = list(decode_batches(r.batches()))
    batch = frames_batch(fb)
    assert batch.schema == FRAME_SCHEMA
    rows = batch.to_pylist()
    col = {k: [row[k] for row in rows] for k in rows[0]}
    assert col["frame.number"] == [1, 2, 3, 4, 5, 6]
    stamps = [T0 + i * 1_234_567 for i in range(6)]
    assert col["frame.time_ns"] == stamps
    assert col["frame.time_epoch"] == [float(Fraction(t, 10**9)) for t in stamps]
    assert col["frame.len"] == col["frame.cap_len"] == [79, 78, 76, 40, 82, 10]
    assert col["vsock.op"] == [4, 4, 2, 4, 4, None]
    assert col["vsock.op_name"] == ["PAYLOAD", "PAYLOAD", "DISCONNECT", "PAYLOAD", "PAYLOAD",
                                    None]
    assert col["vsock.trans_name"] == ["VIRTIO"] * 5 + [None]
    assert col["vsock.src_port"] == [50000, 50000, 1024, 50000, 1024, None]
    assert col["vsock.virtio.op"] == [5, 5, 4, None, 5, None]
    assert col["vsock.virtio.op_name"] == ["RW", "RW", "SHUTDOWN", None, "RW", None]
    assert col["vsock.virtio.type_name"] == ["STREAM", "SEQPACKET", "STREAM", None, "STREAM",
                                             None]
    assert col["vsock.virtio.dst_port"] == [1024, 1024, 50000, None, 50000, None]
    assert col["vsock.virtio.flags_names"] == [[], ["EOM", "EOR"], ["RCV", "SEND"], None, [],
                                               None]
    assert col["vsock.virtio.len"] == [3, 2, 0, None, 2, None]
    assert col["payload_len"] == [3, 2, 0, 0, 6, 0]
    assert col["anomalies"] == [[], [], [], ["truncated"], ["payload-len-mismatch"],
                                ["truncated"]]


def test_frames_batch_of_clean_frames_keeps_its_list_types(tmp_path: Path) -> None:
    """No flag and no anomaly anywhere: the name lists are all empty, and still lists of
    strings (the schema of ``packets()``), not of nothing."""
    import pyarrow as pa

    from vsockmon.decode.frames import decode_batches
    from vsockmon.export.tables import frames_batch
    from vsockmon.wire.pcapio import open_capture

    src = write_pcap(tmp_path / "clean.pcap", OPEN)
    with open_capture(str(src)) as r:
        (fb,) = list(decode_batches(r.batches()))
    batch = frames_batch(fb)
    for name in ("vsock.virtio.flags_names", "anomalies"):
        assert batch.schema.field(name).type == pa.list_(pa.string())
        assert batch.column(name).to_pylist() == [[], []]


def test_frames_batch_names_unknown_codes(tmp_path: Path) -> None:
    """An op, type or transport the headers do not define is ``UNKNOWN(n)``, not dropped."""
    from vsockmon.decode.frames import decode_batches
    from vsockmon.export.tables import frames_batch
    from vsockmon.wire.pcapio import open_capture
    from vsockmon.wire.protocol import VIRTIO_HEADER, VSOCKMON_HEADER

    addr = {"src_cid": 3, "dst_cid": 2, "src_port": 1, "dst_port": 2}
    virtio = VIRTIO_HEADER.pack(**addr, len=0, type=9, op=42, flags=0, buf_alloc=0, fwd_cnt=0)
    src = write_pcap(tmp_path / "u.pcap", [
        VSOCKMON_HEADER.pack(**addr, op=9, transport=7, trans_len=44) + virtio,
        VSOCKMON_HEADER.pack(**addr, op=4, transport=2, trans_len=44) + virtio])
    with open_capture(str(src)) as r:
        (fb,) = list(decode_batches(r.batches()))
    other, odd = frames_batch(fb).to_pylist()
    assert (other["vsock.op_name"], other["vsock.trans_name"]) == ("UNKNOWN(9)", "UNKNOWN(7)")
    # transport 7 is not virtio: its 44 bytes are not read as a virtio header
    assert other["vsock.virtio.op_name"] is None and other["vsock.virtio.op"] is None
    assert (odd["vsock.virtio.op_name"], odd["vsock.virtio.type_name"]) == ("UNKNOWN(42)",
                                                                          "UNKNOWN(9)")


APP = (2, 7000)  # a port no payload dissector claims (1024 is the kata agent's ttrpc)


def app(op: Op, **kw: object) -> bytes:
    return frame(op, src=C, dst=APP, **kw)  # type: ignore[arg-type]


def test_payload_columns_only_for_rw_with_bytes(tmp_path: Path) -> None:
    """``--payload`` dissects RW payloads only: a one-byte RW is text, an RW of len 0 has no
    payload, and bytes behind a CREDIT_UPDATE (a control op carries none) are not read."""
    src = write_pcap(tmp_path / "p.pcap", [
        app(Op.RW, payload=b"x"), app(Op.RW), app(Op.CREDIT_UPDATE, payload=b"hello\n"),
        app(Op.RW, payload=b"{}")])
    export_tables(str(src), tmp_path / "t", "parquet", payload=True)
    rows = pq.read_table(tmp_path / "t" / "packets.parquet").to_pylist()
    assert [r["payload_proto"] for r in rows] == ["text", None, None, "json"]
    assert [r["payload_summary"] for r in rows] == ["x", None, None, "{}"]


def test_payload_columns_when_nothing_is_dissected(tmp_path: Path) -> None:
    """No payload at all: the two columns are there, typed, and all null."""
    import pyarrow as pa

    src = write_pcap(tmp_path / "n.pcap", OPEN)
    export_tables(str(src), tmp_path / "t", "parquet", payload=True)
    table = pq.read_table(tmp_path / "t" / "packets.parquet")
    assert table.schema.field("payload_proto").type == pa.dictionary(pa.int32(), pa.string())
    assert table.schema.field("payload_summary").type == pa.string()
    assert table.column("payload_summary").to_pylist() == [None, None]


def test_packet_schema_leaves_payload_columns_out_by_default() -> None:
    from vsockmon.export.tables import PACKET_COLUMNS, packet_schema

    assert packet_schema().names == [c.name for c in PACKET_COLUMNS]
    assert packet_schema(True).names[-2:] == ["payload_proto", "payload_summary"]


def test_json_lines_are_compact_utf8_and_parquet_is_zstd(tmp_path: Path) -> None:
    """docs/export.md: JSON Lines, one object per row (written compact, UTF-8 kept as is);
    Parquet zstd-compressed."""
    src = write_pcap(tmp_path / "u.pcap", [app(Op.RW, payload="café\n".encode())])
    export_tables(str(src), tmp_path / "j", "json", payload=True)
    (line,) = (tmp_path / "j" / "packets.jsonl").read_text(encoding="utf-8").splitlines()
    assert line.startswith('{"capture":"u.pcap","frame":1,"ts_ns":')
    assert '"payload_summary":"café"' in line
    export_tables(str(src), tmp_path / "p", "parquet")
    meta = pq.ParquetFile(tmp_path / "p" / "packets.parquet").metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"


def caps_dir(tmp_path: Path) -> Path:
    """Two good captures (one in a subdirectory) and one that is not a capture."""
    caps = tmp_path / "caps"
    (caps / "vm1").mkdir(parents=True)
    write_pcap(caps / "a.pcap", [*OPEN, app(Op.RW, payload=b"x")])
    write_pcap(caps / "vm1" / "b.pcap", OPEN)
    (caps / "bad.pcap").write_bytes(b"garbage!" * 10)
    return caps


@pytest.mark.parametrize("jobs", [1, 2])
def test_many_captures_each_result_options_and_failure(tmp_path: Path, jobs: int) -> None:
    """Each capture goes to outdir/<its relative path>/ named by that path, with the options
    given (payload, force); a broken one is a result with its error, the others go on."""
    caps = caps_dir(tmp_path)
    out = tmp_path / "o"
    done: list[object] = []
    results = export_many(caps, out, "json", payload=True, jobs=jobs, on_done=done.append)
    assert sorted(done, key=lambda r: r.source) == results  # type: ignore[attr-defined]
    assert [(Path(r.source).relative_to(caps).as_posix(), r.packets, r.connections)
            for r in results] == [("a.pcap", 3, 2), ("bad.pcap", 0, 0), ("vm1/b.pcap", 2, 1)]
    assert [r.error is None for r in results] == [True, False, True]
    assert results[1].error.startswith(str(caps / "bad.pcap"))  # type: ignore[union-attr]
    rows = [json.loads(x) for x in (out / "vm1" / "b.pcap" / "packets.jsonl").read_text()
            .splitlines()]
    assert [r["capture"] for r in rows] == ["vm1/b.pcap"] * 2
    conns = [json.loads(x) for x in (out / "vm1" / "b.pcap" / "connections.jsonl").read_text()
             .splitlines()]
    assert [(c["capture"], c["stream"]) for c in conns] == [("vm1/b.pcap", 0)]
    a = [json.loads(x) for x in (out / "a.pcap" / "packets.jsonl").read_text().splitlines()]
    assert a[2]["payload_summary"] == "x"
    again = export_many(caps, out, "json", jobs=jobs)
    assert [r.error is not None and "exists; use --force" in r.error for r in again] == [
        True, False, True]
    forced = export_many(caps, out, "json", force=True, jobs=jobs)
    assert [r.error is None for r in forced] == [True, False, True]
    assert "payload_summary" not in json.loads(
        (out / "a.pcap" / "packets.jsonl").read_text().splitlines()[0])


def test_packets_table_direction_credit_and_flag_names(tmp_path: Path) -> None:
    """Credit reasoned from the packets: the client's REQUEST advertises 262144 (the frame
    default), the server's RESPONSE 4; the client's 4 bytes fill that window (4/4) and the
    server's own direction stays empty against the client's 262144. Before the RESPONSE the
    client's credit is unknown: null. Flag names depend on op and type (virtio_vsock.h)."""
    src = write_pcap(tmp_path / "c.pcap", [
        c2s(Op.REQUEST),
        s2c(Op.RESPONSE, buf_alloc=4),
        c2s(Op.RW, payload=b"abcd"),
        s2c(Op.CREDIT_UPDATE, buf_alloc=4, fwd_cnt=4),
        c2s(Op.RW, flags=1),                      # a STREAM RW: bit 0 means nothing, a value
        frame(Op.RW, type_=2, flags=1, src=(5, 50001), dst=(6, 7000)),  # SEQPACKET RW: EOM
        c2s(Op.SHUTDOWN, flags=RCV),
    ])
    export_tables(str(src), tmp_path / "t", "parquet")
    rows = pq.read_table(tmp_path / "t" / "packets.parquet").to_pylist()
    assert [r["dir"] for r in rows] == ["c2s", "s2c", "c2s", "s2c", "c2s", "c2s", "c2s"]
    assert [r["in_flight"] for r in rows[:4]] == [None, 0, 4, 0]
    assert [r["credit_limit"] for r in rows[:4]] == [None, 262144, 4, 262144]
    assert [r["flag_names"] for r in rows] == ["", "", "", "", "0x1", "EOM", "RCV"]


def test_connections_table_without_a_capture_column(tmp_path: Path) -> None:
    """The library's ``connections()``: the tracker's record fields only, typed as
    docs/export.md says, one row per stream."""
    import vsockmon
    from vsockmon.conntrack.tracker import RECORD_FIELDS
    from vsockmon.export.tables import CONNECTION_COLUMNS, schema

    src = write_pcap(tmp_path / "k.pcap", [*OPEN, s2c(Op.RST)])
    table = vsockmon.open(str(src)).connections()
    assert table.schema.names == [f.name for f in RECORD_FIELDS]
    assert table.schema == schema(CONNECTION_COLUMNS[1:])
    (row,) = table.to_pylist()
    assert (row["stream"], row["close"]) == (0, "reset-by-server")


def test_export_tables_results_names_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    """What one table export reports: both paths, the packets of each batch, why a damaged
    capture stopped; a capture read from stdin is named ``<stdin>``; an outdir that cannot
    be made and a file that is no capture are one-line errors naming the path."""
    import io
    import sys
    from types import SimpleNamespace

    src = write_pcap(tmp_path / "in.pcap", [*OPEN, s2c(Op.RST)])
    heard: list[int] = []
    res = export_tables(str(src), tmp_path / "t", "csv", on_batch=heard.append)
    assert res.outputs == [str(tmp_path / "t" / "packets.csv"),
                           str(tmp_path / "t" / "connections.csv")]
    assert (res.packets, res.connections, res.stopped, sum(heard)) == (3, 1, None, 3)
    import pyarrow.csv as pacsv

    conns = pacsv.read_csv(tmp_path / "t" / "connections.csv")
    assert conns.column("capture").to_pylist() == ["in.pcap"]  # the file's name
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(src.read_bytes()[:-10])  # the last record loses 10 bytes
    res = export_tables(str(cut), tmp_path / "c", "csv")
    # 24 bytes of file header, then two records of 16 + 76 bytes; the third has 92 - 10 left
    assert res.packets == 2
    assert res.stopped == ("file ends inside a packet after packet 2 "
                           "(byte 208, 82 bytes left over)")
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=io.BytesIO(src.read_bytes())))
    export_tables("-", tmp_path / "s", "json")
    rows = [json.loads(x) for x in (tmp_path / "s" / "packets.jsonl").read_text().splitlines()]
    assert {r["capture"] for r in rows} == {"<stdin>"}
    (tmp_path / "file").write_text("")
    with pytest.raises(ExportError) as e:
        export_tables(str(src), tmp_path / "file" / "sub", "csv")
    assert str(e.value) == f"{tmp_path / 'file' / 'sub'}: cannot create: Not a directory"
    (tmp_path / "junk.pcap").write_bytes(b"garbage!" * 10)
    with pytest.raises(ExportError) as e:
        export_tables(str(tmp_path / "junk.pcap"), tmp_path / "j", "csv")
    assert str(e.value).startswith(f"{tmp_path / 'junk.pcap'}: ") and "\n" not in str(e.value)


def test_rows_counted_over_every_batch(tmp_path: Path) -> None:
    """The reader hands over 4 MiB at a time (pcapio.CHUNK): 80 packets of 64 KiB make two
    batches at least, and the packet count is that of all of them."""
    from vsockmon.wire.pcapio import CHUNK

    big = c2s(Op.RW, payload=b"z" * 65536)
    assert 80 * len(big) > CHUNK
    src = write_pcap(tmp_path / "big.pcap", [big] * 80)
    heard: list[int] = []
    res = export_tables(str(src), tmp_path / "t", "parquet", on_batch=heard.append)
    assert len(heard) >= 2 and sum(heard) == 80
    assert res.packets == 80
    assert pq.read_table(tmp_path / "t" / "packets.parquet").num_rows == 80


def odd_frame() -> bytes:
    """A server RW of len 2 carrying 6 bytes, under a vsockmon header whose source port (7)
    is not the virtio header's (1024): two anomalies at once."""
    from vsockmon.wire.protocol import VSOCKMON_HEADER

    f = s2c(Op.RW, payload=b"abcdef", length=2)
    return VSOCKMON_HEADER.pack(src_cid=2, dst_cid=3, src_port=7, dst_port=50000, op=4,
                                transport=2, trans_len=44) + f[VSOCKMON_HEADER.size:]


def test_two_anomalies_are_named_in_bit_order(tmp_path: Path) -> None:
    """Anomaly bits (decode.frames.Anomaly): PAYLOAD_LEN is bit 2, ADDR_MISMATCH bit 7."""
    src = write_pcap(tmp_path / "a.pcap", [odd_frame()])
    export_tables(str(src), tmp_path / "t", "parquet")
    (row,) = pq.read_table(tmp_path / "t" / "packets.parquet").to_pylist()
    assert row["anomaly_names"] == "payload-len-mismatch,addr-mismatch"
    assert row["anomalies"] == (1 << 2) | (1 << 7)


def test_zero_buf_alloc_is_a_limit_of_zero_not_unknown(tmp_path: Path) -> None:
    """A server that answers with buf_alloc 0 gives the client a credit limit of 0 (known,
    and empty), which is not the null of a credit not yet known."""
    src = write_pcap(tmp_path / "z.pcap", [*OPEN[:1], s2c(Op.RESPONSE, buf_alloc=0),
                                           c2s(Op.CREDIT_REQUEST)])
    export_tables(str(src), tmp_path / "t", "parquet")
    rows = pq.read_table(tmp_path / "t" / "packets.parquet").to_pylist()
    assert [(r["in_flight"], r["credit_limit"]) for r in rows] == [
        (None, None), (0, 262144), (0, 0)]


def test_diagnose_findings_then_extra_lines_in_comments(tmp_path: Path) -> None:
    """``export --diagnose``: a REQUEST answered by the server's RST is the no-listener error
    (docs/diagnose.md), noted at both its frames; the caller's extra lines come after the
    findings, and alone on a frame no finding names."""
    clean = [app(Op.REQUEST), frame(Op.RESPONSE, src=APP, dst=C),
             app(Op.SHUTDOWN, flags=RCV | SEND), frame(Op.RST, src=APP, dst=C)]
    src = write_pcap(tmp_path / "in.pcap", [c2s(Op.REQUEST), s2c(Op.RST), odd_frame(), *clean])
    out = tmp_path / "out.pcapng"
    export_pcapng(str(src), str(out), payload=False, diagnose=True,
                  extra={2: ["mine"], 3: ["other"], 4: ["alone"]})
    got = pcapng_comments(out)
    assert "; diagnose: ERROR no-listener: " in got[0] and "mine" not in got[0]
    assert "; diagnose: ERROR no-listener: " in got[1] and got[1].endswith("; mine")
    assert "anomalies: payload-len-mismatch,addr-mismatch" in got[2]
    assert got[2].endswith("; other")
    # a connection opened and closed in order: no finding, the extra line alone after the state
    assert got[3].endswith(" c2s (client) requested; alone") and "diagnose" not in got[3]


def test_states_go_on_past_a_credit_request(tmp_path: Path) -> None:
    """A CREDIT_REQUEST changes no state, and the events after it still do."""
    got = states(tmp_path, [*OPEN, c2s(Op.CREDIT_REQUEST), c2s(Op.SHUTDOWN, flags=SEND)])
    assert got == ["requested", "established", "established", "half-closed"]


def test_no_handshake_time_without_the_request(tmp_path: Path) -> None:
    """Joined after the REQUEST: the RESPONSE is there but no handshake time can be (nor a
    credit for the server: the client's buf_alloc was in the REQUEST)."""
    got = comments(tmp_path, [s2c(Op.RESPONSE), c2s(Op.RW, payload=b"x")])
    assert got[0] == "vsockmon stream 0 s2c (server) established"
    assert "handshake" not in "".join(got)


def test_violation_first_and_last_and_a_long_handshake(tmp_path: Path) -> None:
    """Two server RWs whose payload is longer than their ``len`` (the tap-length violation,
    docs/analysis.md): the first and the last are noted, with the count. A handshake of
    600 ms prints as 600.000 (milliseconds to the µs)."""
    bad = s2c(Op.RW, payload=b"abcdef", length=2)
    got = comments(tmp_path, [*OPEN, bad, bad], step_ns=600_000_000)
    assert got[1].endswith("; handshake 600.000 ms")
    assert got[2].endswith("; violation tap-length (s2c): first of 2")
    assert got[3].endswith("; violation tap-length (s2c): last of 2")


def test_no_close_note_while_the_connection_is_only_half_closed(tmp_path: Path) -> None:
    """The tracker records the SHUTDOWN's frame for a half-closed connection too, but only a
    connection that is over (graceful, reset, refused) gets a ``close:`` note."""
    got = comments(tmp_path, [*OPEN, c2s(Op.SHUTDOWN, flags=SEND)])
    assert got[2] == "vsockmon stream 0 c2s (client) half-closed, in flight 0/262144"


def test_longest_stall_noted_apart_from_the_first(tmp_path: Path) -> None:
    """The server advertises 4 bytes; each 4-byte RW of the client exhausts them until a
    CREDIT_UPDATE consumes them. The first stall lasts one step (0.6 s), the second two (the
    client's CREDIT_REQUEST in between does not end it): 1200 ms to the µs, noted on its
    first frame."""
    frames = [
        c2s(Op.REQUEST), s2c(Op.RESPONSE, buf_alloc=4),
        c2s(Op.RW, payload=b"abcd"),                    # 3: stall 1 starts
        s2c(Op.CREDIT_UPDATE, buf_alloc=4, fwd_cnt=4),  # 4: ends (600 ms)
        c2s(Op.RW, payload=b"efgh"),                    # 5: stall 2 starts
        c2s(Op.CREDIT_REQUEST),                         # 6
        s2c(Op.CREDIT_UPDATE, buf_alloc=4, fwd_cnt=8),  # 7: ends (1200 ms)
    ]
    got = comments(tmp_path, frames, step_ns=600_000_000)
    assert got[2].endswith("; zero credit (c2s): first of 2 stalls")
    assert got[4].endswith("; zero credit (c2s): longest stall, 1200.000 ms")


def test_packet_batch_without_payload_columns_by_default(tmp_path: Path) -> None:
    """``packet_batch`` as the fleet calls it (no ``payload``): the packets columns only,
    even for an RW whose payload a dissector would name."""
    from vsockmon.analysis.pipeline import tracked
    from vsockmon.conntrack.tracker import ConnTracker
    from vsockmon.export.tables import PACKET_COLUMNS, packet_batch
    from vsockmon.wire.pcapio import open_capture

    src = write_pcap(tmp_path / "p.pcap", [*OPEN, app(Op.RW, payload=b"{}")])
    with open_capture(str(src)) as r:
        ((_, fb, tags),) = list(tracked(r, ConnTracker()))
        batch = packet_batch(fb, tags, "p.pcap")
    assert batch.schema.names == [c.name for c in PACKET_COLUMNS]
    assert batch.column("capture").to_pylist() == ["p.pcap"] * 3


def test_payload_summary_in_comments_only_for_rw_and_when_asked(tmp_path: Path) -> None:
    """With payload summaries on, an RW's payload is named by its dissector ("{}" is JSON);
    bytes behind a CREDIT_UPDATE are not a payload; with them off, no summary at all."""
    src = write_pcap(tmp_path / "in.pcap", [app(Op.RW, payload=b"{}"),
                                            frame(Op.CREDIT_UPDATE, b"hello\n", src=APP, dst=C)])
    for payload, want in ((True, "; json: {}"), (False, "")):
        out = tmp_path / f"{payload}.pcapng"
        export_pcapng(str(src), str(out), payload=payload)
        got = pcapng_comments(out)
        assert got[0] == "vsockmon stream 0 c2s (client) established" + want
        # the client's RW advertised its buf_alloc (262144): the server's credit is known
        assert got[1] == "vsockmon stream 0 s2c (server) established, in flight 0/262144"


def test_annotator_names_payloads_unless_told_not_to(tmp_path: Path) -> None:
    """The library's ``Annotator``: called without ``payload``, an RW's comment names its
    payload ("{}" is JSON to the dissector); ``payload=False`` leaves the summary out."""
    from vsockmon.analysis.pipeline import analyse, tracked
    from vsockmon.conntrack.tracker import ConnTracker
    from vsockmon.export import Annotator

    src = write_pcap(tmp_path / "p.pcap", [app(Op.RW, payload=b"{}")])
    with open_capture(str(src)) as r:
        annotator = Annotator(analyse(r).table)
    with open_capture(str(src)) as r:
        ((_, fb, tags),) = list(tracked(r, ConnTracker()))
    plain = "vsockmon stream 0 c2s (client) established"
    assert annotator.comments(fb, tags) == [plain + "; json: {}"]
    assert annotator.comments(fb, tags, payload=False) == [plain]


def _block(btype: int, body: bytes) -> bytes:
    """A little-endian pcapng block (pcapng spec: type, length, body, length again)."""
    body += b"\0" * (-len(body) % 4)
    return struct.pack("<II", btype, len(body) + 12) + body + struct.pack("<I", len(body) + 12)


def _epb(iface: int, ts_ns: int, data: bytes, orig_len: int) -> bytes:
    return _block(6, struct.pack("<IIIII", iface, ts_ns >> 32, ts_ns & 0xFFFFFFFF, len(data),
                                 orig_len) + data)


def test_pcapng_copy_leaves_out_other_link_types_and_keeps_lengths(tmp_path: Path) -> None:
    """A pcapng with a vsock interface (271) and an Ethernet one (1): the two Ethernet
    packets are left out and counted as skipped, the vsock packets before and after them
    are copied, the second with the on-wire length its record gives (more than captured)."""
    ns = (9).to_bytes(1, "little") + b"\0\0\0"  # if_tsresol 9: nanoseconds
    idb = [_block(1, struct.pack("<HHI", link, 0, 65535) + struct.pack("<HH", 9, 1) + ns
                  + b"\0" * 4) for link in (271, 1)]
    request, response = c2s(Op.REQUEST), s2c(Op.RESPONSE)
    src = tmp_path / "mixed.pcapng"
    src.write_bytes(_block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)) + b"".join(idb)
                    + _epb(0, 1000, request, len(request)) + _epb(1, 2000, b"\xff" * 60, 60)
                    + _epb(1, 3000, b"\xee" * 60, 60) + _epb(0, 4000, response, 500))
    out = tmp_path / "out.pcapng"
    res = export_pcapng(str(src), str(out))
    assert (res.packets, res.skipped, res.connections) == (2, 2, 1)
    with open_capture(str(out)) as r:
        got = [(x.ts_ns, bytes(x.data), x.orig_len) for x in r.records()]
    assert got == [(1000, request, len(request)), (4000, response, 500)]
    assert pcapng_comments(out)[1].startswith("vsockmon stream 0 s2c (server) established")


def test_pcapng_export_reports_source_output_batches_and_a_damaged_end(tmp_path: Path) -> None:
    """What ``export_pcapng`` reports: its source and output, the packets of each batch in
    both passes (one batch of 3 here: [3, 3]), and why a capture cut inside its last record
    stopped; the packets before the cut are still written."""
    src = write_pcap(tmp_path / "in.pcap", [*OPEN, s2c(Op.RST)])
    out = tmp_path / "out.pcapng"
    heard: list[int] = []
    res = export_pcapng(str(src), str(out), on_batch=heard.append)
    assert (res.source, res.outputs, res.packets, res.stopped) == (str(src), [str(out)], 3, None)
    assert heard == [3, 3]
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(src.read_bytes()[:-10])  # the third record loses 10 bytes
    res = export_pcapng(str(cut), str(tmp_path / "cut.pcapng"))
    assert res.packets == 2
    assert res.stopped is not None and res.stopped.startswith("file ends inside a packet")


def test_pcapng_export_refuses_an_existing_output_before_reading(tmp_path: Path) -> None:
    """Without ``force`` an existing output is refused before the capture is even opened
    (a missing capture then still gets the "exists" message), and is left as it was; an
    output whose directory does not exist is an ExportError naming it."""
    out = tmp_path / "out.pcapng"
    out.write_bytes(b"keep")
    with pytest.raises(ExportError) as e:
        export_pcapng(str(tmp_path / "missing.pcap"), str(out))
    assert str(e.value) == f"{out}: exists; use --force to overwrite"
    src = write_pcap(tmp_path / "in.pcap", OPEN)
    with pytest.raises(ExportError):
        export_pcapng(str(src), str(out))
    assert out.read_bytes() == b"keep"
    nowhere = tmp_path / "no-such-dir" / "out.pcapng"
    with pytest.raises(ExportError) as e:
        export_pcapng(str(src), str(nowhere))
    assert str(e.value).startswith(f"{nowhere}: cannot write: ")


def test_diagnose_in_comments_measures_a_stall_to_the_recorded_stop(tmp_path: Path) -> None:
    """The server advertises 4 bytes and the client's 4-byte RW fills them (frame 3); the
    file's statistics block says the capture stopped 2 s later. The window stayed full for
    2 s, over the 1 s ``--stall`` default, with nothing consumed: window-full/not-reading
    (docs/diagnose.md), noted on frame 3. Measured only to the last packet it would be 0 s."""
    from vsockmon.wire.pcapio import PcapngWriter

    src = tmp_path / "stall.pcapng"
    with open(src, "wb") as fp:
        w = PcapngWriter(fp)
        for i, f in enumerate([c2s(Op.REQUEST), s2c(Op.RESPONSE, buf_alloc=4),
                               c2s(Op.RW, payload=b"abcd")]):
            w.write(T0 + i * 1000, f)
        fp.write(PcapngWriter.statistics_block(T0 + 2000 + 2_000_000_000))
    out = tmp_path / "out.pcapng"
    export_pcapng(str(src), str(out), diagnose=True)
    got = pcapng_comments(out)
    assert "; diagnose: WARNING window-full/not-reading: " in got[2]
    assert "diagnose" not in got[0] + got[1]


def _caps(tmp_path: Path) -> Path:
    caps = tmp_path / "caps"
    caps.mkdir()
    for name in ("a.pcap", "b.pcap"):
        write_pcap(caps / name, OPEN)
    return caps


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """``export_tables`` replaced in this process only: a capture exported here comes back
    with the error "here"; one exported by a freshly started worker comes back real."""
    import vsockmon.export.run as run

    monkeypatch.setattr(run, "export_tables",
                        lambda source, *_: run.ExportResult(source, error="here"))


@pytest.mark.usefixtures("stand_in")
@pytest.mark.parametrize(("jobs", "cpus", "here"), [
    (1, 4, True),      # one job: in the caller's process, no worker at all
    (2, 4, False),     # two jobs: workers started by a forkserver, not forked from here
    (None, 4, False),  # no job count: one per CPU, at most one per capture (2 here)
    (None, None, True),  # the CPU count unknown: one job
])
def test_jobs_in_this_process_or_in_fresh_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  jobs: int | None, cpus: int | None,
                                                  here: bool) -> None:
    """Workers come from a forkserver because a fork of a process whose pyarrow or numpy
    threads run can crash in the child; so a worker does not share the caller's state (the
    stand-in above), and a single job needs no worker."""
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    results = export_many(_caps(tmp_path), tmp_path / "o", "json", jobs=jobs)
    want = [("here", 0)] * 2 if here else [(None, 2)] * 2
    assert [(r.error, r.packets) for r in results] == want


def test_a_table_that_cannot_be_put_in_place_fails_with_its_own_error(tmp_path: Path) -> None:
    """With ``force``, a directory where connections.jsonl should go: renaming the finished
    table onto it fails (EISDIR), and that is the error raised, not one from cleaning up the
    packets table already in place; no ``.part`` file is left behind."""
    src = write_pcap(tmp_path / "in.pcap", OPEN)
    out = tmp_path / "o"
    (out / "connections.jsonl").mkdir(parents=True)
    with pytest.raises(IsADirectoryError):
        export_tables(str(src), out, "json", force=True)
    assert sorted(p.name for p in out.iterdir()) == ["connections.jsonl", "packets.jsonl"]


@pytest.mark.parametrize(("jobs", "want"), [(2, 2), (None, 3), (9, 3)])
def test_jobs_cap_the_worker_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       jobs: int | None, want: int) -> None:
    """On a machine of 8 CPUs with 3 captures: ``jobs=2`` runs at most 2 workers (the user
    caps the CPU taken), no count one per CPU but never more than the captures (3), and
    more jobs than captures no more than the captures."""
    import os
    from concurrent.futures import ProcessPoolExecutor

    import vsockmon.export.run as run

    sizes: list[int] = []

    class Pool(ProcessPoolExecutor):
        def __init__(self, *args: object, **kw: object) -> None:
            super().__init__(*args, **kw)  # type: ignore[call-overload]
            sizes.append(self._max_workers)  # type: ignore[attr-defined]

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(run, "ProcessPoolExecutor", Pool)
    caps = _caps(tmp_path)
    write_pcap(caps / "c.pcap", OPEN)
    results = export_many(caps, tmp_path / "o", "json", jobs=jobs)
    assert sizes == [want]
    assert [(Path(r.source).name, r.packets) for r in results] == [
        ("a.pcap", 2), ("b.pcap", 2), ("c.pcap", 2)]
