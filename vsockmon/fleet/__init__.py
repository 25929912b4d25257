"""Many captures, many hosts: one analysis task per capture on a Dask cluster.

- :mod:`~vsockmon.fleet.sources` — SOURCES (directories, globs, files, fsspec URLs) to
  :class:`Capture` s with their host and name.
- :mod:`~vsockmon.fleet.worker` — what a worker runs on one capture (the library's
  analysis, returned as Arrow tables and dicts).
- :mod:`~vsockmon.fleet.cluster` — a client on an existing or a local cluster, and the run.
- :mod:`~vsockmon.fleet.dataset` — the Hive-partitioned dataset (``host=…/capture=…``).
- :mod:`~vsockmon.fleet.findings` — findings grouped by rule across captures and hosts.

Nothing here uses click: the ``vsockmon fleet`` command (vsockmon.cli.fleet) is a shell.
"""

from vsockmon.fleet.cluster import CONNECT_TIMEOUT, MAX_LOCAL_WORKERS, Outcome, connect, run
from vsockmon.fleet.sources import HOST_FROM_DEFAULT, HOST_FROM_NAMED, Capture, FleetError, expand
from vsockmon.fleet.worker import CaptureResult, Request, analyse_capture

__all__ = [
    "CONNECT_TIMEOUT", "HOST_FROM_DEFAULT", "HOST_FROM_NAMED", "MAX_LOCAL_WORKERS", "Capture",
    "CaptureResult",
    "FleetError", "Outcome", "Request", "analyse_capture", "connect", "expand", "run",
]
