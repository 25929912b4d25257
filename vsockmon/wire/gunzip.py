"""Gunzipping a capture, on the other core when it can: the next chunks are read and inflated
in a second thread while the caller decodes this one.

Decompressing costs a fifth of `decode --json` (0.2 of 1.2 CPU s on a 1M-packet capture).
zlib lets go of the interpreter lock while it inflates, so the two overlap, if the inflating
thread seldom needs the lock: :class:`Gunzip` inflates up to a whole chunk per zlib call
(the standard library's GzipFile takes the lock back every few dozen kilobytes, and read
ahead that way hid only half of the decompression, measured). Memory stays bounded: at most
:data:`DEPTH` chunks wait, read but not yet taken, and zlib is never asked for more than one.

Only regular files are read ahead: a read from a pipe may wait for its writer forever, and
closing the reader must not wait on it (a ``| head`` that has seen enough).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import zlib
from typing import BinaryIO

DEPTH = 2
"""Chunks read ahead of the caller at most."""
COMPRESSED_CHUNK = 1 << 20
"""Compressed bytes read from the file at a time."""
_GZIP = 16 + zlib.MAX_WBITS
"""zlib's window bits for a gzip member (header and CRC-checked trailer)."""


class Gunzip:
    """``read(n)`` of the data of a gzip stream (one member or several, as gzip writes when
    files are concatenated; zero bytes between or after members are padding).

    A damaged stream raises ``zlib.error``, one cut short ``EOFError``, both as soon as
    they are reached: what was whole before them has been returned.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._member = zlib.decompressobj(_GZIP)
        self._input = b""
        self._ended = False

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at the end of the stream)."""
        parts: list[bytes] = []
        have = 0
        while have < n and not self._ended:
            if self._member.eof and not self._next_member():
                break
            if not self._input:
                self._input = self._raw.read(COMPRESSED_CHUNK)
                if not self._input:
                    raise EOFError("compressed file ended before the end-of-stream marker "
                                   "was reached")
            data = self._member.decompress(self._input, n - have)
            self._input = self._member.unconsumed_tail
            parts.append(data)
            have += len(data)
        return b"".join(parts)

    def _next_member(self) -> bool:
        """Start the member after the one that ended; False at the end of the stream."""
        rest = self._member.unused_data.lstrip(b"\0")
        while not rest:
            more = self._raw.read(COMPRESSED_CHUNK)
            if not more:
                self._ended = True
                return False
            rest = more.lstrip(b"\0")
        self._member = zlib.decompressobj(_GZIP)
        self._input = rest
        return True

    def close(self) -> None:
        self._raw.close()


class ReadAhead:
    """``read(n)`` over ``source``, whose ``read(chunk)`` calls run in a thread of their own.

    An error of the source's read is raised by the :meth:`read` that reaches it, as if read
    here; :meth:`close` stops the thread (after its current read) and closes the source.
    """

    def __init__(self, source: BinaryIO, chunk: int) -> None:
        self._source = source
        self._chunk = chunk
        self._queue: queue.Queue[bytes | Exception] = queue.Queue(DEPTH)
        self._stop = threading.Event()
        self._left = b""
        self._done = False
        self._thread = threading.Thread(target=self._run, name="read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        """Read chunks until the end, an error or :meth:`close`; each goes to the queue."""
        try:
            while not self._stop.is_set():
                data = self._source.read(self._chunk)
                self._queue.put(data)
                if not data:
                    return
        except Exception as e:  # handed over: the caller's read raises it
            self._queue.put(e)

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all of the next chunk when ``n`` is negative); b"" at the end."""
        if not self._left:
            if self._done:
                return b""
            item = self._queue.get()
            if isinstance(item, Exception):
                self._done = True
                raise item
            if not item:
                self._done = True
                return b""
            self._left = item
        if n < 0 or n >= len(self._left):  # the usual case: a whole chunk, not copied
            out, self._left = self._left, b""
        else:
            out, self._left = self._left[:n], self._left[n:]
        return out

    def close(self) -> None:
        """Stop reading ahead and close the source. The thread may be waiting to hand over
        a chunk: taking what waits frees it, and it stops before its next read."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)
        self._left = b""
        self._done = True
        self._source.close()
