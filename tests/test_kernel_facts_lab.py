"""The kernel table (vsockmon/live/kernel_facts.py, which doctor reports) held against the
real kernels the lab boots: each measured fact is measured again here, on each kernel.

The split-packet tap length needs the nested guest; tests/test_lab.py's nested test checks
it against the same table in the same boot it already makes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from vsockmon.lab import Lab
from vsockmon.live import kernel_facts as kf

pytestmark = pytest.mark.lab

PROBE = Path(__file__).with_name("kernel_probe.py")


def test_the_kernel_does_what_the_table_says(lab: Lab, tmp_path: Path) -> None:
    done = lab.run([sys.executable, str(PROBE)], cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.output
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("FACTS "))
    facts = json.loads(line.removeprefix("FACTS "))
    version = kf.upstream_version(facts["proc_version"], facts["release"])
    assert version in kf.MEASURED, f"{facts['release']} ({version}) is not in the table"
    table = kf.MEASURED[version]
    assert facts["release"] == table.release == lab.kernel
    zc = facts["zerocopy"]
    # Whatever the kernel does with MSG_ZEROCOPY, every byte arrives (the fallback is a
    # plain send); the defect is the tap showing other bytes than were sent.
    assert zc["received"] == zc["sent"] == 65536
    assert zc["supported"] is table.zerocopy
    assert (not zc["tap_equal"]) is table.has["nonlinear-tap"]
    tiny = facts["tiny_writes"]
    reset = bool(tiny["send_error"] or tiny["recv_error"])
    assert reset is table.has["skb-overhead-reset"]
    if not reset:
        assert tiny["received"] == tiny["count"] == 20000
    # SO_VM_SOCKETS_BUFFER_*: Linux's defaults (256 KiB, min 128, max 256 KiB).
    assert facts["options"] == {"buffer_size": 262144, "buffer_min": 128, "buffer_max": 262144}
