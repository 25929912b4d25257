"""The Wireshark Lua plugin, run in the real tshark: stream index, names, experts, payloads.

Every capture under fixtures/ is checked frame by frame against an independent reference
implementation of the stream-numbering rule written here, and against the Python
connection tracker; the synthetic captures below pin the expert items and the ttrpc,
JSON, HTTP and sd_notify sub-dissection.
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest
from helpers import frame, write_pcap

import vsockmon
from vsockmon.conntrack.tracker import Tags
from vsockmon.decode.frames import FrameBatch, frames
from vsockmon.payload import ttrpc
from vsockmon.wire.pcapio import CaptureError, open_capture
from vsockmon.wire.protocol import Op, SockType

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "dissectors" / "vsockmon.lua"
CAPTURES = sorted(
    p for pattern in ("*.pcap", "*.pcapng", "*.pcap.gz") for p in (ROOT / "fixtures").rglob(pattern)
)
pytestmark = pytest.mark.tshark

C, S = (3, 50000), (2, 1024)


def tshark(path: Path, *args: str) -> str:
    """tshark with the plugin; a Lua load or runtime error fails the test."""
    proc = subprocess.run(
        ["tshark", "-n", "-X", f"lua_script:{PLUGIN}", "-r", str(path), *args],
        capture_output=True, text=True, check=False,
    )
    assert "Lua" not in proc.stderr, proc.stderr
    cut_short = "cut short in the middle of a packet" in proc.stderr  # truncated fixture
    assert proc.returncode == 0 or cut_short, proc.stderr
    assert "Lua Error" not in proc.stdout
    return proc.stdout


def fields(path: Path, *names: str, extra: tuple[str, ...] = ()) -> list[list[str]]:
    out = tshark(path, *extra, "-T", "fields", "-E", "occurrence=a", "-E", "aggregator=|",
                 *(a for n in names for a in ("-e", n)))
    return [line.split("\t") for line in out.splitlines()]


def column(path: Path, name: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [row[0] for row in fields(path, name, extra=extra)]


def reference_streams(path: Path) -> list[int | None]:
    """The stream-numbering rule, written independently of the plugin and the tracker."""
    current: dict[tuple, int] = {}
    out: list[int | None] = []
    count = 0
    with open_capture(str(path)) as reader:
        for f in frames(reader.batches()):
            if not f.has_virtio:
                out.append(None)
                continue
            v = f.virtio
            ends = frozenset({(v["src_cid"], v["src_port"]), (v["dst_cid"], v["dst_port"])})
            key = (v["type"], ends)
            if v["op"] == Op.REQUEST or key not in current:
                current[key] = count
                count += 1
            out.append(current[key])
    return out


def tracker_tags(path: Path) -> list[tuple[int | None, str, str]]:
    """Per frame: the Python tracker's stream, direction and sender's bytes in flight."""
    out: list[tuple[int | None, str, str]] = []

    def visit(_fb: FrameBatch, tags: Tags) -> None:
        for stream, sender, flight in zip(tags.stream.tolist(), tags.sender.tolist(),
                                          tags.in_flight.tolist(), strict=True):
            if stream < 0:
                out.append((None, "", ""))
                continue
            mine = flight[sender]
            out.append((stream, ("c2s", "s2c")[sender], str(mine) if mine >= 0 else ""))

    vsockmon.open(path).scan(visit)
    return out


def vsock_captures() -> list[Path]:
    ok = []
    for p in CAPTURES:
        try:
            with open_capture(str(p)):
                ok.append(p)
        except CaptureError:
            pass
    return ok


def test_plugin_registers_its_fields() -> None:
    out = subprocess.run(["tshark", "-G", "fields", "-X", f"lua_script:{PLUGIN}"],
                         capture_output=True, text=True, check=True).stdout
    names = {line.split("\t")[2] for line in out.splitlines() if line.startswith("F\t")}
    for name in ("vsockmon.stream", "vsockmon.type_name", "vsockmon.op_name",
                 "vsockmon.flags.shut_rcv", "vsockmon.flags.shut_send", "vsockmon.flags.seq_eom",
                 "vsockmon.flags.seq_eor", "vsockmon.client", "vsockmon.server", "vsockmon.dir",
                 "ttrpc.method", "sd_notify.key"):
        assert name in names


def test_fixtures_are_covered() -> None:
    assert len(vsock_captures()) >= 4


@pytest.mark.parametrize("path", vsock_captures(), ids=lambda p: str(p.relative_to(ROOT)))
def test_stream_index_equals_reference_and_tracker(path: Path) -> None:
    rows = fields(path, "vsockmon.stream", "vsockmon.dir", "vsockmon.in_flight")
    ours = [int(r[0]) if r[0] else None for r in rows]
    assert ours == reference_streams(path)
    tracked = tracker_tags(path)
    assert ours == [t[0] for t in tracked]
    assert [r[1] for r in rows] == [t[1] for t in tracked]
    assert [r[2] for r in rows] == [t[2] for t in tracked]


def test_stream_numbering_rule(tmp_path: Path) -> None:
    other = (3, 50001)
    pcap = write_pcap(tmp_path / "s.pcap", [
        frame(Op.RW, b"x", src=S, dst=C),                        # 0: mid-connection start
        frame(Op.REQUEST, src=other, dst=S),                     # 1
        frame(Op.CREDIT_UPDATE, src=C, dst=S),                   # 0 (reverse direction)
        frame(Op.REQUEST, src=C, dst=S, type_=SockType.SEQPACKET),  # 2: other type
        frame(Op.RESPONSE, src=S, dst=other),                    # 1
        frame(Op.REQUEST, src=C, dst=S),                         # 3: REQUEST restarts key
        frame(Op.RST, src=S, dst=C),                             # 3
        frame(Op.RW, b"y", src=(1, 5), dst=(1, 6)),              # 4
    ])
    assert [int(s) for s in column(pcap, "vsockmon.stream")] == [0, 1, 0, 2, 1, 3, 3, 4]
    assert reference_streams(pcap) == [0, 1, 0, 2, 1, 3, 3, 4]
    rows = fields(pcap, "vsockmon.client", "vsockmon.server", "vsockmon.dir")
    assert rows[0] == ["3:50000", "2:1024", "s2c"]  # lower port taken for the server
    assert rows[7] == ["1:6", "1:5", "s2c"]


def test_names_wireshark_gets_wrong(tmp_path: Path) -> None:
    pcap = write_pcap(tmp_path / "n.pcap", [
        frame(Op.REQUEST, src=C, dst=S, type_=SockType.SEQPACKET),
        frame(Op.CREDIT_REQUEST, src=C, dst=S, type_=SockType.SEQPACKET),
        frame(Op.RW, b"m", src=C, dst=S, type_=SockType.SEQPACKET, flags=3),
        frame(Op.SHUTDOWN, src=C, dst=S, type_=SockType.SEQPACKET, flags=2),
    ])
    rows = fields(pcap, "vsockmon.type_name", "vsockmon.op_name", "vsockmon.flags.seq_eom",
                  "vsockmon.flags.seq_eor", "vsockmon.flags.shut_rcv", "vsockmon.flags.shut_send")
    assert rows == [
        ["SEQPACKET", "REQUEST", "", "", "", ""],
        ["SEQPACKET", "CREDIT_REQUEST", "", "", "", ""],
        ["SEQPACKET", "RW", "1", "1", "", ""],
        ["SEQPACKET", "SHUTDOWN", "", "", "0", "1"],
    ]
    # the same frames as the built-in dissector alone names them
    builtin = subprocess.run(["tshark", "-n", "-r", str(pcap)], capture_output=True, text=True,
                             check=True).stdout
    assert "Unknown (2)" in builtin and "Credit response" in builtin
    # display filters work on our fields
    assert column(pcap, "frame.number", extra=("-Y", "vsockmon.flags.seq_eor == 1")) == ["3"]
    info = tshark(pcap)
    assert "SEQPACKET CREDIT_REQUEST" in info and "SEQPACKET RW EOM|EOR len=1" in info
    plain = tshark(pcap, "-o", "vsockmon.rewrite_info:FALSE")
    assert "Credit response" in plain and "CREDIT_REQUEST" not in plain


def experts(pcap: Path) -> list[str]:
    return column(pcap, "_ws.expert.message")


def test_expert_refused_reset_and_close(tmp_path: Path) -> None:
    c2 = (3, 50002)
    pcap = write_pcap(tmp_path / "e.pcap", [
        frame(Op.REQUEST, src=C, dst=(2, 9999)),
        frame(Op.RST, src=(2, 9999), dst=C, buf_alloc=0),          # refused
        frame(Op.REQUEST, src=c2, dst=S),
        frame(Op.RESPONSE, src=S, dst=c2),
        frame(Op.RW, b"abc", src=c2, dst=S),
        frame(Op.RST, src=c2, dst=S),                               # reset, 3 bytes unread
        frame(Op.REQUEST, src=C, dst=S),
        frame(Op.RESPONSE, src=S, dst=C),
        frame(Op.SHUTDOWN, src=C, dst=S, flags=3),
        frame(Op.RST, src=S, dst=C),                                # clean close
        frame(Op.RST, src=S, dst=C),                                # the second RST: silent
        frame(Op.REQUEST, src=C, dst=S),
        frame(Op.RESPONSE, src=S, dst=C),
        frame(Op.REQUEST, src=C, dst=S),                            # already connected
    ])
    got = experts(pcap)
    assert got[1] == ("Connection refused: REQUEST in frame 1 answered by RST "
                      "(nothing listens on 2:9999)")
    assert got[5] == "Connection reset without SHUTDOWN with 3 unacknowledged bytes"
    assert got[9] == "Connection closed by RST after SHUTDOWN"
    assert got[13] == "REQUEST while stream 3 on this address pair is still ESTABLISHED"
    assert [i for i, e in enumerate(got) if e] == [1, 5, 9, 13]
    states = column(pcap, "vsockmon.state")
    assert states[:2] == ["REQUESTED", "REFUSED"] and states[9:11] == ["CLOSED", "CLOSED"]
    rows = fields(pcap, "vsockmon.request_in", extra=("-Y", "frame.number in {2,4}"))
    assert rows == [["1"], ["3"]]


def test_expert_credit_and_violations(tmp_path: Path) -> None:
    pcap = write_pcap(tmp_path / "c.pcap", [
        frame(Op.REQUEST, src=C, dst=S, buf_alloc=4096),
        frame(Op.RESPONSE, src=S, dst=C, buf_alloc=4096),
        frame(Op.RW, b"a" * 4000, src=C, dst=S),
        frame(Op.RW, b"b" * 96, src=C, dst=S),                       # fills the window
        frame(Op.CREDIT_UPDATE, src=S, dst=C, buf_alloc=4096, fwd_cnt=2000),
        frame(Op.RW, b"c" * 3000, src=C, dst=S),                     # 1000 beyond credit
        frame(Op.SHUTDOWN, src=C, dst=S, flags=2),
        frame(Op.RW, b"d", src=C, dst=S),                            # after SHUTDOWN SEND
        frame(Op.RW, b"e" * 10, src=S, dst=C, length=4),             # tap-length bug
    ])
    got = experts(pcap)
    assert got[3] == "Zero credit (c2s): 4096 bytes in flight fill the peer's buf_alloc 4096"
    assert got[5] == ("Data beyond credit: 3000 bytes sent, the peer had 2000 of its "
                      "buf_alloc 4096 free|Zero credit (c2s): 5096 bytes in flight fill the "
                      "peer's buf_alloc 4096")
    assert got[7].startswith("Data after SHUTDOWN SEND: 1 bytes")
    assert "|Data beyond credit: 1 bytes sent, the peer had 0 of" in got[7]
    assert got[8] == ("Captured payload 10 bytes, header len 4: trust len "
                      "(kernel tap-length bug)")
    assert [i for i, e in enumerate(got) if e] == [3, 5, 7, 8]
    rows = fields(pcap, "vsockmon.in_flight", "vsockmon.credit", "vsockmon.seq",
                  extra=("-Y", "frame.number in {3,4,6}"))
    assert rows == [["4000", "96", "0"], ["4096", "0", "4000"], ["5096", "0", "4096"]]
    stalled = column(pcap, "frame.number", extra=("-Y", "vsockmon.credit == 0"))
    assert stalled == ["4", "6", "7", "8"]


def test_ttrpc_reassembly_and_method_matching(tmp_path: Path) -> None:
    big = ttrpc.encode_request(1, "grpc.AgentService", "CopyFile", b"z" * 9000)
    small = ttrpc.encode_request(3, "grpc.AgentService", "StatsContainer")
    pcap = write_pcap(tmp_path / "t.pcap", [
        frame(Op.REQUEST, src=C, dst=S),
        frame(Op.RESPONSE, src=S, dst=C),
        frame(Op.RW, big[:4000], src=C, dst=S),
        frame(Op.RW, big[4000:8000], src=C, dst=S),
        frame(Op.RW, big[8000:] + small, src=C, dst=S),
        frame(Op.RW, ttrpc.encode_response(3, b"\x08\x01")
              + ttrpc.encode_response(1, code=5, message="no such file"), src=S, dst=C),
    ])
    # two passes (as Wireshark's GUI does) so earlier segments learn where they end up
    rows = fields(pcap, "ttrpc.method", "ttrpc.stream_id", "ttrpc.status.code",
                  "vsockmon.reassembled_in", "ttrpc.request_in", "vsockmon.payload_proto",
                  extra=("-2",))
    assert rows[2] == ["", "", "", "5", "", "ttrpc"]
    assert rows[3] == ["", "", "", "5", "", "ttrpc"]
    assert rows[4] == ["grpc.AgentService/StatsContainer|grpc.AgentService/CopyFile", "3|1",
                       "", "", "", "ttrpc"]
    assert rows[5] == ["grpc.AgentService/StatsContainer|grpc.AgentService/CopyFile", "3|1",
                       "0|5", "", "5|5", "ttrpc"]
    assert column(pcap, "vsockmon.segments")[4] == "3,4,5"
    info = tshark(pcap).splitlines()
    assert info[4].endswith("| request #3 grpc.AgentService/StatsContainer; "
                            "request #1 grpc.AgentService/CopyFile")
    assert info[5].endswith("| response #3 grpc.AgentService/StatsContainer OK; "
                            "response #1 grpc.AgentService/CopyFile NOT_FOUND: no such file")
    assert column(pcap, "frame.number",
                  extra=("-Y", 'ttrpc.method == "grpc.AgentService/CopyFile"')) == ["5", "6"]


def test_ttrpc_heuristic_on_another_port_and_framing_loss(tmp_path: Path) -> None:
    other = (2, 7000)
    pcap = write_pcap(tmp_path / "h.pcap", [
        frame(Op.RW, ttrpc.encode_request(1, "svc", "Ping"), src=C, dst=other),
        frame(Op.RW, ttrpc.encode_request(1, "a", "B"), src=C, dst=S),
        frame(Op.RW, b"\xff" * 20, src=C, dst=S),
    ])
    rows = fields(pcap, "ttrpc.method", "vsockmon.payload_proto", "_ws.expert.message")
    assert rows[0] == ["svc/Ping", "ttrpc", ""]
    assert rows[1] == ["a/B", "ttrpc", ""]
    assert rows[2] == ["", "", "ttrpc framing lost: no valid header where one was due"]


def test_json_http_sd_notify_text(tmp_path: Path) -> None:
    a, b = (1, 40000), (1, 7000)
    pcap = write_pcap(tmp_path / "p.pcap", [
        frame(Op.RW, b'{"execute": "guest-ping"}\n', src=a, dst=b),
        frame(Op.RW, b"GET /status HTTP/1.1\r\nHost: vm\r\n\r\n", src=a, dst=b),
        frame(Op.RW, b"READY=1\nSTATUS=Serving\n", src=a, dst=b),
        frame(Op.RW, b"hello world\n", src=a, dst=b),
        frame(Op.RW, bytes(range(32)), src=a, dst=b),
    ])
    rows = fields(pcap, "vsockmon.payload_proto", "json.member_with_value",
                  "http.request.uri", "sd_notify.key", "sd_notify.value")
    assert rows == [
        ["json", "execute:guest-ping", "", "", ""],
        ["http", "", "/status", "", ""],
        ["sd_notify", "", "", "READY|STATUS", "1|Serving"],
        ["text", "", "", "", ""],
        ["", "", "", "", ""],
    ]
    info = tshark(pcap).splitlines()
    assert info[0].endswith('len=26 | {"execute": "guest-ping"}')
    assert info[1].endswith("len=34 | GET /status HTTP/1.1 ")
    assert info[2].endswith("| READY=1 STATUS=Serving")
    assert info[3].endswith("| hello world")


def test_every_fixture_dissects_without_lua_errors() -> None:
    for path in vsock_captures():
        out = tshark(path, "-V")
        assert "vsockmon analysis" in out or "Virtio" not in out


def test_field_tables_in_plugin_match_protocol_py() -> None:
    spec = importlib.util.spec_from_file_location("gen_lua_tables",
                                                  ROOT / "dissectors" / "gen_lua_tables.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.render() in PLUGIN.read_text(), "stale: run dissectors/gen_lua_tables.py"


def test_two_pass_and_filtered_views_agree(tmp_path: Path) -> None:
    """Wireshark re-dissects frames in any order; cached first-pass results keep them."""
    pcap = write_pcap(tmp_path / "r.pcap", [
        frame(Op.REQUEST, src=C, dst=S), frame(Op.REQUEST, src=(3, 7), dst=S),
        frame(Op.RESPONSE, src=S, dst=C), frame(Op.REQUEST, src=C, dst=S),
        frame(Op.RW, b"x", src=S, dst=(3, 7)),
    ])
    assert column(pcap, "frame.number", extra=("-2", "-Y", "vsockmon.stream == 1")) == ["2", "5"]
    assert column(pcap, "vsockmon.stream", extra=("-2",)) == ["0", "1", "0", "2", "1"]
