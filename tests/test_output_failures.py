"""Output that cannot be written: one line and a non-zero exit, and no half-written file.

A full disk is made per process, without touching the host: ``RLIMIT_FSIZE`` caps the files
the command may write (a write past it fails with EFBIG, "File too large", once SIGXFSZ is
ignored), and ``/dev/full`` fails every write to stdout with ENOSPC. The expected messages are
the C library's own words for those errors (``os.strerror``), not our output pasted.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from vsockmon.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parent.parent
VSOCKMON = str(Path(sys.executable).with_name("vsockmon"))
CAPTURE = str(ROOT / "fixtures" / "real" / "many-connections.pcap")
LIMIT = 4096
"""Bytes a capped command may write to a file: less than any export of CAPTURE (its packets
alone are 8 KB), more than the small files the interpreter itself might write."""
FULL = os.strerror(errno.ENOSPC)
TOO_LARGE = os.strerror(errno.EFBIG)


def _capped() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def run(*args: str, capped: bool = False, stdout: int | None = subprocess.PIPE
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VSOCKMON, *args], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=120, preexec_fn=_capped if capped else None)


@pytest.mark.parametrize(("args", "status"), [
    (["decode", CAPTURE], 1),
    (["decode", CAPTURE, "--json"], 1),
    (["conns", CAPTURE], 1),
    (["stats", CAPTURE, "--json"], 1),
    (["timeline", CAPTURE], 1),
    (["follow", CAPTURE, "--conn", "0"], 1),
    (["diagnose", CAPTURE], 2),  # diagnose keeps 1 for "found problems"
])
def test_stdout_on_a_full_disk_is_one_line_and_the_command_s_error_status(
    args: list[str], status: int
) -> None:
    with open("/dev/full", "wb") as full:
        done = run(*args, stdout=full.fileno())
    assert done.returncode == status
    assert done.stderr == f"Error: cannot write the output: {FULL}\n"


def test_an_export_that_runs_out_of_space_leaves_no_file(tmp_path: Path) -> None:
    out = tmp_path / "x.pcapng"
    done = run("export", CAPTURE, "-o", str(out), capped=True)
    assert done.returncode == 1
    assert done.stderr == f"Error: {out}: cannot write: {TOO_LARGE}\n"
    assert os.listdir(tmp_path) == []  # neither x.pcapng nor its hidden .part


def test_a_forced_export_that_fails_keeps_the_file_it_was_to_replace(tmp_path: Path) -> None:
    out = tmp_path / "x.pcapng"
    out.write_bytes(b"the previous export")
    done = run("export", CAPTURE, "-o", str(out), "--force", capped=True)
    assert done.returncode == 1
    assert out.read_bytes() == b"the previous export"
    assert os.listdir(tmp_path) == ["x.pcapng"]


def test_a_table_export_that_runs_out_of_space_leaves_no_table(tmp_path: Path) -> None:
    done = run("export", CAPTURE, "-o", str(tmp_path / "t"), "--format", "csv", capped=True)
    assert done.returncode == 1
    assert done.stderr == f"Error: cannot write the output: {TOO_LARGE}\n"
    assert os.listdir(tmp_path / "t") == []


def test_a_timeline_page_that_does_not_fit_leaves_no_page(tmp_path: Path) -> None:
    page = tmp_path / "t.html"
    done = run("timeline", CAPTURE, "--conn", "0", "--html", str(page), capped=True)
    assert done.returncode == 1
    assert done.stderr == f"Error: {page}: cannot write: {TOO_LARGE}\n"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_an_export_into_a_fifo_writes_through_it_and_leaves_it_a_fifo(
        tmp_path: Path, force: list[str]) -> None:
    # A device or FIFO is written in place, with or without --force: replacing it with a
    # regular file would break whoever reads it (and as root, replace /dev/null), and
    # writing through it overwrites nothing, so --force is not asked for.
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    done = run("export", CAPTURE, "-o", str(fifo), *force, "--format", "pcapng")
    if done.returncode != 0:  # the export never opened it: let the reader's open return
        os.close(os.open(fifo, os.O_WRONLY))
    reader.join(timeout=60)
    assert done.returncode == 0, done.stderr
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert got[0][:4] == bytes.fromhex("0a0d0d0a")  # a pcapng section header block
    assert os.listdir(tmp_path) == ["pipe"]


def test_dev_null_needs_no_force_and_a_file_or_a_link_to_one_still_does(tmp_path: Path
                                                                       ) -> None:
    assert run("export", CAPTURE, "-o", os.devnull, "--format", "pcapng").returncode == 0
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)  # still the device, not a file
    kept = tmp_path / "kept.pcapng"
    kept.write_bytes(b"mine")
    link = tmp_path / "link.pcapng"
    link.symlink_to(kept)
    for target in (kept, link):
        done = run("export", CAPTURE, "-o", str(target), "--format", "pcapng")
        assert done.returncode != 0
        assert done.stderr.strip() == f"Error: {target}: exists; use --force to overwrite"
    assert kept.read_bytes() == b"mine"


@click.command()
@click.option("--errno", "code", type=int)
def boom(code: int) -> None:
    """A command that fails with a bare OSError (no file name), as a library call might."""
    raise OSError(code, os.strerror(code))


@pytest.mark.parametrize(("code", "line"), [
    (errno.ENOSPC, f"Error: cannot write the output: {FULL}"),
    (errno.EACCES, f"Error: {os.strerror(errno.EACCES)}"),  # one line, not called a write
])
def test_a_bare_os_error_is_one_line_and_named_a_write_failure_only_when_it_is_one(
    monkeypatch: pytest.MonkeyPatch, code: int, line: str
) -> None:
    monkeypatch.setitem(COMMANDS, "boom", f"{__name__}:boom")
    done = CliRunner().invoke(main, ["boom", "--errno", str(code)])
    assert done.exit_code == 1
    assert done.stderr == line + "\n"
