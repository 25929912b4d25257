"""Live capture without a vsockmon kernel: the reading loop, writing, rotation, signals and
kills through a socketpair that stands in for the packet socket; the TPACKET_V3 ring on the
host's loopback interface (a real kernel ring, other frames); the CLI's refusals."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import suppress
from pathlib import Path

import pytest

from tests.helpers import frame
from vsockmon.live import capture
from vsockmon.live.bpf import FrameFilter
from vsockmon.live.capture import (
    CaptureStats,
    FileSink,
    LineSink,
    LiveBatch,
    LiveCapture,
    LiveCaptureError,
    LiveFrame,
    format_frame,
    run,
)
from vsockmon.wire import pcapio
from vsockmon.wire.pcapio import open_capture
from vsockmon.wire.protocol import MON_HDR_LEN, VIRTIO_HDR_LEN, VIRTIO_HEADER, Op, SockType

ROOT = Path(__file__).resolve().parents[1]
VSOCKMON = str(Path(sys.executable).with_name("vsockmon"))


def _frames(n: int) -> list[bytes]:
    return [frame(Op.RW, bytes([i % 256]) * (i % 300), src=(3, 1000 + i)) for i in range(n)]


def _feed(tx: socket.socket, frames: list[bytes]) -> threading.Thread:
    def send() -> None:
        with suppress(OSError):  # the capture may stop (and tx close) before the last one
            for f in frames:
                tx.send(f)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    return t


def _capture_pair(frames: list[bytes], sink: object, count: int) -> CaptureStats:
    rx, tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    stats = CaptureStats()
    with tx, LiveCapture(sock=rx) as live:
        _feed(tx, frames)
        live.deadline = time.monotonic() + 20
        assert run(live, sink, stats, count=count) == "count"  # type: ignore[arg-type]
    return stats


@pytest.mark.parametrize("name", ["t.pcap", "t.pcapng"])
def test_frames_are_written_whole_and_in_order(tmp_path: Path, name: str) -> None:
    frames = _frames(700)
    sink = FileSink(str(tmp_path / name))
    stats = _capture_pair(frames, sink, count=700)
    sink.close()
    with open_capture(str(tmp_path / name)) as reader:
        records = list(reader.records())
        assert reader.format == name.split(".")[1] and reader.stopped is None
    assert [r.data for r in records] == frames
    assert [r.orig_len for r in records] == [len(f) for f in frames]
    assert stats.packets == 700 and stats.bytes == sum(map(len, frames))
    assert stats.op_counts() == {"RW": 700}


def test_count_stops_mid_batch(tmp_path: Path) -> None:
    sink = FileSink(str(tmp_path / "t.pcap"))
    _capture_pair(_frames(50), sink, count=7)
    sink.close()
    with open_capture(str(tmp_path / "t.pcap")) as reader:
        assert len(list(reader.records())) == 7


@pytest.mark.parametrize("name", ["ring.pcap", "ring.pcapng"])
def test_ring_of_files_keeps_the_newest_frames(tmp_path: Path, name: str) -> None:
    frames = [frame(Op.RW, bytes([i]) * 100, src=(3, i)) for i in range(60)]  # 176 B each
    # 950: a pcapng file holds 4 frames (924 bytes) only without its closing block (40)
    sink = FileSink(str(tmp_path / name), rotate_bytes=950, files=3)
    for i in range(0, 60, 4):  # several batches, rotating inside some of them
        sink.write(LiveBatch.of_frames((LiveFrame(i + k, f, len(f))
                                        for k, f in enumerate(frames[i:i + 4])),
                                       sink.record_format))
    sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.{i}" for i in range(3)]
    kept = []
    for i in range(3):
        path = tmp_path / f"{name}.{i}"
        assert path.stat().st_size <= 950  # a pcapng file's closing block included
        with open_capture(str(path)) as reader:
            kept.append([r.data for r in reader.records()])
            # each pcapng file says when it was closed: after its frames' times
            assert (reader.capture_end_ns is not None) == name.endswith(".pcapng")
    # the file written last is the newest; the one after it in the ring the oldest
    newest = sink.index
    order = [kept[(newest + 1 + k) % 3] for k in range(3)]
    flat = [d for part in order for d in part]
    assert flat == frames[-len(flat):] and len(flat) >= 9


def test_size_rotation_without_a_ring_numbers_files_on(tmp_path: Path) -> None:
    sink = FileSink(str(tmp_path / "c.pcap"), rotate_bytes=250)
    sink.write(LiveBatch.of_frames(LiveFrame(i, f, len(f)) for i, f in enumerate(_frames(12))))
    sink.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) > 3 and names[0] == "c.pcap.0" and "c.pcap" not in names


def test_existing_files_are_refused_without_force(tmp_path: Path) -> None:
    (tmp_path / "t.pcap").write_bytes(b"keep")
    with pytest.raises(LiveCaptureError, match=r"t\.pcap: exists; use --force"):
        FileSink(str(tmp_path / "t.pcap"))
    (tmp_path / "r.pcap.1").write_bytes(b"keep")
    with pytest.raises(LiveCaptureError, match=r"r.pcap.1: exists"):
        FileSink(str(tmp_path / "r.pcap"), rotate_bytes=1000, files=2)
    assert (tmp_path / "t.pcap").read_bytes() == b"keep"
    FileSink(str(tmp_path / "t.pcap"), force=True).close()
    assert (tmp_path / "t.pcap").read_bytes() != b"keep"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"path": "x.pcap", "files": 3}, "needs a file size"),
        ({"path": "-", "rotate_bytes": 10}, "stdout"),
        ({"path": "x.pcap.gz"}, "uncompressed"),
    ],
)
def test_impossible_outputs_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(LiveCaptureError, match=message):
        FileSink.check(**kwargs)


def test_a_closed_pipe_stops_the_capture_quietly() -> None:
    r, w = os.pipe()
    os.close(r)  # the reader (wireshark) went away
    with os.fdopen(w, "wb") as fp, pytest.raises(capture.OutputClosed):
        capture._write_all(fp.fileno(), b"x", "-")

    class Closed:
        def write(self, data: str) -> int:
            raise BrokenPipeError

    rx, tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with tx, LiveCapture(sock=rx) as live:
        _feed(tx, _frames(3))
        sink = LineSink(Closed())  # type: ignore[arg-type]
        assert run(live, sink, CaptureStats()) == "output closed"


def test_partial_writes_are_completed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, bytes(data)[:3]))
    with open(tmp_path / "out", "wb") as fp:
        capture._write_all(fp.fileno(), b"abcdefghijklmnop", "out")
    assert (tmp_path / "out").read_bytes() == b"abcdefghijklmnop"


@pytest.mark.parametrize("room", [0, 1, 100, 2000])
def test_a_full_disk_leaves_the_file_at_its_last_whole_packet(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, room: int) -> None:
    """The disk fills ``room`` bytes into a batch: the error names the file and the reason,
    and the file holds exactly the packets whose records fitted whole (counted here from
    the records' sizes: 16-byte pcap record header + frame)."""
    frames = _frames(40)
    real = LiveBatch.write_to

    def fill_up(self: LiveBatch, fd: int, first: int = 0, last: int | None = None) -> None:
        spill = tmp_path / "spill"
        with open(spill, "wb") as fp:
            real(self, fp.fileno(), first, last)
        written.append(len(frames[:self.count]))  # the batch's frames are the first ones
        os.write(fd, spill.read_bytes()[:room])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    written: list[int] = []

    monkeypatch.setattr(LiveBatch, "write_to", fill_up)
    path = tmp_path / "t.pcap"
    sink = FileSink(str(path))
    with pytest.raises(LiveCaptureError) as err:
        _capture_pair(frames, sink, count=len(frames))
    sink.close()
    sizes = [16 + len(f) for f in frames[:written[0]]]
    whole = max(i for i in range(len(sizes) + 1) if sum(sizes[:i]) <= room)
    assert str(err.value) == (f"{path}: cannot write: no space left on device; the file ends "
                              f"with its last whole packet ({whole} packets)")
    with open_capture(str(path)) as reader:
        assert [r.data for r in reader.records()] == frames[:whole]
        assert reader.stopped is None
    assert path.stat().st_size == 24 + sum(sizes[:whole])


def test_a_file_deleted_under_the_capture_is_reported(tmp_path: Path) -> None:
    """Deleting the file does not stop the writes (tcpdump's behaviour too); closing
    tells, so the command can warn that the packets are gone."""
    path = tmp_path / "t.pcap"
    sink = FileSink(str(path))
    path.unlink()
    _capture_pair(_frames(5), sink, count=5)
    sink.close()
    assert sink.deleted == [str(path)] and not path.exists()
    kept = FileSink(str(tmp_path / "kept.pcap"))
    kept.close()
    assert kept.deleted == []


_CHILD = textwrap.dedent("""
    import socket, sys, threading
    sys.path.insert(0, {root!r})
    from tests.helpers import frame
    from vsockmon.live.capture import CaptureStats, FileSink, LiveCapture, run
    from vsockmon.wire.protocol import Op
    rx, tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    done = threading.Event()
    def feed():  # until the capture stops; its closed end ends the feed too
        i = 0
        try:
            while not done.is_set():
                tx.send(frame(Op.RW, bytes([i % 256]) * (i % 700), src=(3, i % 65536)))
                i += 1
        except OSError:
            pass
    feeder = threading.Thread(target=feed)
    feeder.start()
    sink = FileSink(sys.argv[1])
    stats = CaptureStats()
    try:
        with LiveCapture(sock=rx) as live:
            reason = run(live, sink, stats, on_tick=lambda s: print(s.packets, flush=True),
                         tick_s=0)
    finally:
        done.set()
        feeder.join()
    sink.close()
    print("stopped", reason, stats.packets, flush=True)
""")


def _start_child(path: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _CHILD.format(root=str(ROOT)), str(path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until it has written a good number of frames
        if line.strip().isdigit() and int(line) > 2000:
            return proc
    raise AssertionError("the capturing child never got going")


def _check_records(path: Path) -> tuple[int, str | None]:
    """(records, why reading stopped early); every record must be a whole frame as sent."""
    with open_capture(str(path)) as reader:
        records = list(reader.records())
        stopped = reader.stopped
    for r in records:
        v = VIRTIO_HEADER.unpack(r.data, MON_HDR_LEN)
        payload = r.data[MON_HDR_LEN + VIRTIO_HDR_LEN:]
        assert payload == bytes([v["src_port"] % 256]) * v["len"]
    return len(records), stopped


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_between_batches_leaving_a_whole_file(tmp_path: Path, sig: int) -> None:
    proc = _start_child(tmp_path / "t.pcap")
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert f"stopped {signal.Signals(sig).name}" in out
    written = int(out.split()[-1])
    assert _check_records(tmp_path / "t.pcap") == (written, None)


def test_sigkill_leaves_a_readable_file(tmp_path: Path) -> None:
    proc = _start_child(tmp_path / "t.pcap")
    proc.kill()
    proc.communicate(timeout=30)
    count, stopped = _check_records(tmp_path / "t.pcap")
    assert count > 2000
    # batches are written with one write() each: at most a kill inside that very write
    # can cut the last record short
    assert stopped is None or stopped.startswith("file ends inside a packet")
    done = subprocess.run(["tshark", "-r", str(tmp_path / "t.pcap"), "-c", "5"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "vSocket" in done.stdout


def test_live_line_decode() -> None:
    ts = 1_700_000_000_123_456_789
    line = format_frame(ts, frame(Op.RW, b"abc", src=(3, 1025), dst=(2, 9999),
                                  type_=SockType.SEQPACKET, flags=3, fwd_cnt=7))
    assert line.endswith("3:1025 → 2(host):9999  SEQPACKET RW len=3 [EOM,EOR] "
                         "buf_alloc=262144 fwd_cnt=7")
    assert line[:15].count(":") == 2 and line[8:15] == ".123456"
    assert "SHUTDOWN len=0 [RCV,SEND]" in format_frame(ts, frame(Op.SHUTDOWN, flags=3))
    assert "truncated frame, 10 bytes" in format_frame(ts, b"x" * 10)
    assert "transport=NO_INFO" in format_frame(ts, frame()[:26] + b"\x01\x00" + b"\0" * 4)


def test_status_line_counts_ops_and_drops() -> None:
    stats = CaptureStats()
    stats.add(LiveBatch.of_frames(LiveFrame(0, f, len(f)) for f in (
        frame(Op.RW, b"ab"), frame(Op.RW), frame(Op.CREDIT_UPDATE), b"short")))
    stats.kernel = (200, 3)
    assert stats.line() == ("4 packets, 235 B (RW 2 CREDIT_UPDATE 1); "
                            "kernel: 200 seen, 3 dropped (1.50%)")
    assert stats.as_dict()["ops"] == {"RW": 2, "CREDIT_UPDATE": 1}
    assert stats.loss_line() == ("warning: 3 frames lost: 3 dropped by the kernel for want "
                                 "of buffer room (raise -B)")
    # finished: the kernel saw 200, dropped 3, 4 were written: 193 never read
    stats.finish("SIGINT", (200, 3))
    assert stats.line().endswith("3 dropped (1.50%), 193 lost at stop")
    assert stats.lost == 196 and "193 still unread" in str(stats.loss_line())
    stats.finish("count", (200, 3))  # -c: the frames after the count were left on purpose
    assert stats.lost_at_stop == 0 and stats.lost == 3


@pytest.mark.parametrize("use_mmap", [True, False])
def test_packet_socket_readers_on_loopback(use_mmap: bool) -> None:
    """The real kernel's TPACKET_V3 ring (and the recvmsg fallback): lengths, snap length
    and timestamps of UDP datagrams we send to ourselves on ``lo``."""
    marker = os.urandom(8)
    flt = FrameFilter(snaplen=120)
    with LiveCapture("lo", flt, 4 << 20, use_mmap=use_mmap, expect_hatype=None) as live:
        assert live.method.startswith("mmap" if use_mmap else "recvmsg")
        before = time.time_ns()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            for size in (100, 1000, 3000):
                udp.sendto(marker + b"x" * size, ("127.0.0.1", 9))
        live.deadline = time.monotonic() + 5
        ours = []
        for batch in live.batches():  # frames are views into the ring: copy to keep
            copies = [LiveFrame(f.ts_ns, bytes(f.data), f.orig_len) for f in batch]
            ours += [f for f in copies if marker in f.data and f.data[23] == 17]  # not ICMP
            if len({f.orig_len for f in ours}) == 3:
                break
        seen, drops = live.kernel_stats()  # type: ignore[misc]
    # lo shows each datagram going out and coming in: 14 (Ethernet) + 20 + 8 + payload
    assert sorted({f.orig_len for f in ours}) == [150, 1050, 3050]
    assert all(len(f.data) == min(120, f.orig_len) for f in ours)
    assert all(before - 10**9 < f.ts_ns < time.time_ns() + 10**9 for f in ours)
    assert seen >= len(ours) and drops == 0


def test_capture_and_echo_paths_stay_light() -> None:
    """In the lab VM every import costs seconds: no numpy, scapy, rich or pyroute2 at import."""
    code = ("import sys, vsockmon.cli, vsockmon.cli.capture, vsockmon.cli.echo, "
            "vsockmon.cli.link, vsockmon.live.capture, vsockmon.live.echo, vsockmon.live.link; "
            "print(sorted(m for m in ('numpy', 'scapy', 'rich', 'matplotlib', 'pyroute2', "
            "'pyarrow', 'tabulate', 'ctypes') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VSOCKMON, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def test_cli_refuses_to_overwrite_before_touching_the_link(tmp_path: Path) -> None:
    (tmp_path / "t.pcap").write_bytes(b"keep")
    done = _cli("capture", "-w", "t.pcap", "-c", "1", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr == "Error: t.pcap: exists; use --force to overwrite\n"
    assert (tmp_path / "t.pcap").read_bytes() == b"keep"


def test_cli_usage_errors(tmp_path: Path) -> None:
    done = _cli("capture", "--op", "bogus", cwd=tmp_path)
    assert done.returncode == 2 and "unknown op 'bogus'" in done.stderr
    many = ",".join(str(c) for c in range(100, 200))
    done = _cli("capture", "--cid", many, cwd=tmp_path)
    assert done.returncode == 2 and "filter too long" in done.stderr
    done = _cli("capture", "--ring", "3", cwd=tmp_path)
    assert done.returncode == 2 and "need -w FILE" in done.stderr
    done = _cli("capture", "-w", "x.pcap", "--ring", "3", cwd=tmp_path)
    assert done.returncode == 1 and "needs a file size" in done.stderr


def test_cli_on_a_link_of_another_kind_fails_in_one_line(tmp_path: Path) -> None:
    """Every host has ``lo``, and it is no vsockmon link: refused before anything is changed
    or written. (A kernel that cannot make vsockmon0 is tested in tests/test_link_lab.py.)"""
    done = _cli("capture", "-i", "lo", "-w", "t.pcap", "-c", "1", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("Error: lo ") and "not a vsockmon link" in done.stderr
    assert not (tmp_path / "t.pcap").exists()


@pytest.mark.parametrize("name", ["t.pcap", "t.pcapng"])
def test_records_are_byte_for_byte_pcapios(tmp_path: Path, name: str) -> None:
    """The capture frames records itself (to write from the ring without copying); the
    bytes must stay exactly those of pcapio's writers."""
    frames = [frame(Op.RW, b"p" * n) for n in (0, 1, 2, 3, 4, 5, 700)]
    sink = FileSink(str(tmp_path / name))
    sink.write(LiveBatch.of_frames((LiveFrame(1_700_000_000_123_456_789 + i, memoryview(f),
                                              len(f) + i) for i, f in enumerate(frames)),
                                   sink.record_format))
    sink.close()
    with open(tmp_path / f"ref-{name}", "wb") as fp:
        ref = pcapio.writer_for(name, fp)
        for i, f in enumerate(frames):
            ref.write(1_700_000_000_123_456_789 + i, f, len(f) + i)
        if name.endswith(".pcapng"):  # then when the capture stopped (pcap cannot say)
            assert sink.end_ns is not None
            fp.write(pcapio.PcapngWriter.statistics_block(sink.end_ns))
    assert (tmp_path / name).read_bytes() == (tmp_path / f"ref-{name}").read_bytes()
    with open_capture(str(tmp_path / name)) as reader:
        assert len(list(reader.records())) == len(frames)
        assert reader.capture_end_ns == (sink.end_ns if name.endswith(".pcapng") else None)


@pytest.mark.parametrize("name", ["t.pcap", "t.pcapng"])
def test_the_file_header_is_written_at_open(tmp_path: Path, name: str) -> None:
    """A capture killed before its first batch leaves a valid, empty file (issue 20)."""
    sink = FileSink(str(tmp_path / name))
    with open_capture(str(tmp_path / name)) as reader:  # before any write or close
        assert reader.format == name.split(".")[1] and list(reader.records()) == []
        assert reader.stopped is None
    sink.close()


def test_a_stop_drains_what_is_already_queued(tmp_path: Path) -> None:
    """Frames queued before the stop are written (the socketpair has no kernel counts, so
    the drain ends when nothing is left); a second signal (urgent) skips the drain."""
    for urgent, expected in ((False, 100), (True, 0)):
        rx, tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        frames = _frames(100)  # fits in the socket buffer: send() never blocks
        for f in frames:
            tx.send(f)
        sink = FileSink(str(tmp_path / f"{urgent}.pcap"))
        stats = CaptureStats()
        with tx, LiveCapture(sock=rx) as live:
            live.stop.request("SIGINT")
            live.stop.urgent = urgent
            assert run(live, sink, stats) == "SIGINT"
        sink.close()
        with open_capture(str(tmp_path / f"{urgent}.pcap")) as reader:
            assert [r.data for r in reader.records()] == frames[:expected]
        assert stats.packets == expected
