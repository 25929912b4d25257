"""``vsockmon decode`` end to end, through the installed console script."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "synthetic"
VSOCKMON = str(ROOT / ".venv" / "bin" / "vsockmon")


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VSOCKMON, *args], capture_output=True, text=True,
                          input=stdin.decode("latin-1") if stdin else None, check=False)


def test_summary_lines_name_what_wireshark_does_not() -> None:
    out = run("decode", str(FIXTURES / "seqpacket-ns.pcapng"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 10
    assert "1:50000 → 1:7777  SEQPACKET RW len=12 [EOM,EOR]" in lines[5]
    stream = run("decode", str(FIXTURES / "stream-all-ops.pcap"), "-c", "15").stdout
    assert "CREDIT_REQUEST" in stream.splitlines()[14]
    assert '"Hello, world!"' in stream


def test_count_filter_table_and_tree() -> None:
    f = str(FIXTURES / "stream-all-ops.pcap")
    assert len(run("decode", f, "-c", "3").stdout.splitlines()) == 3
    table = run("decode", f, "--table", "-Y", "op == SHUTDOWN").stdout.splitlines()
    assert table[0].split()[:4] == ["no", "time", "source", "destination"]
    assert len(table) == 2 + 3 and "RCV,SEND" in table[-1]
    tree = run("decode", f, "-V", "-c", "1", "-Y", "op == RST and buf_alloc == 0").stdout
    assert "op:         3 (RST)" in tree and "dst_cid:    3" in tree


def test_json_lines_are_the_public_interface() -> None:
    out = run("decode", str(FIXTURES / "stream-all-ops.pcap"), "--json")
    recs = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(recs) == 25
    keys = {"frame.number", "frame.time_epoch", "frame.len", "frame.cap_len", "vsock.src_cid",
            "vsock.dst_cid", "vsock.src_port", "vsock.dst_port", "vsock.op", "vsock.trans",
            "vsock.trans_len", "vsock.virtio.src_cid", "vsock.virtio.dst_cid",
            "vsock.virtio.src_port", "vsock.virtio.dst_port", "vsock.virtio.len",
            "vsock.virtio.type", "vsock.virtio.op", "vsock.virtio.flags",
            "vsock.virtio.buf_alloc", "vsock.virtio.fwd_cnt", "payload_len",
            "vsock.virtio.op_name", "anomalies"}
    assert keys <= set(recs[0])
    assert recs[0]["frame.number"] == 1 and isinstance(recs[0]["vsock.virtio.buf_alloc"], int)
    assert recs[14]["vsock.virtio.op_name"] == "CREDIT_REQUEST"
    assert recs[12]["payload_len"] == 65536


def test_stdin_and_gzip() -> None:
    data = (FIXTURES / "stream-all-ops.pcap.gz").read_bytes()
    proc = subprocess.run([VSOCKMON, "decode", "-", "-c", "2"], input=data, capture_output=True,
                          check=False)
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 2


@pytest.mark.parametrize(("args", "message"), [
    (["/nonexistent.pcap"], "no such file"),
    ([str(FIXTURES)], "is a directory"),
    ([str(FIXTURES / "generate.py")], "not a pcap or pcapng file"),
    ([str(FIXTURES / "ethernet.pcap")], "link type 1 (Ethernet), expected 271 (VSOCK)"),
    ([str(FIXTURES / "stream-all-ops.pcap"), "-Y", "op =="], "bad filter"),
])
def test_bad_input_is_one_line_and_nonzero(args: list[str], message: str) -> None:
    out = run("decode", *args)
    assert out.returncode != 0
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "e.pcap").write_bytes(b"")
    out = run("decode", str(tmp_path / "e.pcap"))
    assert out.returncode != 0 and out.stderr.strip() == "Error: " + str(
        tmp_path / "e.pcap") + ": empty file, not a capture"


def test_truncated_file_decodes_then_says_where_it_stopped() -> None:
    out = run("decode", str(FIXTURES / "truncated.pcap"))
    assert len(out.stdout.splitlines()) == 12
    assert out.returncode != 0
    assert "file ends inside a packet after packet 12" in out.stderr


def test_verify_with_pyshark_names_wireshark_errors() -> None:
    out = run("decode", str(FIXTURES / "stream-all-ops.pcap"), "--verify")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "agree on every field" in out.stdout
    assert "op 7 is CREDIT_REQUEST, Wireshark says 'Credit response' (frames 15)" in out.stdout


def test_help_has_examples() -> None:
    out = run("decode", "--help")
    assert "Examples:" in out.stdout and "-Y 'cid == 3 and op == RW'" in out.stdout


def test_payload_dissectors_in_lines_and_tree() -> None:
    ttrpc = str(ROOT / "fixtures" / "payload" / "ttrpc-agent.pcap.gz")
    lines = run("decode", ttrpc, "-Y", "frame == 7").stdout
    assert "ttrpc: request #3 grpc.AgentService/CreateContainer" in lines
    tree = run("decode", ttrpc, "-V", "-Y", "frame == 7").stdout
    assert "grpc.AgentService/CreateContainer" in tree.split("payload:")[1]
