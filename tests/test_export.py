"""vsockmon export: annotated pcapng (checked through tshark's frame.comment) and tables
(Parquet through DuckDB, CSV, JSON Lines), streamed, for one capture or a directory."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import frame, pcapng_comments, write_pcap

import vsockmon
from vsockmon.cli import main
from vsockmon.export import (
    CONNECTION_COLUMNS,
    PACKET_COLUMNS,
    PAYLOAD_COLUMNS,
    ExportError,
    export_many,
    export_pcapng,
    export_tables,
)
from vsockmon.payload import ttrpc
from vsockmon.wire.pcapio import open_capture
from vsockmon.wire.protocol import Op, SockType

ROOT = Path(__file__).resolve().parent.parent
C, S = (3, 50000), (2, 1024)
REPLY = ttrpc.encode_response(1, b"\x08\x01")


def scenario(path: Path) -> Path:
    """A refused dial, a ttrpc exchange closed gracefully, a tap-length frame."""
    return write_pcap(path, [
        frame(Op.REQUEST, src=C, dst=(2, 9999)),                                  # 1
        frame(Op.RST, src=(2, 9999), dst=C, buf_alloc=0),                         # 2
        frame(Op.REQUEST, src=C, dst=S),                                          # 3
        frame(Op.RESPONSE, src=S, dst=C),                                         # 4
        frame(Op.RW, ttrpc.encode_request(1, "grpc.AgentService", "Check"), src=C, dst=S),
        frame(Op.RW, REPLY + b"surplus", src=S, dst=C, length=len(REPLY)),        # 6
        frame(Op.SHUTDOWN, src=C, dst=S, flags=3),                                # 7
        frame(Op.RST, src=S, dst=C),                                              # 8
        frame(Op.RW, b"READY=1\n", src=(1, 7), dst=(1, 8), type_=SockType.SEQPACKET),
    ])


def comments(pcapng: Path) -> list[str]:
    out = subprocess.run(["tshark", "-r", str(pcapng), "-T", "fields", "-e", "frame.comment"],
                         capture_output=True, text=True, check=True).stdout
    return out.splitlines()


@pytest.mark.tshark
def test_pcapng_comments_shown_by_wireshark(tmp_path: Path) -> None:
    src = scenario(tmp_path / "in.pcap")
    out = tmp_path / "out.pcapng"
    result = export_pcapng(str(src), str(out), extra={5: ["diagnose: a finding"]})
    assert (result.packets, result.connections, result.skipped) == (9, 3, 0)
    got = comments(out)
    # the in-process reader the edge-case tests use reads what Wireshark shows
    assert pcapng_comments(out) == got
    assert got[0] == "vsockmon stream 0 c2s (client) requested"
    assert got[1] == ("vsockmon stream 0 s2c (server) refused, in flight 0/262144; "
                      "close: refused by server; handshake 0.001 ms")
    assert got[4] == ("vsockmon stream 1 c2s (client) established, in flight 38/262144; "
                      "ttrpc: request #1 grpc.AgentService/Check; diagnose: a finding")
    assert got[5] == ("vsockmon stream 1 s2c (server) established, in flight 14/262144; "
                      "anomalies: payload-len-mismatch; ttrpc: response #1 OK; "
                      "violation tap-length (s2c): first of 1")
    assert got[6] == "vsockmon stream 1 c2s (client) closing, in flight 38/262144"
    assert got[7] == ("vsockmon stream 1 s2c (server) graceful, in flight 14/262144; "
                      "close: graceful by server")
    assert got[8] == "vsockmon stream 2 s2c (server) established; sd_notify: READY=1"
    # every packet is copied unchanged
    with open_capture(str(src)) as a, open_capture(str(out)) as b:
        assert [tuple(r) for r in a.records()] == [tuple(r) for r in b.records()]
    # without payload dissection
    export_pcapng(str(src), str(out), force=True, payload=False)
    assert "ttrpc" not in "".join(comments(out))


def test_pcapng_never_overwrites_and_reads_stdin(tmp_path: Path) -> None:
    src = scenario(tmp_path / "in.pcap")
    out = tmp_path / "out.pcapng"
    out.write_bytes(b"keep")
    runner = CliRunner()
    res = runner.invoke(main, ["export", str(src), "-o", str(out)])
    assert res.exit_code == 1 and "exists; use --force" in res.output
    assert out.read_bytes() == b"keep"
    res = runner.invoke(main, ["export", "-", "-o", str(out), "--force"],
                        input=src.read_bytes())
    assert res.exit_code == 0, res.output
    with open_capture(str(out)) as r:
        assert len(list(r.records())) == 9


def test_pcapng_bad_input_is_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["export", str(tmp_path / "nope.pcap"), "-o",
                                    str(tmp_path / "o.pcapng")])
    assert res.exit_code == 1 and "no such file" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "o.pcapng").exists()


def test_tables_in_duckdb_equal_decoder_and_tracker(tmp_path: Path) -> None:
    src = scenario(tmp_path / "in.pcap")
    res = CliRunner().invoke(main, ["export", str(src), "--format", "parquet", "-o",
                                    str(tmp_path / "t"), "--payload", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)[0]["packets"] == 9
    packets = str(tmp_path / "t" / "packets.parquet")
    conns = str(tmp_path / "t" / "connections.parquet")
    db = duckdb.connect()
    rows = db.execute(f"select frame, stream, dir, op_name, type_name, flag_names, len, "
                      f"payload_len, anomaly_names, payload_proto from '{packets}' "
                      f"order by frame").fetchall()
    assert rows[0] == (1, 0, "c2s", "REQUEST", "STREAM", "", 0, 0, "", None)
    assert rows[4][1:4] == (1, "c2s", "RW") and rows[4][9] == "ttrpc"
    assert rows[5][6:10] == (14, 21, "payload-len-mismatch", "ttrpc")
    assert rows[8][9] == "sd_notify"
    assert rows[6][5] == "RCV|SEND" and rows[8][4] == "SEQPACKET"
    fb, _ = next(vsockmon.open(src).frames())
    assert [row[6] for row in rows] == fb.virtio["len"].tolist()
    got = db.execute(f"select stream, close, client, server, bytes from '{conns}' "
                     f"order by stream").fetchall()
    table = vsockmon.open(src).analysis().table
    assert got == [(c["stream"], c["close"], c["client"], c["server"], c["bytes"])
                   for c in table.records()]
    assert db.execute(f"select count(*) from '{packets}' p join '{conns}' c using (stream) "
                      f"where c.close = 'refused'").fetchone() == (2,)


def test_csv_and_json_tables_match_parquet(tmp_path: Path) -> None:
    src = scenario(tmp_path / "in.pcap")
    for fmt in ("parquet", "csv", "json"):
        export_tables(str(src), tmp_path / fmt, fmt)
    ref = pq.read_table(tmp_path / "parquet" / "packets.parquet")
    csv = pacsv.read_csv(tmp_path / "csv" / "packets.csv")
    lines = (tmp_path / "json" / "packets.jsonl").read_text().splitlines()
    objs = [json.loads(line) for line in lines]
    for name in ("frame", "stream", "in_flight", "buf_alloc"):
        assert csv.column(name).to_pylist() == ref.column(name).to_pylist()
        assert [o[name] for o in objs] == ref.column(name).to_pylist()
    assert [o["op_name"] for o in objs] == ref.column("op_name").to_pylist()
    assert objs[0]["time"].startswith("2023-11-14 22:13:20")
    conns = [json.loads(line) for line in
             (tmp_path / "json" / "connections.jsonl").read_text().splitlines()]
    assert [c["close"] for c in conns] == ["refused", "graceful", "open"]


def test_refuses_to_overwrite_tables(tmp_path: Path) -> None:
    src = scenario(tmp_path / "in.pcap")
    export_tables(str(src), tmp_path / "t", "csv")
    before = (tmp_path / "t" / "packets.csv").read_bytes()
    with pytest.raises(ExportError, match="exists; use --force"):
        export_tables(str(src), tmp_path / "t", "csv")
    export_tables(str(src), tmp_path / "t", "csv", force=True)
    assert (tmp_path / "t" / "packets.csv").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["connections.csv",
                                                                  "packets.csv"]


def test_memory_stays_flat_while_streaming(tmp_path: Path) -> None:
    """Peak Arrow memory does not grow with the capture: batches are written and dropped."""
    def peak(n: int) -> tuple[int, int]:
        frames = [frame(Op.RW, b"p" * 64, src=(3, 1000 + i % 50), dst=S) for i in range(n)]
        src = write_pcap(tmp_path / f"big{n}.pcap", frames)
        top = [0]
        res = export_tables(str(src), tmp_path / f"o{n}", "parquet",
                            on_batch=lambda _n: top.__setitem__(
                                0, max(top[0], pa.total_allocated_bytes())))
        assert res.packets == n
        groups = pq.ParquetFile(tmp_path / f"o{n}" / "packets.parquet").num_row_groups
        return top[0], groups

    small, small_groups = peak(30_000)
    large, large_groups = peak(120_000)
    assert large_groups >= 4 and large_groups > small_groups  # written batch by batch
    assert large < 1.5 * small + (1 << 20)


def test_directory_in_parallel(tmp_path: Path) -> None:
    captures = tmp_path / "caps"
    (captures / "vm1").mkdir(parents=True)
    scenario(captures / "a.pcap")
    scenario(captures / "vm1" / "b.pcap")
    (captures / "notes.txt").write_text("not a capture")
    (captures / "bad.pcap").write_bytes(b"garbage!" * 10)
    done: list[str] = []
    results = export_many(captures, tmp_path / "out", "parquet", jobs=2,
                          on_done=lambda r: done.append(r.source))
    assert len(done) == 3
    by_name = {Path(r.source).name: r for r in results}
    assert by_name["bad.pcap"].error and "bad.pcap" in by_name["bad.pcap"].error
    assert by_name["a.pcap"].packets == by_name["b.pcap"].packets == 9
    got = duckdb.connect().execute(f"select capture, count(*) from "
                                   f"read_parquet('{tmp_path}/out/**/packets.parquet') "
                                   f"group by 1 order by 1").fetchall()
    assert got == [("a.pcap", 9), ("vm1/b.pcap", 9)]
    res = CliRunner().invoke(main, ["export", str(captures), "--format", "csv", "-o",
                                    str(tmp_path / "csv"), "-j", "2"])
    assert res.exit_code == 1 and "1 of 3 captures failed" in res.output
    assert (tmp_path / "csv" / "vm1" / "b.pcap" / "connections.csv").exists()


def test_cli_usage_errors(tmp_path: Path) -> None:
    src = scenario(tmp_path / "in.pcap")
    runner = CliRunner()
    res = runner.invoke(main, ["export", str(src), "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "choose --format" in res.output
    res = runner.invoke(main, ["export", str(tmp_path), "-o", str(tmp_path / "x.pcapng")])
    assert res.exit_code == 2 and "one capture" in res.output


def test_schema_is_documented() -> None:
    doc = (ROOT / "docs" / "export.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_0-9]+)` \|", doc, flags=re.M))
    for col in (*PACKET_COLUMNS, *PAYLOAD_COLUMNS, *CONNECTION_COLUMNS):
        assert col.name in documented, col.name
