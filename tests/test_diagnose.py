"""The diagnose rules: each fires on its fixture with the right stream and frames, none fires
on healthy traffic (every capture under fixtures/, found by glob), and the Linux behaviours
that look odd but are normal stay quiet."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import tshark_rows
from conntrack_scenarios import MS, Conv, write
from tshark_rows import (
    CREDIT_UPDATE,
    REQUEST,
    RESPONSE,
    RST,
    RW,
    SHUTDOWN,
    SHUTDOWN_SEND,
    STREAM,
)

import vsockmon
from vsockmon.analysis.pipeline import analyse
from vsockmon.conntrack.tracker import Close, Connection
from vsockmon.decode.frames import decode_batches
from vsockmon.diagnose.digest import Digest
from vsockmon.diagnose.engine import RULES, LiveDiagnosis, evaluate
from vsockmon.diagnose.model import Finding, Severity, Thresholds
from vsockmon.diagnose.views import (
    findings_by_frame,
    findings_by_stream,
    matching_findings,
    worst_by_stream,
)
from vsockmon.wire.pcapio import CaptureError, CaptureReader, PcapngWriter
from vsockmon.wire.protocol import Op, ShutdownFlag, SockType

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

EXPECTED: dict[str, list[tuple[str, int, tuple[int, ...]]]] = {
    # real captures from the lab (fixtures/diagnose/lab_traffic.py)
    "diagnose/no-listener.pcap": [("no-listener", 2, (20, 21))],
    "diagnose/no-listener-vhost.pcap": [("no-listener", 1, (11, 12)),
                                        ("no-listener", 3, (20, 21))],
    "diagnose/dial-retry.pcap": [("no-listener", 0, tuple(range(1, 11))),
                                 ("dial-retry", 0, (1, 3, 5, 7, 9))],
    "diagnose/accept-queue-full.pcap": [("accept-queue-full", 2, (3, 4, *range(6, 41)))],
    "diagnose/seqpacket-refused.pcap": [("seqpacket-refused", 1, (10, 11)),
                                        ("seqpacket-refused", 2, (12, 13))],
    "diagnose/abrupt-close.pcap": [("abrupt-close/unread", 0, (4, 5))],
    "diagnose/window-full.pcap": [("window-full/not-reading", 0, (6,))],
    "diagnose/window-full-deadlock.pcap": [("window-full/deadlock", 0, (8, 10))],
    # 10 RWs of 8 KiB (frames 3-12) fill the 80 KiB buffer; the reader's reply (13) reopens it
    "diagnose/window-full-partial-read.pcap.gz": [("window-full/not-reading", 0, (12, 13))],
    "diagnose/half-close-hang.pcap": [("half-close-hang", 0, (4, 5))],
    # two sd_notify-style clients: REQUEST, RESPONSE, the 8-byte message, SHUTDOWN(SEND) make
    # frames 1-4 of each; the receiver's CREDIT_UPDATE for the 8 bytes read is frame 5, then
    # 2 s later its close (SHUTDOWN, frame 6) and the client's two RSTs (7, 8). The second
    # connection repeats it from frame 9 (half-close at 12, CREDIT_UPDATE 13); its client
    # gives up 1.5 s later (SHUTDOWN, frame 14) and the receiver resets (15).
    "diagnose/half-close-stall.pcap": [("half-close-stall", 0, (4, 6)),
                                       ("half-close-stall", 1, (12, 14))],
    "diagnose/half-close-stall-6.12.pcap": [("half-close-stall", 0, (4, 6)),
                                            ("half-close-stall", 1, (12, 14))],  # the same, 6.12
    "diagnose/mid-capture.pcap": [("mid-capture/start", 0, (1,)), ("mid-capture/end", 0, (8,))],
    "diagnose/tap-length.pcap": [("tap-length", 0, (3, 4))],
    "diagnose/cid-mismatch-vhost.pcap": [("cid-mismatch/not-host", 3, (25,))],
    # three connections lab VM -> guest echo (streams 0-2, six frames each: REQUEST,
    # RESPONSE, RW, credit update, echo, credit update = frames 1-18), then savevm + loadvm of
    # the guest; the lab VM writes on stream 0 (19), the guest's socket-less RSTs for streams
    # 2 and 0 (20, 21), a write on stream 1 (23) and its RST (24); stream 3 is a new healthy
    # echo. Both kernels did exactly this.
    "diagnose/transport-reset-6.1.pcap": [("transport-reset", 2, (20, 21, 24))],
    "diagnose/transport-reset-6.12.pcap": [("transport-reset", 2, (20, 21, 24))],
    # synthetic (fixtures/diagnose/generate.py)
    "diagnose/no-transport.pcap": [("no-transport/no-transport", 0, (1,)),
                                   ("mid-capture/end", 1, (2,))],
    "diagnose/cid-mismatch.pcap": [("cid-mismatch/not-host", 1, (11, 12))],
    "diagnose/cid-mismatch-reply.pcap": [("cid-mismatch/reply-cid", 0, (1, 2))],
    # 4 RWs of 4096 (frames 3-6) fill the 16 KiB buffer; the receiver's RW 3 s later (7)
    # carries the fwd_cnt it never announced
    "diagnose/fwd-cnt-stuck.pcap": [("fwd-cnt-stuck", 0, (6, 7))],
    # 2 RWs of 4096 (frames 3, 4) fill the 8 KiB buffer; the CREDIT_REQUEST (5) gets nothing
    "diagnose/credit-request-unanswered.pcap": [("credit-request-unanswered", 0, (4, 5))],
    "diagnose/credit-violation.pcap": [("credit-violation", 0, (4, 5))],
    "diagnose/small-packet-reset.pcap": [("small-packet-reset", 0, (83,))],
    "diagnose/state-lost.pcap": [("state-lost", 1, (6, 7))],
    "diagnose/abrupt-close-reset.pcap": [("abrupt-close/reset", 0, (8,))],
    # generate.py stale_rst: the old connection is frames 1-10 (REQUEST, RESPONSE, RW, credit
    # update, RW, credit update, then the close: SHUTDOWN, credit update, SHUTDOWN, RST); the
    # new one on the same ports is REQUEST 11, RESPONSE 12 and the late RST 13
    "diagnose/stale-rst.pcap": [("stale-rst", 1, (10, 12, 13))],
    # other owners' fixtures that hold a deliberate fault
    "synthetic/stream-all-ops.pcap": [("no-listener", 1, (23, 24))],
    "synthetic/stream-all-ops.pcap.gz": [("no-listener", 1, (23, 24))],
    "real/no-listener.pcap": [("no-listener", 0, (1, 2))],
    # tests/conntrack_scenarios.py echo_capture, counted from its script: stream 0 takes
    # frames 1-9 (open 2, two RW+CREDIT_UPDATE 4, SHUTDOWN + 2 RST); stream 1's server RST is
    # frame 14; stream 2 is REQUEST 15 + RST 16; stream 3 (SEQPACKET) ends at 30; stream 4
    # stops half-closed at its SHUTDOWN, 35; stream 5 is one REQUEST, 36; stream 6 starts
    # mid-connection at 37 and is still open at 40.
    "synthetic/echo.pcap": [("abrupt-close/reset", 1, (14,)), ("no-listener", 2, (15, 16)),
                            ("mid-capture/end", 4, (35,)), ("mid-capture/end", 5, (36,)),
                            ("mid-capture/start", 6, (37,)), ("mid-capture/end", 6, (40,))],
}
"""Every finding (info included) of the captures that are not healthy, exactly. The entries
of the rules in :data:`DERIVED` are reasoned again from tshark's fields by
:func:`test_expected_findings_agree_with_tshark`."""

NOT_VSOCK = {"synthetic/ethernet.pcap"}
"""Captures of another link type: diagnose refuses them with one line."""


def captures() -> list[str]:
    found = {p for pattern in ("*.pcap", "*.pcapng", "*.pcap.gz", "*.pcapng.gz")
             for p in FIXTURES.rglob(pattern)}
    return sorted(str(p.relative_to(FIXTURES)) for p in found)


@dataclass
class Diagnosed:
    findings: list[Finding]
    connections: list[Connection]


def diagnose_file(path: Path, chunk: int | None = None,
                  thresholds: Thresholds | None = None) -> Diagnosed:
    """The findings of the analysis pass over ``path`` (read ``chunk`` bytes at a time:
    small chunks put connections across batch edges) and its connections."""
    if chunk is None:
        cap = vsockmon.open(path)
        return Diagnosed(cap.findings(thresholds), list(cap.analysis().table))
    t = thresholds or Thresholds()
    digest = Digest(t)
    with CaptureReader(str(path), chunk=chunk) as reader:
        table = analyse(reader, digest.feed).table
    return Diagnosed(evaluate(table, digest, t), list(table))


def summary(findings: list[Finding]) -> list[tuple[str, int | None, tuple[int, ...]]]:
    return [(f.rule_id, f.stream, f.frames) for f in findings]


@pytest.mark.parametrize("name", captures())
def test_every_fixture_diagnoses_as_expected(name: str) -> None:
    """Healthy captures give nothing at warning or above; the others exactly their table."""
    path = FIXTURES / name
    if name in NOT_VSOCK:
        with pytest.raises(CaptureError):
            diagnose_file(path)
        return
    report = diagnose_file(path)
    if name in EXPECTED:
        assert sorted(summary(report.findings)) == sorted(EXPECTED[name])
    else:
        loud = [f for f in report.findings if f.severity >= Severity.WARNING]
        assert loud == [], f"false alarm on healthy {name}: {summary(loud)}"


def test_the_expectations_name_existing_files() -> None:
    """A renamed fixture must not silently drop out of the table (real/* lands separately)."""
    missing = {n for n in EXPECTED if not (FIXTURES / n).exists() and not n.startswith("real/")}
    assert not missing


def test_every_rule_has_a_fixture() -> None:
    fired = {rule.split("/")[0] for found in EXPECTED.values() for rule, _, _ in found}
    assert fired == set(RULES)


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if n.startswith("diagnose/")))
def test_tiny_batches_change_nothing(name: str) -> None:
    """The digest carries state across batch edges: one packet per batch gives the same."""
    whole = diagnose_file(FIXTURES / name)
    tiny = diagnose_file(FIXTURES / name, chunk=64)
    assert summary(tiny.findings) == summary(whole.findings)
    assert [f.evidence for f in tiny.findings] == [f.evidence for f in whole.findings]


DERIVED = ("no-listener", "seqpacket-refused", "dial-retry", "half-close-hang",
           "half-close-stall", "tap-length", "mid-capture/start", "stale-rst", "transport-reset")
"""The findings :func:`by_tshark` reasons out on its own from Wireshark's fields."""


def by_tshark(path: Path) -> list[tuple[str, int, tuple[int, ...]]]:
    """The :data:`DERIVED` findings of a capture, reasoned from tshark's per-frame fields
    with the rules as docs/diagnose.md states them, sharing no code with vsockmon."""
    conns = tshark_rows.streams(tshark_rows.rows(path))
    out: list[tuple[str, int, tuple[int, ...]]] = []
    end_ns = max(r.ts_ns for c in conns for r in c)
    # refused: a REQUEST the dialled end answered with RST and no RESPONSE; one finding per
    # target (client CID, server CID, port, type) with every REQUEST and its RST
    refused: dict[tuple[int, ...], list[int]] = {}
    for i, c in enumerate(conns):
        req = c[0]
        if req.op == REQUEST and not any(r.op == RESPONSE for r in c):
            rst = next((r for r in c if r.op == RST and r.src == req.dst), None)
            if rst is not None:
                refused.setdefault((req.src[0], *req.dst, req.type), []).append(i)
    for (_, _, _, typ), found in refused.items():
        frames = tuple(r.frame for i in found for r in conns[i] if r.op in (REQUEST, RST))
        rule = "no-listener" if typ == STREAM else "seqpacket-refused"
        out.append((rule, found[0], frames))
        if len(found) >= 3:  # attempts a few ms apart, all failed (retry_count 3)
            out.append(("dial-retry", found[0], tuple(conns[i][0].frame for i in found)))
    for i, c in enumerate(conns):
        if c[0].op != REQUEST:
            out.append(("mid-capture/start", i, (c[0].frame,)))
        shuts = [r for r in c if r.op == SHUTDOWN]
        silence = (end_ns - c[-1].ts_ns) / 1e9
        if (len(shuts) == 1 and shuts[0].flags == SHUTDOWN_SEND
                and not any(r.op == RST for r in c) and silence >= 1.0):
            out.append(("half-close-hang", i, (shuts[0].frame, c[-1].frame)))
        # a SEND-only SHUTDOWN first, no RW from the peer after it, and the next SHUTDOWN or
        # RST of either end at least 1 s (half_close_stall_s) after the peer had read all the
        # half-closed side sent (its fwd_cnt reached those bytes: the end of file)
        ends = [r for r in c if r.op in (SHUTDOWN, RST)]
        if len(ends) >= 2 and ends[0].op == SHUTDOWN and ends[0].flags == SHUTDOWN_SEND:
            half, end = ends[:2]
            answered = any(r.op == RW and r.src == half.dst and r.frame > half.frame for r in c)
            sent = sum(r.len for r in c if r.op == RW and r.src == half.src)
            read = next((r for r in c if r.src == half.dst and r.fwd_cnt >= sent), None)
            eof_ns = None if read is None else max(read.ts_ns, half.ts_ns)
            if (not answered and eof_ns is not None and eof_ns <= end.ts_ns
                    and end.ts_ns - eof_ns >= 1_000_000_000):
                out.append(("half-close-stall", i, (half.frame, end.frame)))
    tap = [(i, r.frame) for i, c in enumerate(conns) for r in c if r.captured != r.len]
    if tap:
        out.append(("tap-length", tap[0][0], tuple(f for _, f in tap)))
    return sorted(out + _resets_by_tshark(conns))


Rows = list[tshark_rows.Row]


def _reset_after_response(c: Rows) -> tuple[tshark_rows.Row, tshark_rows.Row] | None:
    """(RESPONSE, first RST) of an established connection its RST ended without both ends
    having shut down before it."""
    response = next((r for r in c if r.op == RESPONSE), None)
    rst = next((r for r in c if r.op == RST), None)
    if c[0].op != REQUEST or response is None or rst is None:
        return None
    shut = {r.src for r in c if r.op == SHUTDOWN and r.frame < rst.frame}
    return None if len(shut) == 2 else (response, rst)


def _resets_by_tshark(conns: list[Rows]) -> list[tuple[str, int, tuple[int, ...]]]:
    """stale-rst: an RST whose fwd_cnt counts more bytes than its peer sent on the connection,
    the pair having carried an earlier one; transport-reset: two or more established
    connections reset within 1 s by one CID with RSTs of buf_alloc 0."""
    out: list[tuple[str, int, tuple[int, ...]]] = []
    last: dict[tuple[int, frozenset[tuple[int, int]]], Rows] = {}
    forgotten: dict[int, list[tuple[tshark_rows.Row, int, int]]] = {}
    for i, c in enumerate(conns):
        key = (c[0].type, frozenset((c[0].src, c[0].dst)))
        old, last[key] = last.get(key), c
        ended = _reset_after_response(c)
        if ended is None:
            continue
        response, rst = ended
        peer_sent = sum(r.len for r in c if r.op == RW and r.src == rst.dst)
        if old is not None and rst.fwd_cnt > peer_sent:
            out.append(("stale-rst", i, (old[-1].frame, response.frame, rst.frame)))
        elif rst.buf_alloc == 0:
            heard = max(r.frame for r in c if r.src == rst.src and r.frame < rst.frame
                        and r.op != CREDIT_UPDATE)
            forgotten.setdefault(rst.src[0], []).append((rst, i, heard))
    for resets in forgotten.values():
        resets.sort(key=lambda rih: rih[0].frame)
        runs: list[list[tuple[tshark_rows.Row, int, int]]] = []
        for rst, i, heard in resets:  # one run: nothing heard since before its first RST
            if runs and heard < runs[-1][0][0].frame:
                runs[-1].append((rst, i, heard))
            else:
                runs.append([(rst, i, heard)])
        out += [("transport-reset", run[0][1], tuple(r.frame for r, _, _ in run))
                for run in runs if len(run) >= 2]
    return out


@pytest.mark.tshark
@pytest.mark.parametrize("name", sorted(n for n in EXPECTED
                                        if any(r.startswith(DERIVED) for r, _, _ in EXPECTED[n])))
def test_expected_findings_agree_with_tshark(name: str) -> None:
    """The table above is not the tool's own output taken on trust: every entry of a rule
    that can be reasoned from Wireshark's fields alone is, and nothing more is found."""
    mine = sorted(e for e in EXPECTED[name] if e[0].startswith(DERIVED))
    assert mine and by_tshark(FIXTURES / name) == mine


def findings_of(tmp_path: Path, frames: list[tuple[int, bytes]],
                thresholds: Thresholds | None = None) -> list[Finding]:
    return diagnose_file(write(tmp_path / "t.pcap", frames), thresholds=thresholds).findings


def loud(findings: list[Finding]) -> list[tuple[str, int | None, tuple[int, ...]]]:
    return summary([f for f in findings if f.severity >= Severity.WARNING])


# -- the evidence ----------------------------------------------------------------------------


def test_no_listener_gives_the_rst_delay_and_the_fix() -> None:
    (f,) = diagnose_file(FIXTURES / "diagnose/no-listener.pcap").findings
    assert f.severity == Severity.ERROR and f.connection.endswith("→ 1:5101 STREAM")
    assert f.evidence["target"] == "1:5101" and 0 < f.evidence["rst_delay_ms"] < 100
    assert "5101" in f.message and "start the service" in f.fix.lower()
    record = json.loads(f.to_json())
    assert set(record) == {"rule", "kind", "severity", "stream", "streams", "frames", "time_ns",
                           "connection", "message", "cause", "fix", "evidence"}
    # the refused connection as tshark sees it: the capture's REQUEST answered by an RST
    conns = tshark_rows.streams(tshark_rows.rows(FIXTURES / "diagnose/no-listener.pcap"))
    (stream,) = [i for i, c in enumerate(conns) if [r.op for r in c] == [REQUEST, RST]]
    req, rst = conns[stream]
    assert (record["rule"], record["kind"], record["severity"]) == ("no-listener", None, "error")
    assert (record["stream"], record["streams"]) == (stream, [stream])
    assert (record["frames"], record["time_ns"]) == ([req.frame, rst.frame], req.ts_ns)
    assert f.evidence["rst_delay_ms"] == round((rst.ts_ns - req.ts_ns) / 1e6, 3)


def test_window_full_says_how_long_fwd_cnt_stayed_frozen() -> None:
    (f,) = diagnose_file(FIXTURES / "diagnose/window-full.pcap").findings
    assert (f.evidence["in_flight"], f.evidence["buf_alloc"]) == (4096, 4096)
    assert 2.5 < f.evidence["seconds"] < 4
    assert "until the capture ended" in f.message


def test_half_close_stall_says_who_ended_the_wait_and_after_how_long() -> None:
    """Real (lab): the receiver closed 2 s after reading the first client's EOF; the second
    client gave up after 1.5 s (its own timeout) and closed. The waits are the scenario's
    sleeps, give or take the lab's scheduling."""
    first, second = diagnose_file(FIXTURES / "diagnose/half-close-stall.pcap").findings
    assert first.evidence["closed_by"] == "server" and 2.0 <= first.evidence["stall_s"] < 2.3
    assert second.evidence["closed_by"] == "client" and 1.5 <= second.evidence["stall_s"] < 1.8
    assert "closed only 2.0 s later" in first.message and "gave up" in second.message
    assert "read() returns 0" in first.fix
    quiet = diagnose_file(FIXTURES / "diagnose/half-close-stall.pcap",
                          thresholds=Thresholds(half_close_stall_s=2.5))
    assert quiet.findings == []


def assert_quiet_after_a_small_read(path: Path) -> None:
    """``lab_traffic.py``'s window-full-partial-read: tshark shows the reader announced
    nothing between the RW that filled its 80 KiB buffer and its reply, whose fwd_cnt says it
    had read one 8 KiB packet: 72 KiB still free as last announced (over 64 KiB), so Linux's
    own silence — a receiver that stopped reading, not fwd-cnt-stuck's transport bug."""
    (conn,) = tshark_rows.streams(tshark_rows.rows(path))
    writer, reader = conn[0].src, conn[0].dst
    sent = 0
    for r in conn:
        sent += r.len if r.src == writer and r.op == RW else 0
        if sent == 81920:
            full = r
            break
    reply = next(r for r in conn if r.src == reader and r.op == RW)
    between = [r for r in conn if full.frame < r.frame < reply.frame and r.src == reader]
    assert (between, reply.fwd_cnt, conn[1].buf_alloc) == ([], 8192, 81920)
    (f,) = diagnose_file(path).findings
    assert (f.rule_id, f.frames) == ("window-full/not-reading", (full.frame, reply.frame))
    assert "showed 8192 bytes consumed: too few for Linux to announce" in f.message


def test_linux_stays_quiet_after_a_small_read_of_a_full_window() -> None:
    """Real (lab, 6.1; tests/test_diagnose_stall_lab.py makes it again on every kernel)."""
    assert_quiet_after_a_small_read(FIXTURES / "diagnose/window-full-partial-read.pcap.gz")


def test_one_stall_has_one_cause() -> None:
    """The credit rules and window-full classify the same stalls: each fixture's stall is
    reported by exactly one of them."""
    for name, rule in (("fwd-cnt-stuck", "fwd-cnt-stuck"),
                       ("credit-request-unanswered", "credit-request-unanswered"),
                       ("window-full", "window-full")):
        (f,) = diagnose_file(FIXTURES / f"diagnose/{name}.pcap").findings
        assert f.rule == rule


def test_deadlock_reports_both_directions() -> None:
    (f,) = diagnose_file(FIXTURES / "diagnose/window-full-deadlock.pcap").findings
    assert f.severity == Severity.ERROR
    assert f.evidence["client_in_flight"] == f.evidence["client_limit"] == 4096
    assert f.evidence["server_in_flight"] == f.evidence["server_limit"] == 4096


def test_unread_data_at_close_is_counted() -> None:
    (f,) = diagnose_file(FIXTURES / "diagnose/abrupt-close.pcap").findings
    assert f.evidence["client_unconsumed"] == 10240


def test_seqpacket_refusal_tells_a_stream_only_service_from_no_service() -> None:
    a, b = diagnose_file(FIXTURES / "diagnose/seqpacket-refused.pcap").findings
    assert "STREAM only" in a.message and "STREAM only" not in b.message
    assert "SOCK_STREAM" in a.fix


def _tshark_fields(path: Path, *fields: str) -> list[list[str]]:
    out = subprocess.run(["tshark", "-r", str(path), "-T", "fields",
                          *(a for f in fields for a in ("-e", f))],
                         capture_output=True, text=True, check=True).stdout
    return [line.split("\t") for line in out.splitlines()]


def test_an_overflowing_accept_queue_is_not_no_listener() -> None:
    """Real (lab): 20 parallel connects to a listener of backlog 1 that does not accept. The
    count of refusals is tshark's: REQUESTs to port 5800 answered by an RST, not a RESPONSE;
    the two accepted ones (backlog + 1) prove the listener was there."""
    path = FIXTURES / "diagnose/accept-queue-full.pcap"
    rows = _tshark_fields(path, "vsock.virtio.op", "vsock.src_port", "vsock.dst_port")
    answers = {(src, dst): int(op) for op, src, dst in rows if int(op) in (2, 3)}
    requests = [(src, dst) for op, src, dst in rows if int(op) == 1 and dst == "5800"]
    refused = sum(answers.get((dst, src)) == 3 for src, dst in requests)
    accepted = sum(answers.get((dst, src)) == 2 for src, dst in requests)
    assert (len(requests), refused, accepted) == (20, 18, 2)
    (f,) = diagnose_file(path).findings
    assert f.rule == "accept-queue-full" and f.severity == Severity.ERROR
    assert f.evidence["refusals"] == refused and f.evidence["target"] == "1:5800"
    assert "accept queue of 1:5800 overflowed" in f.message and "backlog" in f.fix
    assert "no-listener" not in {g.rule for g in diagnose_file(path).findings}


@pytest.mark.parametrize("name", ["diagnose/no-listener.pcap", "real/no-listener.pcap",
                                  "diagnose/dial-retry.pcap"])
def test_a_genuine_no_listener_is_still_no_listener(name: str) -> None:
    """Nothing was accepted on the refused port around the refusal: no overflow."""
    rules = {f.rule for f in diagnose_file(FIXTURES / name).findings}
    assert "no-listener" in rules and "accept-queue-full" not in rules


def test_a_guest_dialling_a_cid_that_does_not_exist_across_vhost() -> None:
    """Real: vhost tapped the guest's REQUEST to CID 7 and dropped it; the guest's healthy
    dial-back to the host just before is a clean connection."""
    report = diagnose_file(FIXTURES / "diagnose/cid-mismatch-vhost.pcap")
    (f,) = report.findings
    assert (f.evidence["src_cid"], f.evidence["dst_cid"]) == (3, 7)
    assert f.connection.endswith("→ 7:7002 STREAM")
    dial_back = report.connections[1]
    assert (dial_back.client.cid, dial_back.server.cid, dial_back.server.port) == (3, 2, 7002)
    assert dial_back.client.bytes == dial_back.server.bytes == 20
    assert dial_back.close == Close.GRACEFUL


def test_thresholds_are_options(tmp_path: Path) -> None:
    for name, thresholds in (("window-full", Thresholds(stall_s=10)),
                             ("half-close-hang", Thresholds(half_close_s=5))):
        found = diagnose_file(FIXTURES / f"diagnose/{name}.pcap", thresholds=thresholds)
        last = found.connections[0].last_frame
        assert summary(found.findings) == [("mid-capture/end", 0, (last,))]


# -- healthy Linux behaviour stays quiet ------------------------------------------------------


def test_port_reuse_after_a_close_is_normal(tmp_path: Path) -> None:
    out: list[tuple[int, bytes]] = []
    for _ in range(3):  # same client port three times, each closed properly
        c = Conv(out)
        c.open()
        c.data(0, b"ping")
        c.data(1, b"pong")
        c.close()
    assert findings_of(tmp_path, out) == []


def test_delayed_packet_with_an_older_fwd_cnt_is_normal(tmp_path: Path) -> None:
    out: list[tuple[int, bytes]] = []
    c = Conv(out, buf=[4096, 4096])
    c.open()
    for _ in range(4):
        c.data(0, bytes(4096))
    c.send(1, Op.CREDIT_UPDATE, fwd=4096)  # a late packet carrying an old fwd_cnt
    c.data(0, bytes(100))
    c.close()
    assert findings_of(tmp_path, out) == []


def test_short_stalls_of_a_bulk_transfer_are_flow_control(tmp_path: Path) -> None:
    out: list[tuple[int, bytes]] = []
    c = Conv(out, buf=[262144, 65536])
    c.open()
    for _ in range(64):  # every packet fills the window; the reader frees it 5 ms later
        c.send(0, Op.RW, bytes(65536))
        c.unread[1] += 65536
        c.fwd[1] += 65536
        c.unread[1] = 0
        c.send(1, Op.CREDIT_UPDATE, delay=5 * MS)
    c.close()
    assert findings_of(tmp_path, out) == []


def test_half_close_that_completes_and_closes_from_both_sides(tmp_path: Path) -> None:
    out: list[tuple[int, bytes]] = []
    c = Conv(out)
    c.open()
    c.data(0, b"request")
    c.send(0, Op.SHUTDOWN, flags=ShutdownFlag.SEND)
    c.send(1, Op.RW, b"answer after EOF", delay=2000 * MS)
    c.unread[0] += 16
    c.fwd[0] += 16
    c.send(1, Op.SHUTDOWN, flags=ShutdownFlag.SEND | ShutdownFlag.RCV)
    c.send(0, Op.RST)
    c.send(0, Op.RST)
    assert findings_of(tmp_path, out) == []


def test_sender_closing_right_after_its_data_is_not_data_loss(tmp_path: Path) -> None:
    """sd_notify style: write, close at once; the receiver reads after the SHUTDOWN."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out, type_=SockType.SEQPACKET)
    c.open()
    c.send(0, Op.RW, b"READY=1")
    c.send(0, Op.SHUTDOWN, flags=ShutdownFlag.SEND | ShutdownFlag.RCV)
    c.send(1, Op.RST, fwd=7, delay=3 * MS)
    assert findings_of(tmp_path, out) == []


def test_close_with_unread_data_that_waited_is_reported(tmp_path: Path) -> None:
    out: list[tuple[int, bytes]] = []
    c = Conv(out)
    c.open()
    c.send(0, Op.RW, b"x" * 500)
    c.send(1, Op.SHUTDOWN, flags=3, delay=200 * MS)  # fwd_cnt still 0
    c.send(0, Op.RST)
    assert loud(findings_of(tmp_path, out)) == [("abrupt-close/unread", 0, (4, 5))]


def test_reset_without_shutdown_is_abrupt(tmp_path: Path) -> None:
    out: list[tuple[int, bytes]] = []
    c = Conv(out)
    c.open()
    c.data(0, b"hello")
    c.send(0, Op.RST)
    assert loud(findings_of(tmp_path, out)) == [("abrupt-close/reset", 0, (5,))]


def test_a_refusal_then_success_is_a_late_service_not_an_error(tmp_path: Path) -> None:
    out: list[tuple[int, bytes]] = []
    refused = Conv(out, client=(3, 50000), server=(2, 1024))
    refused.send(0, Op.REQUEST)
    refused.send(1, Op.RST, buf=0)
    ok = Conv(out, client=(3, 50001), server=(2, 1024))
    ok.open()
    ok.close()
    (f,) = findings_of(tmp_path, out)
    assert (f.rule, f.severity) == ("no-listener", Severity.WARNING)
    assert "started late" in f.message


def test_dial_retry_that_finally_connects(tmp_path: Path) -> None:
    out: list[tuple[int, bytes]] = []
    for port in (50000, 50001, 50002):
        c = Conv(out, client=(3, port), server=(2, 1024))
        c.send(0, Op.REQUEST, delay=500 * MS)
        c.send(1, Op.RST, buf=0)
    c = Conv(out, client=(3, 50003), server=(2, 1024))
    c.open()
    c.close()
    retry = [f for f in findings_of(tmp_path, out) if f.rule == "dial-retry"]
    assert [(f.evidence["attempts"], f.evidence["connected"]) for f in retry] == [(4, True)]


def test_many_healthy_connections_to_one_port_are_not_retries(tmp_path: Path) -> None:
    out: list[tuple[int, bytes]] = []
    for port in range(50000, 50010):
        c = Conv(out, client=(3, port), server=(2, 1024))
        c.open()
        c.data(0, b"x")
        c.close()
    assert findings_of(tmp_path, out) == []


def test_a_request_unanswered_for_less_than_the_threshold_is_just_cut_off(tmp_path: Path
                                                                          ) -> None:
    out: list[tuple[int, bytes]] = []
    Conv(out, client=(3, 50000), server=(2, 1024)).send(0, Op.REQUEST)
    (f,) = findings_of(tmp_path, out)
    assert (f.rule_id, f.severity) == ("mid-capture/end", Severity.INFO)


def test_peer_that_spoke_before_but_does_not_answer(tmp_path: Path) -> None:
    out: list[tuple[int, bytes]] = []
    c = Conv(out, client=(2, 40000), server=(3, 1024))
    c.open()
    c.close()
    Conv(out, client=(2, 40001), server=(3, 1024)).send(0, Op.REQUEST, delay=MS)
    Conv(out, client=(2, 40002), server=(3, 1025)).send(0, Op.REQUEST, delay=3000 * MS)
    found = [f for f in findings_of(tmp_path, out) if f.rule == "no-transport"]
    assert [(f.kind, f.stream) for f in found] == [("peer-silent", 1)]


def test_loopback_and_host_pairs_are_valid_cids(tmp_path: Path) -> None:
    out: list[tuple[int, bytes]] = []
    for client, server in (((1, 50000), (1, 1024)), ((3, 50000), (3, 1024)),
                           ((2, 50000), (7, 1024)), ((7, 50000), (2, 1024))):
        c = Conv(out, client=client, server=server)
        c.open()
        c.close()
    assert findings_of(tmp_path, out) == []


# -- live use and the API others build on ----------------------------------------------------


def test_live_diagnosis_reports_each_finding_once_when_it_becomes_certain() -> None:
    path = FIXTURES / "diagnose/window-full.pcap"
    live = LiveDiagnosis()
    with CaptureReader(str(path), chunk=64) as reader:
        batches = list(decode_batches(reader.batches()))
    reported: list[Finding] = []
    for fb in batches:
        live.feed(fb)
        if len(fb):
            reported += live.update(int(fb.ts_ns[-1]))
    assert [f.rule_id for f in reported] == ["window-full/not-reading"]
    assert live.update(int(batches[-1].ts_ns[-1])) == []
    assert live.close() == []


def test_live_no_transport_fires_once_the_wait_has_passed() -> None:
    live = LiveDiagnosis()
    with CaptureReader(str(FIXTURES / "diagnose/no-transport.pcap"), chunk=64) as reader:
        fbs = list(decode_batches(reader.batches()))
    live.feed(fbs[0])
    first_ts = int(fbs[0].ts_ns[0])
    assert [f.rule for f in live.update(first_ts + 100 * MS)] == []
    # the batch holds the one REQUEST (stream 0) of the capture
    assert [f.rule_id for f in live.update(first_ts + 1_999 * MS)] == []  # 2 s not yet up
    later = live.update(first_ts + 10_000 * MS)
    assert [(f.rule_id, f.stream) for f in later] == [("no-transport/no-transport", 0)]
    # closing then adds nothing: reported once, and the REQUEST's open end is explained
    assert live.close(first_ts + 10_000 * MS) == []


def test_findings_by_stream_and_frame() -> None:
    findings = diagnose_file(FIXTURES / "diagnose/dial-retry.pcap").findings
    by_stream = findings_by_stream(findings)
    assert [f.rule for f in by_stream[0]] == ["no-listener", "dial-retry"]
    assert set(by_stream) == {0, 1, 2, 3, 4}
    by_frame = findings_by_frame(findings)
    assert [f.rule for f in by_frame[1]] == ["no-listener", "dial-retry"]
    assert [f.rule for f in by_frame[2]] == ["no-listener"]
    assert worst_by_stream(findings)[3].rule == "no-listener"


def test_select_by_rule_kind_and_severity() -> None:
    findings = diagnose_file(FIXTURES / "diagnose/no-transport.pcap").findings
    assert [f.rule for f in matching_findings(findings, ["no-transport"])] == ["no-transport"]
    assert [f.rule for f in matching_findings(findings, ["mid-capture/end"])] == ["mid-capture"]
    assert [f.rule for f in matching_findings(findings, min_severity=Severity.WARNING)] == [
        "no-transport"]


def test_live_says_which_findings_the_written_file_reports_differently() -> None:
    """Live, the silence after a half-close runs up to the capture's stop; a file ends at its
    last frame, so offline the same connection is only cut off by the capture's end."""
    with CaptureReader(str(FIXTURES / "diagnose/half-close-hang.pcap")) as reader:
        frames = [(r.ts_ns, r.data, r.orig_len) for r in reader.records()]
    live = LiveDiagnosis()
    live.feed_frames(frames[:5])  # the half-closed connection alone, stopped 2 s later
    stop = frames[4][0] + 2_000 * MS
    reported = live.update(stop) + live.close(stop)
    assert [(f.rule, f.stream, f.frames) for f in reported] == [("half-close-hang", 0, (4, 5))]
    assert live.last_frame == 5
    missing, extra = live.file_differences(reported)
    assert missing == reported
    assert live.replaced(missing, stop) == []  # still a hang at the stop: the file's end differs
    assert [(f.rule_id, f.stream) for f in extra] == [("mid-capture/end", 0)]
    # the whole fixture: another connection 2.5 s later puts the silence inside the file
    live = LiveDiagnosis()
    live.feed_frames(frames)
    end = frames[-1][0]
    reported = live.update(end) + live.close(end)
    assert [(f.rule, f.stream) for f in reported] == [("half-close-hang", 0)]
    assert live.file_differences(reported) == ([], [])


def test_live_a_half_close_stall_is_a_hang_until_the_close_comes() -> None:
    """half-close-stall.pcap's first connection, live: 1 s after its last packet (frame 5)
    the silence is a hang; frame 6, the late close 2 s after the half-close, makes it a
    stall. Both are reported, each once; the file itself gives only the stall."""
    with CaptureReader(str(FIXTURES / "diagnose/half-close-stall.pcap")) as reader:
        frames = [(r.ts_ns, r.data, r.orig_len) for r in reader.records()]
    live = LiveDiagnosis()
    live.feed_frames(frames[:5])
    hang = live.update(frames[4][0] + 1_000 * MS)
    assert [(f.rule, f.stream, f.frames) for f in hang] == [("half-close-hang", 0, (4, 5))]
    live.feed_frames(frames[5:8])
    stall = live.update(frames[7][0])
    assert [(f.rule, f.stream, f.frames) for f in stall] == [("half-close-stall", 0, (4, 6))]
    assert live.file_differences(hang + stall, frames[7][0]) == (hang, [])
    assert live.replaced(hang + stall, frames[7][0]) == hang  # not the file's end: the close


@pytest.mark.parametrize("recorded", [True, False])
def test_a_pcapng_that_records_the_capture_stop_diagnoses_as_the_live_capture_did(
        tmp_path: Path, recorded: bool) -> None:
    """The half-closed connection alone, the capture stopped 2 s after its last frame: live,
    a hang. A pcapng file that records the stop gives the same finding offline; without
    that record the file only shows a connection cut off by the capture's end."""
    with CaptureReader(str(FIXTURES / "diagnose/half-close-hang.pcap")) as reader:
        frames = [(r.ts_ns, r.data, r.orig_len) for r in reader.records()][:5]
    stop = frames[-1][0] + 2_000 * MS
    path = tmp_path / "end.pcapng"
    with open(path, "wb") as fp:
        w = PcapngWriter(fp)
        for ts, data, orig in frames:
            w.write(ts, data, orig)
        if recorded:
            fp.write(PcapngWriter.statistics_block(stop))
    live = LiveDiagnosis()
    live.feed_frames(frames)
    reported = live.update(stop) + live.close(stop)
    with vsockmon.open(str(path)) as cap:
        offline = cap.findings()
    key = [(f.rule_id, f.stream, f.frames) for f in offline]
    if recorded:
        assert key == [(f.rule_id, f.stream, f.frames) for f in reported]
        assert key == [("half-close-hang", 0, (4, 5))]
        assert offline[0].evidence["silence_s"] == 2.0  # frame 5 to the recorded stop
        assert live.file_differences(reported, stop) == ([], [])
    else:
        assert key == [("mid-capture/end", 0, (5,))]
