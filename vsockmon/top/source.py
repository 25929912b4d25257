"""Where ``vsockmon top`` gets its frames: a live capture running in a thread, or a file.

Both hand out ``(ts_ns, bytes, length on the wire)`` tuples with :meth:`take` and keep what
they handed out in a spool pcap, so ``w`` can save "what was captured so far" at any time
without the frames living in memory.

The live one starts capturing at once: this module imports nothing heavy (no numpy, no TUI
library), so in the lab VM the link is up and the ring filling while the model and the
screen are still importing. The capture thread is :func:`vsockmon.live.capture.run`, the
loop of ``vsockmon capture -w``, writing the spool exactly as ``capture`` writes a file; it
also queues a copy of each batch for the model (the ring's memory goes back to the kernel
with the next batch). Signals stay with :class:`~vsockmon.live.capture.LiveCapture`: they stop
the capture, and the view sees :attr:`LiveFeed.done` and ends.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Protocol

from vsockmon.errors import VsockmonError
from vsockmon.live.capture import (
    CAPTURE_MODE,
    CaptureStats,
    FileSink,
    LiveBatch,
    LiveCapture,
    LiveFrame,
    run,
)
from vsockmon.wire.pcapio import open_capture

Frame = tuple[int, bytes, int]
FEED_EVERY_S = 0.5
"""How often queued frames go to the model between snapshots. The model's cost is mostly per
call (numpy), so batches of a few thousand frames keep up where 0.1 s batches did not: in
the lab VM at the echo client's full rate, snapshots due every 2 s came every 3 s."""
SPOOL_LIMIT = 256_000_000
"""Bytes of frames kept for ``w`` (default): beyond, ``w`` saves the first ones only."""
MAX_SNAPLEN = 262144
"""The spool's snap length when replaying: keep every frame whole."""


class Feed(Protocol):
    """What the view asks of a source (:class:`LiveFeed` or :class:`ReplayFeed`)."""

    error: str | None
    spool: Spool
    live: bool
    """A live capture (its end is a stop), not a file (its end is the end of the file)."""

    @property
    def drops(self) -> int | None: ...

    @property
    def finished(self) -> bool: ...

    def take(self) -> list[Frame]: ...

    def now_ns(self) -> int:
        """The time up to which :meth:`take` has handed out frames."""
        ...


    def stop(self, reason: str = "quit") -> None: ...


class SaveError(VsockmonError):
    """``w`` could not write the file (one line for the screen)."""


class Spool:
    """A temporary pcap of every frame handed out, and how much of it is whole records."""

    def __init__(self, snaplen: int, limit: int = SPOOL_LIMIT) -> None:
        fd, self.path = tempfile.mkstemp(prefix="vsockmon-top-", suffix=".pcap")
        os.close(fd)
        self.sink = FileSink(self.path, force=True, snaplen=snaplen)
        self.limit = limit
        self.whole = (os.path.getsize(self.path), 0)
        """(bytes, frames) of the spool that are whole records, set in one assignment: the
        capture thread writes while ``w`` reads it."""
        self.full = False
        """The spool reached its limit (or the disk is full): it keeps the first frames."""

    def write(self, batch: LiveBatch) -> None:
        if self.full:
            return
        size, frames = self.whole
        room, fits = self.limit - size, 0
        for f in batch:
            room -= len(f.data) + 16  # a pcap record header, then the frame
            if room < 0:
                self.full = True
                break
            fits += 1
        if not fits:
            return
        if fits < len(batch):
            batch = LiveBatch.of_frames(list(batch)[:fits], self.sink.record_format)
        try:
            self.sink.write(batch)  # flushed whole: the file ends on a record after a batch
        except VsockmonError:  # no room left on the disk: the capture itself goes on
            self.full = True
            return
        self.whole = (os.path.getsize(self.path), frames + fits)

    def save(self, dest: str) -> int:
        """Copy the whole records so far to ``dest`` (never over an existing file); returns
        how many frames it holds."""
        size, frames = self.whole
        try:
            # mode 0600 as every capture file (payloads can hold secrets); never replaced
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                         CAPTURE_MODE)
            with open(self.path, "rb") as src, os.fdopen(fd, "wb") as out:
                left = size
                while left:
                    chunk = src.read(min(left, 1 << 20))
                    if not chunk:
                        break
                    out.write(chunk)
                    left -= len(chunk)
        except FileExistsError:
            raise SaveError(f"{dest}: exists; not overwritten") from None
        except OSError as e:
            raise SaveError(f"{dest}: {e.strerror}") from None
        return frames

    def close(self) -> None:
        try:
            self.sink.close()
        finally:
            os.unlink(self.path)


class LiveFeed:
    """A live capture in a background thread, its frames queued for the model."""

    def __init__(self, capture: LiveCapture, spool_limit: int = SPOOL_LIMIT) -> None:
        self.capture = capture
        self.spool = Spool(capture.filter.snaplen, spool_limit)
        self.stats = CaptureStats()
        self._queue: deque[list[Frame]] = deque()
        self.done = threading.Event()
        """Set when the capture stopped (a signal, the link gone, :meth:`close`)."""
        self.error: str | None = None
        self.reason: str | None = None
        self.live = True
        self._taken_ns = time.time_ns()
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)

    def start(self) -> LiveFeed:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            # on_tick makes run() read the kernel's counters every tick, in this thread
            self.reason = run(self.capture, self, self.stats,  # type: ignore[arg-type]
                              on_tick=lambda _stats: None)
        except VsockmonError as e:
            self.error = str(e)
        finally:
            self.done.set()

    # the sink interface of run()
    def write(self, batch: LiveBatch) -> None:
        self.spool.write(batch)
        self._queue.append([(f.ts_ns, bytes(f.data), f.orig_len) for f in batch])

    def close(self) -> None:
        """Called by run() when it ends; the spool stays until :meth:`stop`."""

    def take(self) -> list[Frame]:
        """Every frame captured since the last call, in order."""
        self._taken_ns = time.time_ns()
        out: list[Frame] = []
        while self._queue:
            out += self._queue.popleft()
        return out

    def now_ns(self) -> int:
        """When :meth:`take` last handed out what had been captured: the time a snapshot
        made from those frames describes (not when the model finished counting them)."""
        return self._taken_ns

    @property
    def drops(self) -> int | None:
        return self.stats.kernel[1] if self.stats.kernel else 0

    @property
    def finished(self) -> bool:
        return self.done.is_set()

    def stop(self, reason: str = "quit") -> None:
        """Stop capturing (the rest of the ring is still written), then drop the spool."""
        self.capture.stop.request(reason)
        if self._thread.is_alive():
            self._thread.join()
        self.spool.close()


class ReplayFeed:
    """A capture file replayed at its own pace (``pace``) or handed out at once."""

    def __init__(self, path: str, pace: bool = True, speed: float = 1.0,
                 spool_limit: int = SPOOL_LIMIT) -> None:
        self._reader = open_capture(path)
        self._records: Iterator[Frame] = ((r.ts_ns, r.data, r.orig_len)
                                          for r in self._reader.records())
        self.pace, self.speed = pace, speed
        self.spool = Spool(MAX_SNAPLEN, spool_limit)
        self.drops: int | None = None
        self.error: str | None = None
        self.live = False
        self._next: Frame | None = next(self._records, None)
        self._origin: tuple[int, float] | None = None
        self._clock = self._next[0] if self._next else time.time_ns()

    def start(self) -> ReplayFeed:
        if self._next is not None:
            self._origin = (self._next[0], time.monotonic())
        return self

    @property
    def finished(self) -> bool:
        return self._next is None

    def now_ns(self) -> int:
        """The capture's clock: how far the replay has got (the last frame's time when done
        or when replaying at once)."""
        return self._clock

    def take(self) -> list[Frame]:
        """The frames whose time has come (all of them when not pacing)."""
        out: list[Frame] = []
        if self._next is None or self._origin is None:
            return out
        t0, m0 = self._origin
        until = t0 + int((time.monotonic() - m0) * self.speed * 1e9) if self.pace else None
        while self._next is not None and (until is None or self._next[0] <= until):
            out.append(self._next)
            self._next = next(self._records, None)
        if until is not None:
            self._clock = until if self._next is not None else max(out[-1][0] if out else 0,
                                                                    self._clock)
        elif out:
            self._clock = out[-1][0]
        if out:
            self.spool.write(LiveBatch.of_frames(LiveFrame(*f) for f in out))
        if self._next is None and self._reader.stopped:
            self.error = f"{self._reader.name}: {self._reader.stopped}"
        return out

    def stop(self, reason: str = "quit") -> None:
        self._reader.close()
        self.spool.close()


def save_name(now: float | None = None) -> str:
    """A default name for ``w``: the time, so two saves do not collide."""
    return time.strftime("vsockmon-top-%Y%m%d-%H%M%S.pcap", time.localtime(now))

