"""decode's text made and written on the other core: ``_render.write_rows`` writes exactly
what ``format_rows`` makes, a piece at a time, without the GIL; the BackgroundWriter keeps
order and hands its errors over; the command's output through a real pipe is the same."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest

from vsockmon.decode import _render, render
from vsockmon.decode.frames import decode_batches
from vsockmon.decode.rows import Rows
from vsockmon.output import BackgroundWriter
from vsockmon.wire.pcapio import CaptureReader

ROOT = Path(__file__).resolve().parent.parent
VSOCKMON = str(Path(sys.executable).with_name("vsockmon"))
FIXTURES = sorted(p for pattern in ("*.pcap", "*.pcapng")
                  for p in (ROOT / "fixtures").rglob(pattern))
MANY = ROOT / "fixtures" / "real" / "many-connections.pcap"


def _rows(path: Path) -> list[Rows]:
    """The JSON rows and the summary lines of every batch of a capture."""
    out: list[Rows] = []
    with CaptureReader(str(path), chunk=1 << 14) as r:
        for fb in decode_batches(r.batches()):
            idx = np.arange(len(fb), dtype=np.int64)
            out += [fb.json_rows(idx), render.summary_rows(fb, idx, 0)]
    return out


def _written(rows: Rows, piece: int) -> bytes:
    with tempfile.TemporaryFile() as f:
        _render.write_rows(f.fileno(), rows.count, rows.which, rows.templates, piece)
        f.seek(0)
        return f.read()


@pytest.mark.parametrize("path", FIXTURES[::4], ids=lambda p: p.name)
def test_write_rows_writes_what_format_rows_makes_whatever_the_piece(path: Path) -> None:
    for rows in _rows(path):
        text = rows.text()
        assert text.count(b"\n") == rows.count
        for piece in (1, 7, rows.count or 1, 1 << 20):
            assert _written(rows, piece) == text


_PIPE_CHECK = """
import os, threading
import numpy as np
from vsockmon.decode import _render
from vsockmon.decode.rows import Rows
n = 200_000
many = Rows(n, np.zeros(n, dtype=np.int8), [[
    (_render.K_INT, np.arange(n, dtype=np.int64), 8),
    (_render.K_LIT, b" a row of text long enough to fill a pipe quickly")]])
text = many.text()
assert len(text) > 16 * 65536  # many times what a pipe holds
r, w = os.pipe()

def write():
    with os.fdopen(w, "wb", buffering=0) as f:
        many.write(f)

writer = threading.Thread(target=write)
writer.start()
got = b""
while chunk := os.read(r, 1 << 16):
    got += chunk
writer.join()
print(got == text)
"""


def test_write_rows_lets_go_of_the_gil_while_it_writes() -> None:
    """It writes megabytes into a pipe whose only reader is the main thread: were the GIL
    held while the pipe is full, the reader could never go on and the writer never finish
    (run in a process of its own, so that the hang fails the test instead of the suite)."""
    run = subprocess.run([sys.executable, "-c", _PIPE_CHECK], capture_output=True, text=True,
                         timeout=60)
    assert run.stdout.split() == ["True"], run.stderr


def test_write_rows_errors() -> None:
    rows = _rows(MANY)[0]
    r, w = os.pipe()
    os.close(r)
    with pytest.raises(BrokenPipeError):  # the reader left
        _render.write_rows(w, rows.count, rows.which, rows.templates, 100)
    os.close(w)
    with pytest.raises(OSError, match="Bad file descriptor"):
        _render.write_rows(w, rows.count, rows.which, rows.templates, 100)
    with pytest.raises(ValueError, match="piece"):
        _render.write_rows(1, rows.count, rows.which, rows.templates, 0)
    bad = np.array(rows.which, dtype=np.int8)
    bad[-1] = len(rows.templates)
    with tempfile.TemporaryFile() as f, pytest.raises(IndexError, match="template choice"):
        _render.write_rows(f.fileno(), rows.count, bad, rows.templates, 100)


class _Text:
    def __init__(self, data: bytes, fail: bool = False) -> None:
        self.data, self.fail = data, fail

    def write(self, out: BinaryIO) -> None:
        if self.fail:
            raise OSError(28, "No space left on device")
        out.write(self.data)


def test_background_writer_keeps_order_and_hands_over_its_error_once() -> None:
    out = io.BytesIO()
    with BackgroundWriter(out, depth=2) as w:
        for i in range(500):
            w.put(_Text(b"%d," % i))
    assert out.getvalue() == b"".join(b"%d," % i for i in range(500))

    out = io.BytesIO()
    w = BackgroundWriter(out, depth=1)
    w.put(_Text(b"a"))
    w.put(_Text(b"", fail=True))
    with pytest.raises(OSError, match="No space"):
        for _ in range(100):  # raised by a later put (never blocks: the rest is dropped)
            w.put(_Text(b"b"))
    w.put(_Text(b"c"))
    w.close()  # raised once
    assert out.getvalue() == b"a"
    assert not any(t.name == "writer" for t in threading.enumerate())


def test_background_writer_writes_what_came_before_the_caller_s_error() -> None:
    out = io.BytesIO()
    with pytest.raises(KeyError), BackgroundWriter(out) as w:
        w.put(_Text(b"before"))
        raise KeyError("damaged file")
    assert out.getvalue() == b"before"


def test_rows_written_to_a_buffered_file_come_after_what_it_holds(tmp_path: Path) -> None:
    rows = _rows(MANY)[0]
    with open(tmp_path / "out", "wb") as f:
        f.write(b"held in the buffer\n")
        rows.write(f)
        f.write(b"after\n")
    assert (tmp_path / "out").read_bytes() == b"held in the buffer\n" + rows.text() + b"after\n"
    plain = io.BytesIO()
    rows.write(plain)
    assert plain.getvalue() == rows.text()


@pytest.mark.parametrize("args", [["--json"], []])
def test_decode_through_a_pipe_is_every_batch_s_text(args: list[str]) -> None:
    want = b"".join(r.text() for r in _rows(MANY)[(0 if args else 1)::2])
    if not args:  # lines carry time since the first frame: one t0 for the whole capture
        with CaptureReader(str(MANY)) as r:
            fbs = list(decode_batches(r.batches()))
        t0 = int(fbs[0].ts_ns[0])
        want = b"".join(render.summary_lines(fb, np.arange(len(fb)), t0) for fb in fbs)
    got = subprocess.run([VSOCKMON, "decode", str(MANY), *args], capture_output=True,
                         timeout=120, check=True).stdout
    assert got == want


def test_decode_into_a_reader_that_leaves_is_quiet() -> None:
    """``vsockmon decode big.pcap | head -1``: no traceback, no message, status 0."""
    proc = subprocess.Popen([VSOCKMON, "decode", str(MANY), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(100)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 0
    assert err == b""
