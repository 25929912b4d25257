"""The Dask side of a fleet run: a client on an existing cluster or on a local one started
for the run, and the tasks — one per capture — whose results come back as they finish.

Failures stay per capture: a capture that cannot be read, a worker that dies on it, or a
bug, becomes an :class:`Outcome` with the capture's path and the reason, and the others go
on. Only a cluster that cannot be reached stops the run (as a :class:`FleetError`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vsockmon.errors import VsockmonError
from vsockmon.fleet.sources import Capture, FleetError
from vsockmon.fleet.worker import CaptureResult, Request, analyse_capture

if TYPE_CHECKING:
    from distributed import Client

LOCAL_CONFIG = {"distributed.worker.profile.enabled": False,
                "distributed.worker.multiprocessing-method": "forkserver"}
"""Dask settings of the local cluster. No statistical profiler on the workers: sampling
the stack every 10 ms made each capture's analysis several times slower. Workers forked
from a clean server process rather than spawned: they start and stop in about half the
time, without forking a process that has threads (benchmarks/bench_fleet.py)."""
CONNECT_TIMEOUT = 5.0
"""Seconds to wait for a scheduler: a wrong address fails in this time, not Dask's 30 s."""


@dataclass
class Outcome:
    """What became of one capture: its result, or why there is none."""

    capture: Capture
    result: CaptureResult | None = None
    error: str | None = None
    """One line naming the capture: why it could not be analysed."""


MAX_LOCAL_WORKERS = 256
"""The most processes of a local cluster: a mistyped ``--workers`` must not fork a million
(each is a Python interpreter with vsockmon loaded, about 100 MB)."""


@contextmanager
def connect(scheduler: str | None = None, workers: int | None = None,
            timeout: float = CONNECT_TIMEOUT) -> Iterator[Client]:
    """A Dask client: on the scheduler at ``scheduler`` (``tcp://HOST:PORT``), or on a
    local cluster of ``workers`` single-threaded processes (one per core by default) that
    lives as long as the context. Our analysis holds the GIL: processes, not threads."""
    import dask
    from distributed import Client, LocalCluster

    if scheduler is None:
        n = workers or os.cpu_count() or 1
        # No dashboard; its HTTP server (which the scheduler starts anyway) on any free
        # port of 127.0.0.1, not a warning when 8787 is taken.
        with dask.config.set(LOCAL_CONFIG), \
                LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                             host="127.0.0.1", dashboard_address=None,
                             silence_logs=logging.CRITICAL,
                             scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}) as cluster, \
                Client(cluster) as client:
            yield client
        return
    try:
        client = Client(scheduler, timeout=f"{timeout}s")
    except (OSError, TimeoutError, ValueError, TypeError) as e:
        raise FleetError(f"{scheduler}: cannot reach the Dask scheduler: {e}") from None
    with client:
        yield client


def _task(source: str, request: Request) -> CaptureResult | str:
    """The worker's task: a capture's result, or the one line saying why it has none. An
    unreadable capture is an expected outcome, not a task failure for Dask to log."""
    try:
        return analyse_capture(source, request)
    except VsockmonError as e:
        return str(e)


def _reason(capture: Capture, error: BaseException | str) -> str:
    """One line naming the capture: our own errors say it already; others get it added."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return text if text.startswith(capture.source) else f"{capture.source}: {text}"


def run(client: Client, captures: Sequence[Capture], request: Request,
        on_done: Callable[[Outcome], None] | None = None) -> Iterator[Outcome]:
    """Analyse every capture as one task on the cluster; yield each outcome as it finishes
    (in no particular order), after telling ``on_done``."""
    from distributed import as_completed

    futures = client.map(_task, [c.source for c in captures], request=request,
                         pure=False, key=[f"vsockmon-{i}-{c.name}" for i, c in
                                          enumerate(captures)])
    capture_of = {f.key: c for f, c in zip(futures, captures, strict=True)}
    # Results are gathered as tasks finish, concurrently, not one round trip at a time.
    for future, value in as_completed(futures, with_results=True, raise_errors=False):
        capture = capture_of.pop(future.key)
        future.release()
        outcome = Outcome(capture, result=value) if isinstance(value, CaptureResult) \
            else Outcome(capture, error=_reason(capture, _failure(value)))
        if on_done is not None:
            on_done(outcome)
        yield outcome


def _failure(value: object) -> BaseException | str:
    """What a task that did not return a result gave instead: our one-line reason, or the
    exception (Dask hands a failed task's as ``(type, exception, traceback)``)."""
    if isinstance(value, tuple) and len(value) == 3 and isinstance(value[1], BaseException):
        return value[1]
    if isinstance(value, BaseException | str):
        return value
    return f"unexpected task result {value!r}"
