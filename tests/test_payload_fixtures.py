"""Payload dissectors on real traffic: the captures in fixtures/payload (made in the lab VM
by fixtures/payload/generate.py), read by the Python registry and the Wireshark plugin,
and regenerated in the lab to show the generator and the dissectors work on a real kernel."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from vsockmon.decode.frames import frames
from vsockmon.lab import Lab
from vsockmon.payload import dissect_frame
from vsockmon.wire.pcapio import open_capture
from vsockmon.wire.protocol import Op

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = ROOT / "fixtures" / "payload"
PLUGIN = ROOT / "dissectors" / "vsockmon.lua"
NAMES = ("ttrpc-agent", "json-qga", "sd-notify", "http")

EXPECTED_TTRPC = [
    "request #1 grpc.Health/Check",
    "response #1 OK",
    "request #3 grpc.AgentService/CreateContainer",
    "response #3 OK",
    "request #5 grpc.AgentService/CopyFile",  # reassembled from four RW packets
    "response #5 OK",
    "request #7 grpc.AgentService/StatsContainer",
    "response #7 NOT_FOUND: container not found",
    "request #9 grpc.AgentService/StatsContainer",
    "request #11 grpc.Health/Check",
    "response #9 OK",
    "response #11 OK",
]


def tshark_rows(path: Path, *names: str) -> list[list[str]]:
    out = subprocess.run(["tshark", "-n", "-2", "-X", f"lua_script:{PLUGIN}", "-r", str(path),
                          "-T", "fields", "-E", "occurrence=a", "-E", "aggregator=|",
                          *(a for n in names for a in ("-e", n))],
                         capture_output=True, text=True, check=True)
    assert "Lua" not in proc_err(out.stderr)
    return [line.split("\t") for line in out.stdout.splitlines()]


def proc_err(stderr: str) -> str:
    return "\n".join(ln for ln in stderr.splitlines() if "dangerous" not in ln)


def python_view(path: Path) -> list[tuple[str, str] | None]:
    """(protocol, summary) of each frame's payload by the Python registry."""
    with open_capture(str(path)) as reader:
        out = []
        for f in frames(reader.batches()):
            info = dissect_frame(f) if f.has_virtio and f.virtio["op"] == Op.RW else None
            out.append((info.protocol, info.summary) if info else None)
    return out


def check_captures(folder: Path) -> None:
    """What both dissector sets must see in the four payload captures."""
    paths = {name: folder / f"{name}.pcap.gz" for name in NAMES}
    for path in paths.values():
        py = python_view(path)
        lua = [row[0] for row in tshark_rows(path, "vsockmon.payload_proto")]
        assert len(py) == len(lua)
        assert [p[0] if p else "" for p in py] == lua, path.name  # same protocol per frame

    rows = tshark_rows(paths["ttrpc-agent"], "ttrpc.method", "ttrpc.status.code",
                       "vsockmon.reassembled_in")
    methods = [m for row in rows for m in row[0].split("|") if m]
    assert methods == [
        "grpc.Health/Check", "grpc.Health/Check",
        "grpc.AgentService/CreateContainer", "grpc.AgentService/CreateContainer",
        "grpc.AgentService/CopyFile", "grpc.AgentService/CopyFile",
        "grpc.AgentService/StatsContainer", "grpc.AgentService/StatsContainer",
        "grpc.AgentService/StatsContainer", "grpc.Health/Check",
        "grpc.AgentService/StatsContainer", "grpc.Health/Check",
    ]
    assert [c for row in rows for c in row[1].split("|") if c] == ["0", "0", "0", "5", "0", "0"]
    segments = [row[2] for row in rows if row[2]]
    assert len(segments) == 3 and len(set(segments)) == 1  # three pieces, one message

    # Python sees messages that start in a packet (it does not reassemble)
    summaries = [s for v in python_view(paths["ttrpc-agent"]) if v
                 for s in v[1].split("; ") if not s.startswith("continuation")]
    assert [s.split(" (partial")[0] for s in summaries] == EXPECTED_TTRPC

    qga = [v[1] for v in python_view(paths["json-qga"]) if v]
    assert qga[:4] == ['execute guest-sync', "return 4242", "execute guest-ping", "return {}"]
    assert qga[-1].startswith('error {"class": "CommandNotFound"')

    notes = tshark_rows(paths["sd-notify"], "sd_notify.key", "vsockmon.type_name")
    keys = [(row[0], row[1]) for row in notes if row[0]]
    assert keys == [("STATUS", "STREAM"), ("READY|STATUS|MAINPID", "STREAM"),
                    ("STOPPING|STATUS", "STREAM"), ("WATCHDOG", "SEQPACKET")]

    http = tshark_rows(paths["http"], "http.request.uri", "http.response.code")
    assert [r for r in http if any(r)] == [["/healthz", ""], ["", "200"]]


@pytest.mark.tshark
def test_committed_payload_captures() -> None:
    check_captures(PAYLOAD)


@pytest.mark.lab
@pytest.mark.tshark
def test_regenerated_in_the_lab(lab: Lab, tmp_path: Path) -> None:
    result = lab.run([sys.executable, str(PAYLOAD / "generate.py"), str(tmp_path)],
                     cwd=tmp_path, timeout=400)
    assert result.returncode == 0, result.output
    # the lab's capture helper fails the run if tcpdump missed a frame the link tapped
    done = re.findall(r"^(\S+)\.pcap: \d+ frames$", result.output, re.MULTILINE)
    assert sorted(done) == sorted(NAMES), result.output
    check_captures(tmp_path)
