"""Every diagnose threshold at its boundary: just below stays quiet, at and just above fire.

The captures are synthetic (tests/conntrack_scenarios.py) with exact timestamps, so each
expected value is reasoned here from the scenario: the threshold's default (its doc in
docs/diagnose.md) and the frames the scenario writes, numbered from 1.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conntrack_scenarios import MS, Conv, write
from helpers import frame

import vsockmon
from vsockmon.diagnose.model import Finding, Severity, Thresholds
from vsockmon.diagnose.rules.common import delay_text
from vsockmon.wire.protocol import Op, SeqFlag, ShutdownFlag, SockType

S = 1000 * MS


def findings(tmp_path: Path, out: list[tuple[int, bytes]],
             thresholds: Thresholds | None = None) -> list[Finding]:
    return vsockmon.open(write(tmp_path / "t.pcap", out)).findings(thresholds)


def of(found: list[Finding], rule: str) -> list[Finding]:
    return [f for f in found if f.rule == rule]


# -- window-full: the frozen window (stall_s, 1 s) ---------------------------------------------


def frozen_window(stall_ns: int) -> list[tuple[int, bytes]]:
    """Frame 3: the client's 4096-byte RW fills the server's 4096-byte buffer; frame 4, the
    server's CREDIT_UPDATE ``stall_ns`` later, frees it; then a Linux close (frames 5-7)."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out, buf=[262144, 4096])
    c.open()
    c.send(0, Op.RW, bytes(4096))
    c.fwd[1] += 4096
    c.send(1, Op.CREDIT_UPDATE, delay=stall_ns)
    c.close()
    return out


@pytest.mark.parametrize("stall_ns", [S - 1, S, S + 1])
def test_a_frozen_window_is_reported_from_one_second_on(tmp_path: Path, stall_ns: int) -> None:
    found = findings(tmp_path, frozen_window(stall_ns))
    if stall_ns < S:
        assert found == []
        return
    (f,) = found
    assert (f.rule_id, f.stream, f.frames) == ("window-full/not-reading", 0, (3, 4))
    assert (f.evidence["in_flight"], f.evidence["buf_alloc"]) == (4096, 4096)
    assert f.evidence["seconds"] == round(stall_ns / 1e9, 3)


def test_the_stall_threshold_is_an_option(tmp_path: Path) -> None:
    """Half a second frozen: quiet by default, reported with stall_s 0.5 (and credit_reply_s
    left at 1 s, so it is the stall threshold that decides)."""
    out = frozen_window(S // 2)
    assert findings(tmp_path, out) == []
    (f,) = findings(tmp_path, out, Thresholds(stall_s=0.5))
    assert (f.rule_id, f.evidence["seconds"]) == ("window-full/not-reading", 0.5)


def test_a_window_freed_by_data_without_credit_update_is_a_transport_bug(tmp_path: Path
                                                                         ) -> None:
    """The receiver consumed the bytes but said so only in its next RW (frame 4, a higher
    fwd_cnt) 2 s later: no CREDIT_UPDATE came."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out, buf=[262144, 4096])
    c.open()
    c.send(0, Op.RW, bytes(4096))
    c.fwd[1] += 4096
    c.send(1, Op.RW, b"ok", delay=2 * S)
    c.fwd[0] += 2
    c.close()
    (f,) = findings(tmp_path, out)
    assert (f.rule_id, f.frames, f.evidence["ended_by"]) == ("fwd-cnt-stuck", (3, 4), "RW")
    assert f.evidence["seconds"] == 2.0


@pytest.mark.parametrize(("consumed", "rule_id"), [
    (262144 - 65536, "window-full/not-reading"),  # 64 KiB left free: Linux stays quiet
    (262144 - 65536 + 1, "fwd-cnt-stuck"),        # under 64 KiB free: Linux would announce
])
def test_linux_keeps_quiet_until_less_than_64_kib_is_free(tmp_path: Path, consumed: int,
                                                          rule_id: str) -> None:
    """Four 64 KiB RWs (frames 3-6) fill the default 256 KiB buffer; 2 s later the server's
    RW (frame 7) shows ``consumed`` bytes read; it reads the rest (frame 8), closes. After a
    read Linux sends CREDIT_UPDATE only once less than 64 KiB of its buffer is free as last
    announced: at 192 KiB consumed (64 KiB free) its silence is normal and the application
    simply stopped reading; one byte more and a Linux receiver would have announced it."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out)
    c.open()
    for _ in range(4):
        c.send(0, Op.RW, bytes(65536))
    c.fwd[1] += consumed
    c.send(1, Op.RW, b"ok", delay=2 * S)
    c.fwd[0] += 2
    c.fwd[1] = 4 * 65536  # then it reads the rest and says so (frame 8)
    c.send(1, Op.CREDIT_UPDATE)
    c.close()
    (f,) = findings(tmp_path, out)
    assert (f.rule_id, f.frames) == (rule_id, (6, 7))
    if rule_id == "fwd-cnt-stuck":
        assert f.evidence["ended_by"] == "RW"
    else:  # the RW of frame 7 told it
        assert f"Its RW then showed {consumed} bytes consumed: too few for Linux" in f.message


def test_a_window_reopened_by_a_bigger_buffer_is_not_a_missing_credit_update(
        tmp_path: Path) -> None:
    """As above, but the server's RW 2 s later advertises a bigger buffer (8192) with the
    same fwd_cnt: it did not consume, it grew; the receiver was not reading."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out, buf=[262144, 4096])
    c.open()
    c.send(0, Op.RW, bytes(4096))
    c.send(1, Op.RW, b"ok", delay=2 * S, buf=8192)
    c.fwd[0] += 2
    found = of(findings(tmp_path, out), "window-full")
    assert [(f.rule_id, f.frames) for f in found] == [("window-full/not-reading", (3, 4))]


def test_both_directions_full_at_once_is_a_deadlock(tmp_path: Path) -> None:
    """Frames 3 and 4 fill both 4096-byte buffers; nothing else for 1.5 s but a CREDIT_REQUEST
    pair that gives no credit back, then the capture ends."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out, buf=[4096, 4096])
    c.open()
    c.send(0, Op.RW, bytes(4096))
    c.send(1, Op.RW, bytes(4096))
    Conv(out, client=(1, 60000), server=(1, 60001)).send(0, Op.REQUEST, delay=3 * S // 2)
    deadlock = [f for f in findings(tmp_path, out) if f.rule == "window-full"]
    assert [(f.rule_id, f.frames) for f in deadlock] == [("window-full/deadlock", (3, 4))]
    assert deadlock[0].evidence["seconds"] == 1.5


# -- dial-retry: three failing attempts (retry_count), at most 60 s apart (retry_gap_s) --------


def refusals(n: int, gap_ns: int) -> list[tuple[int, bytes]]:
    """``n`` refused REQUESTs from new client ports to 2:1024, ``gap_ns`` apart."""
    out: list[tuple[int, bytes]] = []
    for i in range(n):
        c = Conv(out, client=(3, 50000 + i), server=(2, 1024))
        c.send(0, Op.REQUEST, delay=gap_ns - 1000 if i else 1000)
        c.send(1, Op.RST, buf=0)
    return out


@pytest.mark.parametrize(("attempts", "reported"), [(2, False), (3, True), (4, True)])
def test_dial_retry_needs_three_attempts(tmp_path: Path, attempts: int, reported: bool) -> None:
    retry = of(findings(tmp_path, refusals(attempts, 100 * MS)), "dial-retry")
    if not reported:
        assert retry == []
        return
    (f,) = retry
    assert (f.stream, f.streams, f.frames) == (0, tuple(range(attempts)),
                                               tuple(range(1, 2 * attempts, 2)))
    assert (f.evidence["attempts"], f.evidence["failures"], f.evidence["connected"]) == (
        attempts, attempts, False)
    assert f.evidence["span_s"] == round((attempts - 1) * 0.1, 3)


def test_dial_retry_threshold_is_an_option(tmp_path: Path) -> None:
    out = refusals(2, 100 * MS)
    (f,) = of(findings(tmp_path, out, Thresholds(retry_count=2)), "dial-retry")
    assert f.evidence["attempts"] == 2


@pytest.mark.parametrize(("gap_ns", "reported"), [(60 * S, True), (60 * S + 1, False)])
def test_attempts_more_than_sixty_seconds_apart_are_separate(tmp_path: Path, gap_ns: int,
                                                             reported: bool) -> None:
    retry = of(findings(tmp_path, refusals(3, gap_ns)), "dial-retry")
    assert [f.evidence["attempts"] for f in retry] == ([3] if reported else [])


def test_a_refused_seqpacket_retry_is_its_own_target(tmp_path: Path) -> None:
    """The same port dialled twice as STREAM and twice as SEQPACKET: two types, two runs of
    two, no retry loop; two refusal findings, one of each rule."""
    out: list[tuple[int, bytes]] = []
    for i, typ in enumerate((SockType.STREAM, SockType.SEQPACKET) * 2):
        c = Conv(out, client=(3, 50000 + i), server=(2, 1024), type_=typ)
        c.send(0, Op.REQUEST)
        c.send(1, Op.RST, buf=0)
    found = findings(tmp_path, out)
    assert of(found, "dial-retry") == []
    assert sorted((f.rule, f.stream, f.frames) for f in found) == [
        ("no-listener", 0, (1, 2, 5, 6)), ("seqpacket-refused", 1, (3, 4, 7, 8))]
    seq = next(f for f in found if f.rule == "seqpacket-refused")
    assert seq.evidence == {"refusals": 2, "rst_delay_ms": 0.001, "target": "2:1024"}
    assert "STREAM only" not in seq.message  # no STREAM connection was accepted there


def test_a_seqpacket_refusal_at_a_stream_service_seen_from_its_first_frame(
        tmp_path: Path) -> None:
    """The capture starts with the server's RESPONSE of a STREAM connection to 2:1024
    (frame 1: accepted); a SEQPACKET REQUEST to the same port is then refused."""
    out: list[tuple[int, bytes]] = []
    Conv(out, client=(3, 50000), server=(2, 1024)).send(1, Op.RESPONSE)
    c = Conv(out, client=(3, 50001), server=(2, 1024), type_=SockType.SEQPACKET)
    c.send(0, Op.REQUEST)
    c.send(1, Op.RST, buf=0)
    (f,) = of(findings(tmp_path, out), "seqpacket-refused")
    assert "A STREAM connection to the same port was accepted (stream 0)" in f.message


# -- no-transport: a REQUEST unanswered for 2 s (no_transport_s) -------------------------------


@pytest.mark.parametrize(("wait_ns", "reported"), [(2 * S - 1, False), (2 * S, True)])
def test_an_unanswered_request_counts_from_two_seconds(tmp_path: Path, wait_ns: int,
                                                       reported: bool) -> None:
    """Frame 1: a REQUEST to CID 3 that nothing answers; frame 2, ``wait_ns`` later, another
    connection's REQUEST marks the capture's end."""
    out: list[tuple[int, bytes]] = []
    Conv(out, client=(2, 40000), server=(3, 1024)).send(0, Op.REQUEST)
    Conv(out, client=(2, 40001), server=(2, 1025)).send(0, Op.REQUEST, delay=wait_ns)
    found = of(findings(tmp_path, out), "no-transport")
    if not reported:
        assert found == []
        return
    (f,) = found
    assert (f.rule_id, f.stream, f.frames) == ("no-transport/no-transport", 0, (1,))
    assert f.evidence["waited_s"] == 2.0 and f.evidence["dialled"] == "3:1024"
    # a guest (CID 3) was dialled, not the host: the guest's driver is what is missing
    assert "vmw_vsock_virtio_transport" in f.cause and "CID 3" in f.cause
    assert f.fix.startswith("Load the transport in the guest")
    assert f.fix.endswith("give connect() a timeout longer than the boot.")


def test_a_cid_that_spoke_before_and_then_not_is_a_silent_peer(tmp_path: Path) -> None:
    """Frames 1-2: CID 3 answers a first connection; frame 3, 1 ms later, a REQUEST to it
    that nothing answers for 2 s (frame 4 ends the capture): a warning, with frame 2 (CID 3's
    first packet) as evidence."""
    out: list[tuple[int, bytes]] = []
    first = Conv(out, client=(2, 40000), server=(3, 1024))
    first.open()
    Conv(out, client=(2, 40001), server=(3, 1024)).send(0, Op.REQUEST, delay=MS)
    Conv(out, client=(2, 40002), server=(2, 1025)).send(0, Op.REQUEST, delay=2 * S)
    (f,) = of(findings(tmp_path, out), "no-transport")
    assert (f.rule_id, f.severity, f.stream, f.frames) == ("no-transport/peer-silent", 1, 1,
                                                            (2, 3))
    assert f.evidence["cid_first_frame"] == 2


# -- half-close-hang: silence for 1 s after a one-sided SHUTDOWN(SEND) (half_close_s) ----------


@pytest.mark.parametrize(("silence_ns", "reported"), [(S - 1, False), (S, True)])
def test_a_half_close_hangs_after_one_second_of_silence(tmp_path: Path, silence_ns: int,
                                                        reported: bool) -> None:
    """Frames 1-4: open, a request, the client's SHUTDOWN(SEND); then only another
    connection's REQUEST (frame 5) ``silence_ns`` later."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out)
    c.open()
    c.send(0, Op.RW, b"request")
    c.send(0, Op.SHUTDOWN, flags=ShutdownFlag.SEND)
    Conv(out, client=(1, 50001), server=(1, 5000)).send(0, Op.REQUEST, delay=silence_ns)
    hang = of(findings(tmp_path, out), "half-close-hang")
    if not reported:
        assert hang == []
        return
    (f,) = hang
    assert (f.stream, f.frames) == (0, (4,))  # the SHUTDOWN is also its last frame
    assert (f.evidence["silence_s"], f.evidence["shutdown_frame"]) == (1.0, 4)
    assert "for the last 1.0 s of the capture" in f.message


# -- half-close-stall: a one-sided SHUTDOWN(SEND), then only a close 1 s later (half_close_stall_s)


def late_close(wait_ns: int, closer: int, answer: bool = False, read_ns: int = 1000
               ) -> list[tuple[int, bytes]]:
    """Frames 1-4: open, the client's 8-byte message (frame 3), its SHUTDOWN(SEND) (frame 4);
    frame 5, ``read_ns`` later, the server's CREDIT_UPDATE says it read the 8 bytes: it has
    reached the end of file. ``answer``: the server replies with data at once (frame 6).
    Then, ``wait_ns`` later, ``closer`` shuts down both directions and the other end resets."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out)
    c.open()
    c.send(0, Op.RW, b"READY=1\n")
    c.send(0, Op.SHUTDOWN, flags=ShutdownFlag.SEND)
    c.fwd[1] += 8
    c.send(1, Op.CREDIT_UPDATE, delay=read_ns)
    if answer:
        c.send(1, Op.RW, b"ok")
        c.fwd[0] += 2
    c.send(closer, Op.SHUTDOWN, flags=ShutdownFlag.SEND | ShutdownFlag.RCV, delay=wait_ns)
    c.send(1 - closer, Op.RST)
    return out


@pytest.mark.parametrize("closer", [0, 1])
@pytest.mark.parametrize(("wait_ns", "reported"), [(S - 1, False), (S, True), (2 * S, True)])
def test_a_half_close_answered_only_by_a_late_close_stalls(tmp_path: Path, closer: int,
                                                           wait_ns: int, reported: bool) -> None:
    """The server closes ``wait_ns`` after it read the client's end of file (frame 6), or the
    client gives up and closes then: a stall from 1 s on, whoever ended it."""
    found = of(findings(tmp_path, late_close(wait_ns, closer)), "half-close-stall")
    if not reported:
        assert found == []
        return
    (f,) = found
    assert (f.stream, f.frames) == (0, (4, 6))
    assert f.evidence == {"stall_s": wait_ns / S, "shutdown_frame": 4, "end_frame": 6,
                          "closed_by": ("client", "server")[closer]}
    assert ("gave up" in f.message) == (closer == 0)
    assert of(findings(tmp_path, late_close(wait_ns, closer)), "half-close-hang") == []


def test_a_server_that_half_closes_and_waits_stalls_too(tmp_path: Path) -> None:
    """The roles swapped: the server sends 8 bytes (frame 3) and shuts its sending side
    (frame 4); the client reads them (frame 5) but closes only 1.5 s later (frame 6)."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out)
    c.open()
    c.send(1, Op.RW, b"READY=1\n")
    c.send(1, Op.SHUTDOWN, flags=ShutdownFlag.SEND)
    c.fwd[0] += 8
    c.send(0, Op.CREDIT_UPDATE)
    c.send(0, Op.SHUTDOWN, flags=ShutdownFlag.SEND | ShutdownFlag.RCV, delay=3 * S // 2)
    c.send(1, Op.RST)
    (f,) = of(findings(tmp_path, out), "half-close-stall")
    assert (f.stream, f.frames) == (0, (4, 6))
    assert f.evidence == {"stall_s": 1.5, "shutdown_frame": 4, "end_frame": 6,
                          "closed_by": "client"}
    assert f.message.startswith("server 1:1234 shut down its sending side")


def test_the_half_close_stall_threshold_is_an_option(tmp_path: Path) -> None:
    out = late_close(2 * S, 1)
    assert of(findings(tmp_path, out, Thresholds(half_close_stall_s=2.5)), "half-close-stall"
              ) == []
    assert len(of(findings(tmp_path, out, Thresholds(half_close_stall_s=2)),
                  "half-close-stall")) == 1


def test_a_half_close_answered_with_data_is_not_a_stall(tmp_path: Path) -> None:
    """The server answers at once (frame 6), then closes 2 s later: the client had its answer;
    whatever it waited for afterwards, the peer did reply."""
    assert findings(tmp_path, late_close(2 * S, 1, answer=True)) == []


def test_a_peer_still_reading_is_not_sitting_on_the_end_of_file(tmp_path: Path) -> None:
    """The server reads the 8 bytes only 2 s after the half-close (frame 5) and closes at once
    (frame 6): it was busy before reaching the end of file, not keeping it open after."""
    assert findings(tmp_path, late_close(1000, 1, read_ns=2 * S)) == []


@pytest.mark.parametrize(("unread", "stall"), [
    (0, 1.5),   # all read before the half-close: the wait on the close counts from it
    (1, None),  # one byte still unread at it, read 0.6 s later: 0.9 s waiting on the close
])
def test_a_half_close_stall_counts_from_when_the_peer_had_read_everything(
        tmp_path: Path, unread: int, stall: float | None) -> None:
    """The client's 8 bytes (frame 3), of which the server has read all but ``unread``
    (frame 4); the client's SHUTDOWN(SEND) (frame 5); the server reads the rest 0.6 s later
    (frame 6) and closes 0.9 s after that (frame 7), 1.5 s after the half-close."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out)
    c.open()
    c.send(0, Op.RW, bytes(8))
    c.fwd[1] += 8 - unread
    c.send(1, Op.CREDIT_UPDATE)
    c.send(0, Op.SHUTDOWN, flags=ShutdownFlag.SEND)
    c.fwd[1] += unread
    c.send(1, Op.CREDIT_UPDATE, delay=600 * MS)
    c.send(1, Op.SHUTDOWN, flags=ShutdownFlag.SEND | ShutdownFlag.RCV, delay=900 * MS)
    c.send(0, Op.RST)
    found = of(findings(tmp_path, out), "half-close-stall")
    assert [(f.frames, f.evidence["stall_s"]) for f in found] == (
        [((5, 7), stall)] if stall else [])


def test_the_peer_has_read_everything_only_once_the_last_byte_is_read(tmp_path: Path
                                                                      ) -> None:
    """The client's 8 bytes (frame 3) and SHUTDOWN(SEND) (frame 4); the server reads 7 of
    them 0.3 s later (frame 5), the last one at 0.6 s (frame 6), and closes at 1.5 s (frame
    7): 0.9 s waiting on the close once all was read, no stall."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out)
    c.open()
    c.send(0, Op.RW, bytes(8))
    c.send(0, Op.SHUTDOWN, flags=ShutdownFlag.SEND)
    c.fwd[1] += 7
    c.send(1, Op.CREDIT_UPDATE, delay=300 * MS)
    c.fwd[1] += 1
    c.send(1, Op.CREDIT_UPDATE, delay=300 * MS)
    c.send(1, Op.SHUTDOWN, flags=ShutdownFlag.SEND | ShutdownFlag.RCV, delay=900 * MS)
    c.send(0, Op.RST)
    assert findings(tmp_path, out) == []


def test_a_record_flag_on_data_is_no_half_close(tmp_path: Path) -> None:
    """SEQPACKET: the client's first message carries flag bit 2 alone (EOR, the value of
    SHUTDOWN's SEND bit: frame 3), read at once (frame 4); its second (frame 5) and its
    SHUTDOWN(SEND) (frame 6) follow; the server reads that message only 0.6 s later (frame 7)
    and closes 0.9 s after that (frame 8), 1.5 s after the half-close. It was still reading
    until 0.6 s: only 0.9 s of waiting on the end of file, no stall — the RW's flags are not a
    SHUTDOWN's."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out, type_=SockType.SEQPACKET)
    c.open()
    c.data(0, b"one", flags=SeqFlag.EOR)
    c.send(0, Op.RW, b"two", flags=SeqFlag.EOM)
    c.send(0, Op.SHUTDOWN, flags=ShutdownFlag.SEND)
    c.fwd[1] += 3
    c.send(1, Op.CREDIT_UPDATE, delay=600 * MS)
    c.send(1, Op.SHUTDOWN, flags=ShutdownFlag.SEND | ShutdownFlag.RCV, delay=900 * MS)
    c.send(0, Op.RST)
    assert findings(tmp_path, out) == []


def test_a_full_close_is_not_a_half_close(tmp_path: Path) -> None:
    """The client closes both directions (SHUTDOWN 3) and the server's RST comes 2 s later:
    the client is not waiting for anything."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out)
    c.open()
    c.send(0, Op.RW, b"READY=1\n")
    c.fwd[1] += 8
    c.send(0, Op.SHUTDOWN, flags=ShutdownFlag.SEND | ShutdownFlag.RCV)
    c.send(1, Op.RST, delay=2 * S)
    assert of(findings(tmp_path, out), "half-close-stall") == []


# -- small-packet-reset: 64 writes under 1024 bytes, then a reset with credit left -------------


@pytest.mark.parametrize(("count", "size", "reported"),
                         [(63, 100, False), (64, 100, True), (64, 1023, True), (64, 1024, False)])
def test_small_packet_reset_boundaries(tmp_path: Path, count: int, size: int,
                                       reported: bool) -> None:
    """``count`` RWs of ``size`` bytes (frames 3…), never consumed, then the server's RST."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out)
    c.open()
    for _ in range(count):
        c.send(0, Op.RW, bytes(size))
    c.send(1, Op.RST)
    found = findings(tmp_path, out)
    small = of(found, "small-packet-reset")
    rst_frame = 3 + count
    if not reported:
        assert small == []
        assert [f.rule_id for f in of(found, "abrupt-close")] == ["abrupt-close/reset"]
        return
    (f,) = small
    assert (f.stream, f.frames) == (0, (rst_frame,))
    assert f.evidence == {"small_writes": count, "credit_left": 262144 - count * size,
                          "buf_alloc": 262144}
    assert of(found, "abrupt-close") == []  # explained: not also an abrupt close


def test_small_packet_reset_reads_the_credit_of_the_small_writes_direction(tmp_path: Path
                                                                            ) -> None:
    """The buffers differ (the client's 131072, the server's 262144); the server sends 50
    bytes the client reads, then the client's 64 RWs of 100 bytes (frames 5-68) and the
    server's RST: the credit left is the client's towards the server's buffer, 262144 - 6400,
    not the server's (131072 - 0)."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out, buf=[131072, 262144])
    c.open()
    c.data(1, bytes(50))
    for _ in range(64):
        c.send(0, Op.RW, bytes(100))
    c.send(1, Op.RST)
    (f,) = of(findings(tmp_path, out), "small-packet-reset")
    assert (f.frames, f.evidence) == ((69,), {"small_writes": 64, "credit_left": 262144 - 6400,
                                              "buf_alloc": 262144})


# -- abrupt-close/unread: bytes unconsumed for 10 ms at the reset (unread_grace_s) ------------


@pytest.mark.parametrize(("wait_ns", "reported"), [(10 * MS - 1, False), (10 * MS, True)])
def test_unread_data_counts_once_it_waited_ten_ms(tmp_path: Path, wait_ns: int,
                                                  reported: bool) -> None:
    """Frame 3: 500 bytes the server never reads; frame 4, the server's close (SHUTDOWN both
    ways, fwd_cnt 0), frame 5 the client's RST ``wait_ns`` after the bytes: the reset
    discards them."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out)
    c.open()
    c.send(0, Op.RW, b"x" * 500)
    c.send(1, Op.SHUTDOWN, flags=ShutdownFlag.RCV | ShutdownFlag.SEND, delay=wait_ns - 1000)
    c.send(0, Op.RST)
    found = of(findings(tmp_path, out), "abrupt-close")
    if not reported:
        assert found == []
        return
    (f,) = found
    assert (f.rule_id, f.frames) == ("abrupt-close/unread", (4, 5))
    assert f.evidence == {"rst_frame": 5, "client_unconsumed": 500}


def test_a_single_unread_byte_counts(tmp_path: Path) -> None:
    """As above with one byte, the reset 10 ms after it: one byte discarded."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out)
    c.open()
    c.send(0, Op.RW, b"x")
    c.send(1, Op.SHUTDOWN, flags=ShutdownFlag.RCV | ShutdownFlag.SEND, delay=10 * MS - 1000)
    c.send(0, Op.RST)
    (f,) = of(findings(tmp_path, out), "abrupt-close")
    assert (f.rule_id, f.evidence) == ("abrupt-close/unread",
                                       {"rst_frame": 5, "client_unconsumed": 1})


@pytest.mark.parametrize(("wait_ns", "reported"), [(5 * MS, False), (20 * MS, True)])
def test_unread_data_of_interleaved_connections_is_timed_per_connection(
        tmp_path: Path, wait_ns: int, reported: bool) -> None:
    """Two connections exchange 20 messages each, turn by turn (every RW read at once: nothing
    waits) and the second closes (frames 85-87); then, 300 ms later, the first sends 50 bytes
    and closes, and its server resets (frame 90) ``wait_ns`` after them: the bytes count as
    discarded from 10 ms on, whatever the other connection's packets around them (one batch
    holds both connections' rows)."""
    out: list[tuple[int, bytes]] = []
    a, b = Conv(out), Conv(out, client=(1, 50001))
    a.open()
    b.open()
    for _ in range(20):
        a.data(0, bytes(10))
        b.data(0, bytes(10))
    b.close()
    a.send(0, Op.RW, bytes(50), delay=300 * MS)
    a.send(0, Op.SHUTDOWN, flags=ShutdownFlag.RCV | ShutdownFlag.SEND)
    a.send(1, Op.RST, delay=wait_ns - 1000)
    found = findings(tmp_path, out)
    assert [(f.rule_id, f.stream, f.evidence) for f in found] == (
        [("abrupt-close/unread", 0, {"rst_frame": 90, "client_unconsumed": 50})]
        if reported else [])


# -- credit-violation: an RW beyond the free credit ------------------------------------------


def test_bytes_wait_from_when_they_were_sent_even_into_a_zero_buffer(tmp_path: Path) -> None:
    """The server reads the client's 100 bytes and announces it with buf_alloc 0 (frame 4:
    a known buffer of no bytes, not an unknown one); 300 ms later the client sends 50 more
    (frame 5, beyond that credit) and closes; the server's RST comes 5 ms after them. Nothing
    waited from frame 4 on: the 50 bytes waited 5 ms, under the 10 ms grace — not reported
    as discarded, only the credit violation."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out)
    c.open()
    c.send(0, Op.RW, bytes(100))
    c.fwd[1] += 100
    c.send(1, Op.CREDIT_UPDATE, buf=0)
    c.send(0, Op.RW, bytes(50), delay=300 * MS)
    c.send(0, Op.SHUTDOWN, flags=ShutdownFlag.RCV | ShutdownFlag.SEND)
    c.send(1, Op.RST, buf=0, delay=5 * MS)
    assert [(f.rule_id, f.frames) for f in findings(tmp_path, out)] == [
        ("credit-violation", (5,))]


@pytest.mark.parametrize(("size", "reported"), [(4096, False), (4097, True)])
def test_credit_violation_starts_one_byte_past_the_buffer(tmp_path: Path, size: int,
                                                          reported: bool) -> None:
    out: list[tuple[int, bytes]] = []
    c = Conv(out, buf=[262144, 4096])
    c.open()
    c.send(0, Op.RW, bytes(size))
    c.fwd[1] += size
    c.send(1, Op.CREDIT_UPDATE)
    c.close()
    found = of(findings(tmp_path, out), "credit-violation")
    if not reported:
        assert found == []
        return
    (f,) = found
    assert (f.stream, f.frames) == (0, (3,))
    assert f.evidence == {"packets": 1, "first_len": 4097, "credit_before": 4096,
                          "max_in_flight": 4097, "buf_alloc": 4096}


def test_seqpacket_record_boundaries_do_not_change_a_clean_diagnosis(tmp_path: Path) -> None:
    """A SEQPACKET exchange with EOM and EOR, closed by the server: nothing to report."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out, type_=SockType.SEQPACKET)
    c.open()
    c.data(0, b"one", flags=SeqFlag.EOM | SeqFlag.EOR)
    c.data(1, b"two", flags=SeqFlag.EOM)
    c.close(1)
    assert findings(tmp_path, out) == []


# -- credit-request-unanswered: 1 s without any answer to a CREDIT_REQUEST (credit_reply_s) ----


def _credit_request_answered_after(out: list[tuple[int, bytes]], wait_ns: int) -> Conv:
    """Frames 1-2 the handshake; 3 fills the server's 4096-byte buffer; 4 the client's
    CREDIT_REQUEST; 5, ``wait_ns`` later, the server's CREDIT_UPDATE that frees the window."""
    c = Conv(out, buf=[262144, 4096])
    c.open()
    c.send(0, Op.RW, bytes(4096))
    c.send(0, Op.CREDIT_REQUEST)
    c.fwd[1] += 4096
    c.send(1, Op.CREDIT_UPDATE, delay=wait_ns)
    return c


@pytest.mark.parametrize(("wait_ns", "reported"), [(S - 1, False), (S, True)])
def test_a_credit_request_unanswered_for_one_second(tmp_path: Path, wait_ns: int,
                                                    reported: bool) -> None:
    """Frame 3 fills the server's 4096-byte buffer; frame 4, the client's CREDIT_REQUEST;
    frame 5, ``wait_ns`` after it, the server's CREDIT_UPDATE frees the window. stall_s is
    raised to 10 s: only the unanswered request can report this stall."""
    out: list[tuple[int, bytes]] = []
    c = _credit_request_answered_after(out, wait_ns)
    c.close()
    found = findings(tmp_path, out, Thresholds(stall_s=10))
    if not reported:
        assert found == []
        return
    (f,) = found
    assert (f.rule_id, f.frames) == ("credit-request-unanswered", (3, 4, 5))
    assert (f.evidence["credit_request_frame"], f.evidence["unanswered_s"]) == (4, 1.0)


# -- cid-mismatch: which CID pairs cannot talk ------------------------------------------------


@pytest.mark.parametrize(("client", "server", "bad"), [
    (3, 5, True),             # two guests: neither is the host
    (1, 3, True),             # CID 1 (local loopback) talks only to itself
    (0, 2, True),             # CID 0 (the hypervisor) is VMCI only
    (2, 0xFFFFFFFF, True),    # VMADDR_CID_ANY is for bind() only
    (2, 1 << 32, True),       # no CID is wider than 32 bits
    (3, 2, False), (2, 3, False), (1, 1, False), (4, 4, False),
])
def test_cid_pairs_that_cannot_talk(tmp_path: Path, client: int, server: int,
                                    bad: bool) -> None:
    """A REQUEST and a RESPONSE between the two CIDs, then a Linux close: 5 packets."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out, client=(client, 50000), server=(server, 1024))
    c.open()
    c.close()
    found = of(findings(tmp_path, out), "cid-mismatch")
    if not bad:
        assert found == []
        return
    (f,) = found
    assert (f.rule_id, f.stream, f.frames) == ("cid-mismatch/not-host", 0, (1, 2, 3, 4, 5))
    assert f.evidence == {"packets": 5, "src_cid": client, "dst_cid": server}


def test_cid_mismatch_keeps_twenty_example_frames(tmp_path: Path) -> None:
    out: list[tuple[int, bytes]] = []
    c = Conv(out, client=(3, 50000), server=(5, 1024))
    for _ in range(25):
        c.send(0, Op.REQUEST)
    (f,) = of(findings(tmp_path, out), "cid-mismatch")
    assert (f.frames, f.evidence["packets"]) == (tuple(range(1, 21)), 25)


def test_an_answer_from_another_cid_than_the_one_dialled(tmp_path: Path) -> None:
    """The host dials 5:1234 from port 50000 (frame 1, stream 0) and gets no answer from CID 5;
    an RST from 7:999 to the host's port 40000 (frame 2, stream 1) answers nothing it asked;
    then a RESPONSE comes from CID 6 on the dialled ports (frame 3, stream 2): a guest that
    believes it is CID 6."""
    out: list[tuple[int, bytes]] = []
    Conv(out, client=(2, 50000), server=(5, 1234)).send(0, Op.REQUEST)
    Conv(out, client=(2, 40000), server=(7, 999)).send(1, Op.RST)
    Conv(out, client=(2, 50000), server=(6, 1234)).send(1, Op.RESPONSE)
    (f,) = of(findings(tmp_path, out), "cid-mismatch")
    assert (f.rule_id, f.stream, f.streams, f.frames) == ("cid-mismatch/reply-cid", 0, (0, 2),
                                                          (1, 3))
    assert f.evidence == {"dialled_cid": 5, "answering_cid": 6}
    assert f.message.startswith("The REQUEST went to CID 5 (frame 1), but the answer came from "
                                "CID 6 on the same ports (frame 3, stream 2).")


def test_a_stray_response_to_an_answered_request_is_no_reply_from_another_cid(
        tmp_path: Path) -> None:
    """5:1234 accepts the host's REQUEST (frames 1, 2); a RESPONSE from CID 6 on the same
    ports (frame 3) answers nothing that was still waiting."""
    out: list[tuple[int, bytes]] = []
    Conv(out, client=(2, 50000), server=(5, 1234)).open()
    Conv(out, client=(2, 50000), server=(6, 1234)).send(1, Op.RESPONSE)
    assert of(findings(tmp_path, out), "cid-mismatch") == []


def test_empty_writes_are_not_small_writes(tmp_path: Path) -> None:
    """64 RWs without payload, then the server's RST: no small-packet pattern (a zero-length
    RW carries no overhead complaint), just a reset without shutdown (frame 67)."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out)
    c.open()
    for _ in range(64):
        c.send(0, Op.RW)
    c.send(1, Op.RST)
    assert [(f.rule_id, f.frames) for f in findings(tmp_path, out)] == [
        ("abrupt-close/reset", (67,))]


def test_a_deadlock_that_ends_is_timed_to_the_first_window_that_reopens(tmp_path: Path
                                                                        ) -> None:
    """Frames 3 and 4 fill both 4096-byte buffers; frame 5, 1.23456 s after frame 4, the
    server consumes (CREDIT_UPDATE): the client's window reopens; frame 6, 0.5 s later, the
    client consumes; then a Linux close. Both were full from frame 4 to frame 5."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out, buf=[4096, 4096])
    c.open()
    c.send(0, Op.RW, bytes(4096))
    c.send(1, Op.RW, bytes(4096))
    c.fwd[1] += 4096
    c.send(1, Op.CREDIT_UPDATE, delay=1_234_560_000)
    c.fwd[0] += 4096
    c.send(0, Op.CREDIT_UPDATE, delay=S // 2)
    c.close()
    (f,) = findings(tmp_path, out)
    assert (f.rule_id, f.frames) == ("window-full/deadlock", (3, 4, 5, 6))
    assert f.evidence["seconds"] == 1.235  # 1.23456 s, to the ms
    assert "until frame 5" in f.message and "1.2 s" in f.message


# -- window-full in detail: which direction, how long, and when two stalls are a deadlock -----


def test_a_frozen_window_of_the_server_names_both_ends(tmp_path: Path) -> None:
    """The server's 4096-byte RW (frame 3) fills the client's 4096-byte buffer for 1.23456 s
    (frame 4: the client's CREDIT_UPDATE), then 5 s of another connection's traffic: the
    stall is timed to its end, not the capture's."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out, buf=[4096, 262144])
    c.open()
    c.send(1, Op.RW, bytes(4096))
    c.fwd[0] += 4096
    c.send(0, Op.CREDIT_UPDATE, delay=1_234_560_000)
    c.close()
    other = Conv(out, client=(1, 50001), server=(1, 5000))
    other.open()
    other.send(0, Op.RW, b"later", delay=5 * S)
    other.close()
    (f,) = of(findings(tmp_path, out), "window-full")
    assert (f.rule_id, f.stream, f.frames) == ("window-full/not-reading", 0, (3, 4))
    assert (f.evidence["sender"], f.evidence["receiver"]) == ("1:1234", "1:50000")
    assert f.evidence["seconds"] == 1.235  # 1.23456 s, to the ms
    assert f.message.startswith("server 1:1234 → 1:50000: 4096 bytes in flight")
    assert "frozen for 1.2 s (until frame 4)" in f.message


def test_seconds_in_words_below_one_second(tmp_path: Path) -> None:
    (f,) = findings(tmp_path, frozen_window(3 * S // 4), Thresholds(stall_s=0.5))
    assert "frozen for 750 ms (until frame 4)" in f.message


def two_full_windows(second_full_ns: int, first_free_ns: int, second_free_ns: int | None
                     ) -> list[tuple[int, bytes]]:
    """Both ends with 4096-byte buffers. Frame 3: the client fills the server's window;
    frame 4, ``second_full_ns`` later: the server fills the client's; frame 5,
    ``first_free_ns`` after frame 4: the client consumes (the server's window reopens); frame
    6, ``second_free_ns`` later, the server consumes (None: never, the capture ends)."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out, buf=[4096, 4096])
    c.open()
    c.send(0, Op.RW, bytes(4096))
    c.send(1, Op.RW, bytes(4096), delay=second_full_ns)
    c.fwd[0] += 4096
    c.send(0, Op.CREDIT_UPDATE, delay=first_free_ns)
    if second_free_ns is not None:
        c.fwd[1] += 4096
        c.send(1, Op.CREDIT_UPDATE, delay=second_free_ns)
        c.close()
    return out


@pytest.mark.parametrize(("overlap_ns", "deadlock"), [(S - 1, False), (S, True)])
def test_a_deadlock_needs_both_windows_full_for_one_second(tmp_path: Path, overlap_ns: int,
                                                           deadlock: bool) -> None:
    found = of(findings(tmp_path, two_full_windows(1000, overlap_ns, S // 2)), "window-full")
    if not deadlock:  # the server's window was full just under 1 s: only the client's
        assert [(f.rule_id, f.frames) for f in found] == [("window-full/not-reading", (3, 6))]
        return
    (f,) = found
    assert (f.rule_id, f.frames, f.evidence["seconds"]) == ("window-full/deadlock",
                                                            (3, 4, 5, 6), 1.0)
    assert "until frame 5" in f.message  # the first window to reopen


@pytest.mark.parametrize("first", [0, 1])
def test_stalls_that_overlap_briefly_are_not_a_deadlock(tmp_path: Path, first: int) -> None:
    """Frame 3 (t 0) side ``first`` fills its peer's window, frame 4 (0.7 s) the peer fills
    back; frame 5 (1.2 s) the peer consumes, frame 6 (1.9 s) ``first`` does: each window full
    1.2 s, both at once only 0.5 s — whichever side's stall is the one to end first (the
    client's with ``first`` 0, the server's with 1)."""
    other = 1 - first
    out: list[tuple[int, bytes]] = []
    c = Conv(out, buf=[4096, 4096])
    c.open()
    c.send(first, Op.RW, bytes(4096))
    c.send(other, Op.RW, bytes(4096), delay=7 * S // 10)
    c.fwd[other] += 4096
    c.send(other, Op.CREDIT_UPDATE, delay=S // 2)
    c.fwd[first] += 4096
    c.send(first, Op.CREDIT_UPDATE, delay=7 * S // 10)
    c.close()
    found = of(findings(tmp_path, out), "window-full")
    assert [(f.rule_id, f.frames, f.evidence["seconds"]) for f in found] == [
        ("window-full/not-reading", (3, 5), 1.2), ("window-full/not-reading", (4, 6), 1.2)]


def test_a_deadlock_one_side_of_which_ended_leaves_the_open_end_to_mid_capture(
        tmp_path: Path) -> None:
    """Both full for 1.5 s, then only the server's window reopens (frame 5); the client's
    stays full to the capture's end, which the deadlock does not explain."""
    found = findings(tmp_path, two_full_windows(1000, 3 * S // 2, None))
    assert sorted((f.rule_id, f.frames) for f in found) == [
        ("mid-capture/end", (5,)), ("window-full/deadlock", (3, 4, 5))]


def test_credit_request_never_answered_waits_until_the_capture_ends(tmp_path: Path) -> None:
    """Frame 3 fills the server's window, frame 4 asks for credit; the server sends nothing
    more; another connection's REQUEST (frame 5) ends the capture 1.23456 s later."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out, buf=[262144, 4096])
    c.open()
    c.send(0, Op.RW, bytes(4096))
    c.send(0, Op.CREDIT_REQUEST)
    Conv(out, client=(1, 50001), server=(1, 5000)).send(0, Op.REQUEST, delay=1_234_560_000)
    (f,) = of(findings(tmp_path, out, Thresholds(stall_s=10)), "credit-request-unanswered")
    assert (f.rule_id, f.frames) == ("credit-request-unanswered", (3, 4))
    assert of(findings(tmp_path, out), "window-full") == []  # one stall, one cause
    assert f.evidence["unanswered_s"] == 1.235


def test_a_peer_that_answers_a_credit_request_is_not_unanswered(tmp_path: Path) -> None:
    """Frame 3 fills the server's window; frame 4 asks for credit; frame 5 (0.2 s later)
    the server answers with a packet that frees nothing; the client sends a packet of its own
    at 0.3 s (frame 6: not a request); frame 7 (1.5 s) another answer; frame 8 (2.2 s) the
    server's CREDIT_UPDATE. Answered at once: a receiver not reading, not a transport bug."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out, buf=[262144, 4096])
    c.open()
    c.send(0, Op.RW, bytes(4096))
    c.send(0, Op.CREDIT_REQUEST)
    c.send(1, Op.CREDIT_UPDATE, delay=S // 5)
    c.send(0, Op.CREDIT_UPDATE, delay=S // 10)
    c.send(1, Op.CREDIT_UPDATE, delay=6 * S // 5)
    c.fwd[1] += 4096
    c.send(1, Op.CREDIT_UPDATE, delay=7 * S // 10)
    c.close()
    (f,) = of(findings(tmp_path, out), "window-full")
    assert (f.rule_id, f.frames) == ("window-full/not-reading", (3, 8))


@pytest.mark.parametrize(("rst_fwd", "rst_buf", "unconsumed"), [
    (500, 262144, None),  # the receiver's RST says it read all 500 bytes
    (400, 262144, 100),   # it read 400: 100 discarded
    (500, 0, 500),        # an RST with buf_alloc 0 carries no credit: its fwd_cnt says nothing
    (1, 262144, 499),     # it read 1 byte: one is enough to count
    (600, 262144, None),  # it claims more than was sent: nothing is shown discarded
    ((1 << 31) - 1, 262144, None),  # u32 counters: up to 2^31 - 1 ahead is newer (more read)
    (1 << 31, 262144, 500),  # 2^31 ahead is as far behind: an old count, nothing read
])
def test_the_receivers_rst_tells_what_it_read(tmp_path: Path, rst_fwd: int, rst_buf: int,
                                              unconsumed: int | None) -> None:
    """Frame 3: the client's 500 bytes; frame 4 its close (SHUTDOWN both ways); frame 5, 200
    ms later, the server's RST with the fwd_cnt and buf_alloc given (Linux's RST carries its
    counters: the server's last word on what it consumed)."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out)
    c.open()
    c.send(0, Op.RW, b"x" * 500)
    c.send(0, Op.SHUTDOWN, flags=ShutdownFlag.RCV | ShutdownFlag.SEND)
    c.send(1, Op.RST, fwd=rst_fwd, buf=rst_buf, delay=200 * MS)
    found = findings(tmp_path, out)
    if unconsumed is None:
        assert found == []
        return
    (f,) = found
    assert (f.rule_id, f.frames) == ("abrupt-close/unread", (5,))
    assert f.evidence == {"rst_frame": 5, "client_unconsumed": unconsumed}


def test_the_receivers_rst_is_read_across_the_u32_wrap_of_fwd_cnt(tmp_path: Path) -> None:
    """The server's buffer is 2³¹ bytes. Two RWs of 2³¹ - 25 bytes each (their header's len;
    the payload is not captured), each read and announced (CREDIT_UPDATE: fwd_cnt 2³² - 50 in
    the end, frame 6); then 500 bytes (frame 7), the client's close (frame 8), and the
    server's RST 200 ms later, its fwd_cnt 100 bytes further: 50 once wrapped past 2³². It
    read 100 of the 500: 400 were discarded."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out, buf=[262144, 1 << 31])
    c.open()
    chunk = (1 << 31) - 25
    for _ in range(2):
        out.append((out[-1][0] + 1000, frame(Op.RW, src=c.client, dst=c.server,
                                              buf_alloc=262144, length=chunk)))
        c.fwd[1] += chunk
        c.send(1, Op.CREDIT_UPDATE)
    assert c.fwd[1] == (1 << 32) - 50
    c.send(0, Op.RW, b"x" * 500)
    c.send(0, Op.SHUTDOWN, flags=ShutdownFlag.RCV | ShutdownFlag.SEND)
    c.send(1, Op.RST, fwd=c.fwd[1] + 100, delay=200 * MS)
    assert out[-1][1][-4:] == (50).to_bytes(4, "little")  # the RST's fwd_cnt, wrapped
    (f,) = of(findings(tmp_path, out), "abrupt-close")
    assert (f.rule_id, f.frames) == ("abrupt-close/unread", (9,))
    assert f.evidence == {"rst_frame": 9, "client_unconsumed": 400}


@pytest.mark.parametrize(("unread", "reported"), [((1 << 31) - 1, True), (1 << 31, False)])
def test_unread_bytes_are_a_u32_difference_below_half_its_range(tmp_path: Path, unread: int,
                                                               reported: bool) -> None:
    """One RW of ``unread`` bytes (header len; a 2³¹-byte buffer holds it), never read: the
    client closes, the server's RST 200 ms later still says fwd_cnt 0. Bytes sent minus
    fwd_cnt is a difference of u32 counters: below 2³¹ it is what is left unread, from 2³¹
    on it reads as fwd_cnt being ahead (the receiver claims more than was sent), so nothing
    is shown discarded."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out, buf=[262144, 1 << 31])
    c.open()
    out.append((out[-1][0] + 1000, frame(Op.RW, src=c.client, dst=c.server, buf_alloc=262144,
                                          length=unread)))
    c.send(0, Op.SHUTDOWN, flags=ShutdownFlag.RCV | ShutdownFlag.SEND)
    c.send(1, Op.RST, delay=200 * MS)
    found = of(findings(tmp_path, out), "abrupt-close")
    assert [f.evidence for f in found] == ([{"rst_frame": 5, "client_unconsumed": unread}]
                                           if reported else [])


@pytest.mark.parametrize(("delay_ns", "text"), [(999_000, "999 µs"), (1_000_000, "1.0 ms"),
                                                (2_460_000, "2.5 ms")])
def test_rst_delay_in_words(tmp_path: Path, delay_ns: int, text: str) -> None:
    out: list[tuple[int, bytes]] = []
    c = Conv(out, client=(3, 50000), server=(2, 1024))
    c.send(0, Op.REQUEST)
    c.send(1, Op.RST, buf=0, delay=delay_ns)
    (f,) = findings(tmp_path, out)
    assert f.message.endswith(f"was refused by an RST within {text}.")


def test_a_deadlocks_length_is_given_to_the_millisecond(tmp_path: Path) -> None:
    """Both windows full together for 1.0015 s: 1.002 s in the evidence (ms, rounded up)."""
    found = of(findings(tmp_path, two_full_windows(1000, S + 1_500_000, S // 2)),
               "window-full")
    (f,) = found
    assert (f.rule_id, f.evidence["seconds"]) == ("window-full/deadlock", 1.002)


# -- answers to a CREDIT_REQUEST, an accept queue's witness, delays in words ------------------


def test_a_late_answer_to_a_credit_request_is_timed_to_the_answer(tmp_path: Path) -> None:
    """Frame 3 fills the server's 4096 bytes, frame 4 asks for credit, frame 5 answers
    1.0015 s later (a CREDIT_UPDATE that frees the window); the close comes 3 s after that.
    The request went unanswered for 1.0015 s (1.002 in ms, rounded up), not until the
    capture's end (4 s). stall_s is
    raised to 10 s: only the unanswered request reports this stall."""
    out: list[tuple[int, bytes]] = []
    c = _credit_request_answered_after(out, 1_001_500_000)
    c.send(0, Op.SHUTDOWN, flags=ShutdownFlag.RCV | ShutdownFlag.SEND, delay=3000 * MS)
    c.send(1, Op.RST)
    (f,) = findings(tmp_path, out, Thresholds(stall_s=10))
    assert (f.rule_id, f.frames) == ("credit-request-unanswered", (3, 4, 5))
    assert f.evidence["unanswered_s"] == 1.002 and "nothing for 1.0 s" in f.message



@pytest.mark.parametrize(("speaker", "kind"), [(0, "credit-request-unanswered"),
                                               (1, "window-full/not-reading")])
def test_only_the_peer_can_answer_a_credit_request(tmp_path: Path, speaker: int,
                                                   kind: str) -> None:
    """Frame 3 fills the server's 4096 bytes, frame 4 is the client's CREDIT_REQUEST, 1 ms
    later a CREDIT_UPDATE about the *client's* buffer from ``speaker``, which frees nothing;
    another connection's packet ends the capture 2 s after the request. The client's own
    packet answers nothing: the request stays unanswered for the full 2 s. A packet from
    the server is its answer (the server is alive, its application just does not read): the
    stall is a receiver that stopped reading."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out, buf=[262144, 4096])
    c.open()
    c.send(0, Op.RW, bytes(4096))
    c.send(0, Op.CREDIT_REQUEST)
    c.send(speaker, Op.CREDIT_UPDATE, delay=MS)
    Conv(out, client=(1, 60000)).send(0, Op.REQUEST, delay=2000 * MS - MS)
    (f,) = [f for f in findings(tmp_path, out)
            if f.rule in ("window-full", "credit-request-unanswered")]
    assert f.rule_id == kind
    if speaker == 0:
        assert f.evidence["unanswered_s"] == 2.0


def test_an_accept_queue_overflow_names_the_connection_still_waiting(tmp_path: Path) -> None:
    """Stream 0 is accepted (frames 1, 2) and stays open; 3 ms after its RESPONSE, stream 1's
    REQUEST to the same port (frame 3) is refused by an RST (frame 4): the port listens but
    its queue was full. The finding names stream 0 and says how long before it was
    accepted."""
    out: list[tuple[int, bytes]] = []
    Conv(out).open()
    refused = Conv(out, client=(1, 50001))
    refused.send(0, Op.REQUEST, delay=3 * MS)
    refused.send(1, Op.RST, buf=0)
    (f,) = [f for f in findings(tmp_path, out) if f.severity >= Severity.WARNING]
    assert (f.rule, f.stream, f.frames) == ("accept-queue-full", 1, (2, 3, 4))
    assert f.evidence["accepted_stream"] == 0
    assert "accepted stream 0 (RESPONSE at frame 2, 3.0 ms earlier, still open)" in f.message


@pytest.mark.parametrize(("ns", "text"), [(999_999, "1000 µs"), (1_000_000, "1.0 ms"),
                                          (1_050_001, "1.1 ms"), (71_000, "71 µs"),
                                          (None, "?")])
def test_a_delay_in_words(ns: int | None, text: str) -> None:
    """Microseconds below a millisecond, then milliseconds to one decimal (1.050001 ms
    rounds up); an unknown delay is a question mark."""
    assert delay_text(ns) == text


def test_the_rst_delay_is_given_to_the_microsecond(tmp_path: Path) -> None:
    """An RST 1.5 µs after the REQUEST: 0.0015 ms, given in ms to three decimals (the µs)
    and rounded up, 0.002."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out)
    c.send(0, Op.REQUEST)
    c.send(1, Op.RST, buf=0, delay=1500)
    (f,) = findings(tmp_path, out)
    assert (f.rule, f.evidence["rst_delay_ms"]) == ("no-listener", 0.002)


def test_a_connect_the_client_gave_up_on_is_a_failed_attempt(tmp_path: Path) -> None:
    """Three REQUESTs to 1:1234, 1 s apart, each unanswered until its client resets it (the
    connect() timed out): three failed attempts, a retry loop (frames 1, 3, 5)."""
    out: list[tuple[int, bytes]] = []
    for i in range(3):
        c = Conv(out, client=(1, 50000 + i))
        c.send(0, Op.REQUEST, delay=S)
        c.send(0, Op.RST, delay=MS)
    (f,) = of(findings(tmp_path, out), "dial-retry")
    assert (f.frames, f.evidence["attempts"]) == ((1, 3, 5), 3)
    assert "none connected" in f.message


def test_connections_reset_after_they_were_accepted_are_not_retries(tmp_path: Path) -> None:
    """Three connections to 1:1234, each accepted (RESPONSE) and then reset by its client:
    they connected, so they are no retry loop (each is an abrupt close)."""
    out: list[tuple[int, bytes]] = []
    for i in range(3):
        c = Conv(out, client=(1, 50000 + i))
        c.send(0, Op.REQUEST, delay=S)
        c.send(1, Op.RESPONSE)
        c.send(0, Op.RST)
    found = findings(tmp_path, out)
    assert of(found, "dial-retry") == []
    assert [f.rule_id for f in found] == ["abrupt-close/reset"] * 3


@pytest.mark.parametrize(("gap_ns", "rule"), [(2 * S, "accept-queue-full"),
                                              (2 * S + 1, "no-listener")])
def test_an_accept_queue_witness_is_at_most_two_seconds_old(tmp_path: Path, gap_ns: int,
                                                            rule: str) -> None:
    """Stream 0 accepted at frame 2 and left open; stream 1's REQUEST ``gap_ns`` later is
    refused: within accept_queue_s (2 s) the open connection shows the port listens."""
    out: list[tuple[int, bytes]] = []
    Conv(out).open()
    refused = Conv(out, client=(1, 50001))
    refused.send(0, Op.REQUEST, delay=gap_ns)
    refused.send(1, Op.RST, buf=0)
    assert [f.rule for f in findings(tmp_path, out) if f.severity >= Severity.WARNING] == [rule]


def test_the_witness_is_the_latest_accepted_connection_still_open(tmp_path: Path) -> None:
    """Stream 0 accepted and still open; stream 1 accepted after it and closed; then stream
    2 is refused: the closed one is skipped, stream 0 (frame 2) shows the queue was full."""
    out: list[tuple[int, bytes]] = []
    Conv(out).open()
    closed = Conv(out, client=(1, 50001))
    closed.open()
    closed.close()
    refused = Conv(out, client=(1, 50002))
    refused.send(0, Op.REQUEST)
    refused.send(1, Op.RST, buf=0)
    (f,) = [f for f in findings(tmp_path, out) if f.severity >= Severity.WARNING]
    assert (f.rule, f.stream, f.evidence["accepted_stream"]) == ("accept-queue-full", 2, 0)
    assert f.frames == (2, 8, 9)


def test_the_witness_is_the_connection_accepted_last_not_the_one_that_dialled_last(
        tmp_path: Path) -> None:
    """Stream 0 dials (frame 1), stream 1 dials (frame 2) and is accepted (frame 3), then
    stream 0 is (frame 4); both stay open; stream 2 is refused (frames 5, 6). The latest
    RESPONSE is stream 0's: it is the witness."""
    out: list[tuple[int, bytes]] = []
    first, second = Conv(out), Conv(out, client=(1, 50001))
    first.send(0, Op.REQUEST)
    second.open()
    first.send(1, Op.RESPONSE)
    refused = Conv(out, client=(1, 50002))
    refused.send(0, Op.REQUEST)
    refused.send(1, Op.RST, buf=0)
    (f,) = [f for f in findings(tmp_path, out) if f.severity >= Severity.WARNING]
    assert (f.rule, f.stream, f.evidence["accepted_stream"]) == ("accept-queue-full", 2, 0)
    assert f.frames == (4, 5, 6)


@pytest.mark.parametrize(("rst_fwd", "unconsumed"), [(300, None), (100, 200)])
def test_the_clients_rst_tells_what_it_read_of_the_servers_data(
        tmp_path: Path, rst_fwd: int, unconsumed: int | None) -> None:
    """The other direction: frame 3, the server's 300 bytes; frame 4, the server's close
    (SHUTDOWN both ways); frame 5, 200 ms later, the client's RST with its fwd_cnt."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out)
    c.open()
    c.send(1, Op.RW, b"y" * 300)
    c.send(1, Op.SHUTDOWN, flags=ShutdownFlag.RCV | ShutdownFlag.SEND)
    c.send(0, Op.RST, fwd=rst_fwd, delay=200 * MS)
    found = findings(tmp_path, out)
    if unconsumed is None:
        assert found == []
        return
    (f,) = found
    assert (f.rule_id, f.evidence) == ("abrupt-close/unread",
                                       {"rst_frame": 5, "server_unconsumed": unconsumed})


def test_unread_data_is_not_claimed_when_the_connections_start_was_not_captured(
        tmp_path: Path) -> None:
    """Captured mid-connection: the server's fwd_cnt of 0 may count from anywhere, so 500
    bytes seemingly unread at the close prove nothing; only the missing start is reported."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out)
    c.send(1, Op.CREDIT_UPDATE)
    c.send(0, Op.RW, b"x" * 500)
    c.send(1, Op.SHUTDOWN, flags=3, delay=200 * MS)
    c.send(0, Op.RST)
    assert [f.rule_id for f in findings(tmp_path, out)] == ["mid-capture/start"]


def test_a_retry_loop_that_connects_in_the_end(tmp_path: Path) -> None:
    """Two refusals, then the third attempt (frame 5) is accepted: requests 0.675 s apart,
    1.35 s from first to last (1.4 s in words). The loop is reported on its first stream,
    with the two failures and the attempt that connected."""
    out: list[tuple[int, bytes]] = []
    for i in range(3):
        c = Conv(out, client=(1, 50000 + i))
        c.send(0, Op.REQUEST, delay=1000 if i == 0 else 675 * MS - 1000)
        if i < 2:
            c.send(1, Op.RST, buf=0)
        else:
            c.send(1, Op.RESPONSE)
    (f,) = of(findings(tmp_path, out), "dial-retry")
    assert (f.stream, f.streams, f.frames, f.evidence["attempts"]) == (0, (0, 1, 2),
                                                                       (1, 3, 5), 3)
    assert f.connection == "1:50000 → 1:1234 STREAM"  # the first attempt's
    assert ("dialled 1:1234 3 times in 1.4 s (2 refused); the attempt at frame 5 connected."
            in f.message)


def test_a_retry_loop_of_failures_of_two_kinds(tmp_path: Path) -> None:
    """Refused, given up by the client (its RST), refused again, 1 s apart: none connected,
    the failures named by their close (docs/analysis.md's names), in order of the name."""
    out: list[tuple[int, bytes]] = []
    for i, (side, buf) in enumerate(((1, 0), (0, 262144), (1, 0))):
        c = Conv(out, client=(1, 50000 + i))
        c.send(0, Op.REQUEST, delay=S)
        c.send(side, Op.RST, buf=buf)
    (f,) = of(findings(tmp_path, out), "dial-retry")
    assert "3 times in 2.0 s (3 refused/reset-by-client); none connected." in f.message


def test_a_last_attempt_never_answered_did_not_connect(tmp_path: Path) -> None:
    """Two refusals, then a third REQUEST (frame 5) that nobody answers before its client
    shuts it down (frame 6): no RESPONSE, so the loop ends with none connected, all three
    attempts failures (the last one still closing at the capture's end)."""
    out: list[tuple[int, bytes]] = []
    for i in range(3):
        c = Conv(out, client=(1, 50000 + i))
        c.send(0, Op.REQUEST, delay=S)
        if i < 2:
            c.send(1, Op.RST, buf=0)
        else:
            c.send(0, Op.SHUTDOWN, flags=ShutdownFlag.RCV | ShutdownFlag.SEND)
    (f,) = of(findings(tmp_path, out), "dial-retry")
    assert (f.evidence["failures"], f.evidence["connected"]) == (3, False)
    assert "3 times in 2.0 s (3 closing/refused); none connected." in f.message


def test_a_retry_loops_span_is_given_to_the_millisecond(tmp_path: Path) -> None:
    """Three refusals 0.617222222 s apart: 1.234444444 s from the first REQUEST to the last,
    1.234 in the evidence."""
    (f,) = of(findings(tmp_path, refusals(3, 617_222_222)), "dial-retry")
    assert f.evidence["span_s"] == 1.234


def test_one_byte_writes_of_the_server_on_a_second_connection_are_small(tmp_path: Path
                                                                        ) -> None:
    """Stream 0 is opened and left alone; on stream 1 the *server* writes 64 single bytes
    (frames 5-68, never consumed) and the client resets (frame 69): the pattern is counted
    for that stream and that sender."""
    out: list[tuple[int, bytes]] = []
    Conv(out).open()
    c = Conv(out, client=(1, 50001))
    c.open()
    for _ in range(64):
        c.send(1, Op.RW, b"x")
    c.send(0, Op.RST)
    (f,) = of(findings(tmp_path, out), "small-packet-reset")
    assert (f.stream, f.frames) == (1, (69,))
    assert f.evidence == {"small_writes": 64, "credit_left": 262144 - 64, "buf_alloc": 262144}


def test_small_writes_are_counted_per_stream_and_sender(tmp_path: Path) -> None:
    """Streams 0 and 1 are opened and left alone; on stream 2 the *client* writes 64 single
    bytes (frames 7-70) and the server resets (frame 71): counted for stream 2's client,
    reported there."""
    out: list[tuple[int, bytes]] = []
    Conv(out).open()
    Conv(out, client=(1, 50001)).open()
    c = Conv(out, client=(1, 50002))
    c.open()
    for _ in range(64):
        c.send(0, Op.RW, b"x")
    c.send(1, Op.RST)
    (f,) = of(findings(tmp_path, out), "small-packet-reset")
    assert (f.stream, f.frames, f.evidence["small_writes"]) == (2, (71,), 64)


# -- transport-reset: one CID forgets two or more connections at once ------------------------


def forgotten(count: int, heard_between: bool = False, buf: int = 0) -> list[tuple[int, bytes]]:
    """``count`` connections 2:5000x → 3:1234, each open with one echoed RW (frames 4k+1 to
    4k+4); then, in turn, the client's RW and the guest's RST (buf_alloc ``buf``, fwd_cnt 0).
    ``heard_between``: the guest sends an RW on the second connection (and gets a credit
    update) after the first RST, so it still knew that one then."""
    out: list[tuple[int, bytes]] = []
    convs = [Conv(out, client=(2, 50000 + i), server=(3, 1234)) for i in range(count)]
    for c in convs:
        c.open()
        c.data(0, b"ping")
    for i, c in enumerate(convs):
        if heard_between and i == 1:
            c.data(1, b"still here")
        c.send(0, Op.RW, b"after the restore")
        c.send(1, Op.RST, buf=buf, fwd=0)
    return out


@pytest.mark.parametrize("count", [1, 2, 3])
def test_transport_reset_needs_two_forgotten_connections(tmp_path: Path, count: int) -> None:
    found = findings(tmp_path, forgotten(count))
    rsts = tuple(4 * count + 2 * i + 2 for i in range(count))  # after each client RW
    if count < 2:
        assert of(found, "transport-reset") == []
        assert [(f.rule_id, f.frames) for f in of(found, "abrupt-close")] == [
            ("abrupt-close/reset", rsts)]
        return
    (f,) = of(found, "transport-reset")
    assert (f.stream, f.streams, f.frames) == (0, tuple(range(count)), rsts)
    assert (f.evidence["cid"], f.evidence["connections"]) == (3, count)
    # the guest's last RW or control packet: the last connection's RESPONSE (credit updates
    # aside, and it sent no RW)
    assert f.evidence["last_heard_frame"] == 4 * count - 2
    assert of(found, "abrupt-close") == []  # explained


def test_transport_reset_count_is_an_option(tmp_path: Path) -> None:
    found = findings(tmp_path, forgotten(2), Thresholds(transport_reset_count=3))
    assert of(found, "transport-reset") == []


def test_a_connection_heard_after_the_first_reset_was_not_lost_with_it(tmp_path: Path) -> None:
    """The guest spoke on the second connection (frame 11) after its RST on the first
    (frame 10): two separate losses, one connection each — no transport reset."""
    found = findings(tmp_path, forgotten(2, heard_between=True))
    assert of(found, "transport-reset") == []
    assert [f.frames for f in of(found, "abrupt-close")] == [(10,), (14,)]


def test_resets_that_carry_a_buffer_are_not_a_forgotten_transport(tmp_path: Path) -> None:
    """An RST with buf_alloc set comes from a socket that still exists (an application's
    reset), not from a kernel that lost the connection."""
    assert of(findings(tmp_path, forgotten(3, buf=262144)), "transport-reset") == []


# -- stale-rst: an RST whose fwd_cnt counts bytes the new connection never carried -------------


@pytest.mark.parametrize(("fwd", "reported"), [(10, False), (11, True)])
def test_stale_rst_acknowledges_more_than_was_sent(tmp_path: Path, fwd: int,
                                                   reported: bool) -> None:
    """Stream 0: 3:50070 → 2:1024, 15 bytes consumed, a Linux close (frames 1-7); stream 1
    on the same ports: REQUEST 8, RESPONSE 9, 10 bytes from the client (frame 10), then the
    server's RST (frame 11) with fwd_cnt ``fwd``: 11 counts a byte stream 1 never carried."""
    out: list[tuple[int, bytes]] = []
    old = Conv(out, client=(3, 50070), server=(2, 1024))
    old.open()
    old.data(0, bytes(15))
    old.close()
    new = Conv(out, client=(3, 50070), server=(2, 1024))
    new.open()
    new.send(0, Op.RW, bytes(10))
    new.send(1, Op.RST, fwd=fwd)
    found = findings(tmp_path, out)
    stale = of(found, "stale-rst")
    if not reported:
        assert stale == []
        assert [(f.rule_id, f.stream) for f in of(found, "abrupt-close")] == [
            ("abrupt-close/reset", 1)]
        return
    (f,) = stale
    assert (f.stream, f.streams, f.frames) == (1, (1, 0), (7, 9, 11))
    assert (f.evidence["rst_fwd_cnt"], f.evidence["peer_sent"]) == (11, 10)
    assert of(found, "abrupt-close") == []


def test_stale_rst_needs_an_earlier_connection_on_the_pair(tmp_path: Path) -> None:
    out: list[tuple[int, bytes]] = []
    c = Conv(out, client=(3, 50070), server=(2, 1024))
    c.open()
    c.send(1, Op.RST, fwd=15)
    assert of(findings(tmp_path, out), "stale-rst") == []


def test_a_transport_resets_length_runs_from_its_first_rst_to_its_last(tmp_path: Path) -> None:
    """Three forgotten connections; the client's RWs before the second and third RSTs come
    0.5 s and 0.7345 s late, each RST 1 µs after its RW: from the first RST to the last is
    1.234500001 s, 1.235 in the evidence (rounded to the ms; the last RST, not the second,
    ends it)."""
    out: list[tuple[int, bytes]] = []
    convs = [Conv(out, client=(2, 50000 + i), server=(3, 1234)) for i in range(3)]
    for c in convs:
        c.open()
    for c, late in zip(convs, (1000, 500 * MS - 1000, 734_500_001 - 1000), strict=True):
        c.send(0, Op.RW, b"after the restore", delay=late)
        c.send(1, Op.RST, buf=0, fwd=0)
    (f,) = of(findings(tmp_path, out), "transport-reset")
    assert (f.frames, f.evidence["connections"]) == ((8, 10, 12), 3)
    assert f.evidence["seconds"] == 1.235


def test_a_cid_that_sent_nothing_before_its_resets_was_last_heard_at_no_frame(
        tmp_path: Path) -> None:
    """Two connections captured from the server's RESPONSE (frames 1, 2): the guest (the
    client, CID 3) sent nothing on them before its RSTs with buf_alloc 0 (frames 4, 6), so no
    frame of it precedes them: 0."""
    out: list[tuple[int, bytes]] = []
    convs = [Conv(out, client=(3, 50000 + i), server=(2, 1234)) for i in range(2)]
    for c in convs:
        c.send(1, Op.RESPONSE)
    for c in convs:
        c.send(1, Op.RW, b"hi")
        c.send(0, Op.RST, buf=0)
    (f,) = of(findings(tmp_path, out), "transport-reset")
    assert (f.streams, f.frames, f.evidence["cid"]) == ((0, 1), (4, 6), 3)
    assert f.evidence["last_heard_frame"] == 0


@pytest.mark.parametrize(("ahead", "reported"), [
    (-1, False),         # the RST acknowledges one byte less than was sent: behind, normal
    ((1 << 31) - 1, True),  # the most a u32 fwd_cnt can be ahead of the bytes sent
    (1 << 31, False),    # half the u32 space ahead is as far behind: not ahead
])
def test_stale_rst_reads_fwd_cnt_as_a_wrapping_u32(tmp_path: Path, ahead: int,
                                                   reported: bool) -> None:
    """As above (10 bytes sent on stream 1), the server's RST acknowledging ``10 + ahead``
    bytes modulo 2³²: counters that wrap are ahead by less than half their range, behind
    otherwise."""
    out: list[tuple[int, bytes]] = []
    old = Conv(out, client=(3, 50070), server=(2, 1024))
    old.open()
    old.data(0, bytes(15))
    old.close()
    new = Conv(out, client=(3, 50070), server=(2, 1024))
    new.open()
    new.send(0, Op.RW, bytes(10))
    new.send(1, Op.RST, fwd=10 + ahead)
    stale = of(findings(tmp_path, out), "stale-rst")
    assert [f.evidence["rst_fwd_cnt"] for f in stale] == ([(10 + ahead) % (1 << 32)]
                                                          if reported else [])
