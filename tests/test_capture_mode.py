"""Capture files are created mode 0600 (payloads can hold secrets): the host-side paths —
the file sink ``capture -w`` and ``top``'s spool write through, ``--umask``, a file replaced
with ``--force``, and what must never be chmod-ed. The lab test
(tests/test_capture_mode_lab.py) runs the real command on a real kernel."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from vsockmon.cli import main
from vsockmon.live.capture import CAPTURE_MODE, FileSink, capture_mode
from vsockmon.output import create_output


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o000, 0o022, 0o077])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Every test runs under a permissive, the usual and a strict process umask."""
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_a_capture_file_is_0600_whatever_the_process_umask(tmp_path: Path, umask: int
                                                           ) -> None:
    for name in ("a.pcap", "b.pcapng"):
        FileSink(str(tmp_path / name)).close()
        assert mode(tmp_path / name) == 0o600 == CAPTURE_MODE


def test_every_file_of_a_ring_is_0600(tmp_path: Path, umask: int) -> None:
    sink = FileSink(str(tmp_path / "r.pcap"), rotate_bytes=100, files=2)
    sink._rotate()
    sink._rotate()  # wraps onto r.pcap.0, which exists: replaced, still 0600
    sink.close()
    assert sorted(os.listdir(tmp_path)) == ["r.pcap.0", "r.pcap.1"]
    assert {mode(tmp_path / n) for n in os.listdir(tmp_path)} == {0o600}


@pytest.mark.parametrize(("option", "want"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600),
                                              (0o000, 0o666)])
def test_an_explicit_umask_gives_0666_less_it(tmp_path: Path, umask: int, option: int,
                                              want: int) -> None:
    assert capture_mode(option) == want
    FileSink(str(tmp_path / "u.pcap"), mode=capture_mode(option)).close()
    assert mode(tmp_path / "u.pcap") == want


def test_a_file_replaced_with_force_loses_its_wider_mode(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "old.pcap"
    path.write_bytes(b"someone's notes")
    path.chmod(0o644)
    FileSink(str(path), force=True).close()
    assert mode(path) == 0o600
    assert path.read_bytes()[:4] == (0xA1B23C4D).to_bytes(4, "little")  # a ns pcap now


def test_tops_spool_and_its_saved_copy_are_0600(tmp_path: Path, umask: int) -> None:
    from vsockmon.top.source import Spool

    spool = Spool(snaplen=65535)
    try:
        assert mode(spool.path) == 0o600
        spool.save(str(tmp_path / "saved.pcap"))
    finally:
        spool.close()
    assert mode(tmp_path / "saved.pcap") == 0o600


def test_a_fifo_is_written_but_never_chmod_ed(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo, 0o644)
    os.chmod(fifo, 0o644)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so opening for writing won't block
    try:
        with create_output(str(fifo), force=True, mode=CAPTURE_MODE) as fp:
            fp.write(b"abc")
        assert os.read(reader, 10) == b"abc"
    finally:
        os.close(reader)
    assert mode(fifo) == 0o644


def test_other_outputs_keep_the_usual_mode(tmp_path: Path, umask: int) -> None:
    """Reports and exports without ``mode`` are 0666 less the umask, as any tool's."""
    create_output(tmp_path / "report.html", force=False).close()
    assert mode(tmp_path / "report.html") == 0o666 & ~umask


@pytest.mark.parametrize("value", ["999", "abc", "-1", "1000"])
def test_a_bad_umask_is_one_usage_line(value: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["capture", "-w", str(tmp_path / "x.pcap"),
                                       "--umask", value])
    assert result.exit_code == 2 and "is not an octal umask" in result.output
    assert not (tmp_path / "x.pcap").exists()
