"""Output files: never replace one without ``force``, and say so before the work, not after.

The one place of the "exists; use --force to overwrite" rule, for the commands and the
library alike (exports, reports, pictures, captures). Only the standard library is imported:
the live capture path uses it inside the lab VM, where every import costs.
"""

from __future__ import annotations

import contextlib
import os
import queue
import stat
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from vsockmon.errors import VsockmonError

STDOUT = "-"
"""The output name that means standard output (never "exists")."""


class OutputError(VsockmonError):
    """An output file that exists (without ``force``) or cannot be written."""


Paths = str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None


def refuse_existing(paths: Paths, force: bool,
                    error: type[VsockmonError] = OutputError) -> None:
    """Raise ``error`` for the first of ``paths`` that exists, unless ``force``.

    Call it before a long analysis or before touching anything (a link), so a mistake costs
    nothing. ``None`` and ``-`` (stdout) pass, and so do a FIFO and a character device
    (``/dev/null``): writing through them replaces nothing, as ``> /dev/null`` in a shell.
    ``error`` lets a caller keep its own error class (an export's, a live capture's) for the
    same message.
    """
    if force or paths is None:
        return
    many = [paths] if isinstance(paths, str | os.PathLike) else paths
    for path in many:
        name = os.fspath(path)
        if name != STDOUT and os.path.exists(name) and not _passes_through(name):
            raise error(f"{name}: exists; use --force to overwrite")


def _passes_through(name: str) -> bool:
    """A FIFO or character device: what is written goes to a reader, no file is replaced.
    A block device is a disk: writing to it destroys what it holds, so it still needs force."""
    try:
        mode = os.stat(name).st_mode
    except OSError:  # gone since it was seen: refuse, as for any name that existed
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


def create_output(path: str | os.PathLike[str], force: bool,
                  error: type[VsockmonError] = OutputError, mode: int | None = None
                  ) -> BinaryIO:
    """``path`` opened for binary writing (stdout for ``-``), refusing to replace a file
    without ``force``; failures raise ``error``.

    ``mode`` None gives the usual 0666 less the umask. A ``mode`` is the file's exact
    permission bits, also on a regular file replaced with ``force`` (which would otherwise
    keep its old, maybe wider, mode): a capture's 0600, since payloads can hold secrets.
    """
    name = os.fspath(path)
    if name == STDOUT:
        return sys.stdout.buffer
    refuse_existing(name, force, error)
    if mode is None:
        try:
            return open(name, "wb")
        except OSError as e:
            raise error(f"{name}: cannot write: {e.strerror}") from None
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    except OSError as e:
        raise error(f"{name}: cannot write: {e.strerror}") from None
    if stat.S_ISREG(os.fstat(fd).st_mode):  # never chmod /dev/null or a FIFO
        # someone else's file that we may write keeps its owner's mode (EPERM)
        with contextlib.suppress(PermissionError):
            os.fchmod(fd, mode)
    return os.fdopen(fd, "wb")


def part_path(path: str | os.PathLike[str]) -> Path:
    """Where ``path`` is written until it is complete: a hidden name beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.part")


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str], force: bool,
              error: type[VsockmonError] = OutputError) -> Iterator[BinaryIO]:
    """``path`` opened for binary writing, whole or not at all.

    The block writes a hidden ``.NAME.part`` beside it, renamed to ``path`` when the block
    ends and removed when it fails: a full disk or a Ctrl-C never leaves half a file under
    the real name, nor destroys, with ``force``, the file it was to replace. A device or a
    FIFO (``/dev/null``) is written in place, never replaced; ``-`` is stdout.
    """
    name = os.fspath(path)
    if name == STDOUT or (os.path.exists(name) and not os.path.isfile(name)):
        fp = create_output(name, force, error)
        try:
            yield fp
            fp.flush()
        except OSError as e:
            raise error(f"{name}: cannot write: {e.strerror}") from None
        finally:
            if fp is not sys.stdout.buffer:
                fp.close()
        return
    refuse_existing(name, force, error)
    tmp = part_path(name)
    try:
        fp = open(tmp, "wb")  # noqa: SIM115 - closed below, before the rename
    except OSError as e:
        raise error(f"{name}: cannot write: {e.strerror}") from None
    try:
        with fp:
            yield fp
        os.replace(tmp, name)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise error(f"{name}: cannot write: {e.strerror}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_output(path: str | os.PathLike[str], data: bytes, force: bool) -> None:
    """Write a whole report (HTML page, picture) to ``path`` or stdout."""
    with replacing(path, force) as fp:
        fp.write(data)


class Writable(Protocol):
    """What :class:`BackgroundWriter` writes: something that writes itself to a file."""

    def write(self, out: BinaryIO) -> None: ...


class BackgroundWriter:
    """Writes to ``out``, in a thread of its own and in the order put, what is put.

    ``decode`` gathers the next rows' columns (numpy, holding the GIL) while this thread
    makes the text of the rows before (compiled code that lets go of the GIL) and writes
    it: the two halves of the work on two cores. At most ``depth`` items wait, so memory
    stays bounded. An error of the writing (a reader gone, a full disk) is raised by the
    next :meth:`put` or by :meth:`close`, once; what comes after it is dropped unwritten.
    """

    def __init__(self, out: BinaryIO, depth: int = 2) -> None:
        self._out = out
        self._queue: queue.Queue[Writable | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failed = False
        while (item := self._queue.get()) is not None:
            if failed:  # take what comes unwritten, so that put never blocks
                continue
            try:
                item.write(self._out)
            except BaseException as e:  # handed over: put or close raises it, once
                self._error, failed = e, True

    def put(self, item: Writable) -> None:
        """Write ``item`` after everything put before."""
        self._raise()
        self._queue.put(item)

    def close(self) -> None:
        """Wait until everything put is written; raise the writing's error, if any."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        """Write what was put before an error of the caller too (a damaged file's frames
        before the damage), then let that error go on."""
        self.close()
