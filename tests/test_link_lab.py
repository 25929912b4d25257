"""The host-facing tests against real kernels, in the lab VM (a kernel *with* vsockmon).

The suite must pass on a user's Debian host, whose stock kernel has CONFIG_VSOCKMON=m and
may have a vsockmon0 in use, and must never touch that host's links. The lab is such a
host: these tests run the host-facing test files inside it, beside a vsockmon0 the "user"
made, and check that link is still there, untouched. They also check the verdicts that need
a real kernel: doctor on a kernel with vsockmon, and on one that cannot load it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from vsockmon.lab import Lab

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parent.parent
HOST_FACING = ("tests/test_link.py", "tests/test_doctor.py", "tests/test_capture.py")

# One boot for the whole sequence: the user's link first, then the host-facing tests beside
# it, then a kernel that can no longer load vsockmon (module removed, no module tree).
SCRIPT = f"""
ip link add vsockmon0 type vsockmon && ip link set vsockmon0 up
echo "before: $(cat /sys/class/net/vsockmon0/ifindex) $(cat /sys/class/net/vsockmon0/operstate)"
(cd {ROOT} && {sys.executable} -m pytest -q -p no:cacheprovider -m 'not lab' \\
    {' '.join(HOST_FACING)}) > host-suite.txt 2>&1
echo "suite: $?"
echo "after: $(cat /sys/class/net/vsockmon0/ifindex) $(cat /sys/class/net/vsockmon0/operstate)"
echo "links: $(ls /sys/class/net | tr '\\n' ' ')"
vsockmon doctor > doctor-with.txt; echo "doctor with: $?"
ip link del vsockmon0 && rmmod vsockmon
vsockmon doctor > doctor-without.txt; echo "doctor without: $?"
vsockmon link up 2> link-up.txt; echo "link up: $?"
vsockmon capture -w t.pcap -c 1 2> capture.txt; echo "capture: $?"
echo "capture file: $(ls t.pcap 2>/dev/null || echo none)"
echo "links at the end: $(ls /sys/class/net | tr '\\n' ' ')"
"""


@pytest.fixture(scope="module")
def run(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], Path]:
    out = tmp_path_factory.mktemp("hostfacing")
    done = lab.run(SCRIPT, cwd=out, timeout=900)
    facts = dict(re.findall(r"^([a-z ]+): (.*)$", done.stdout, re.M))
    assert "links at the end" in facts, done.stdout + done.stderr
    return facts, out


def test_host_facing_tests_pass_beside_a_live_vsockmon0_and_leave_it_alone(
        run: tuple[dict[str, str], Path]) -> None:
    facts, out = run
    report = (out / "host-suite.txt").read_text()
    assert facts["suite"] == "0", report
    assert re.search(r"^\d+ passed", report.splitlines()[-1]), report
    # The user's link: same index, still up — not recreated, not deleted, not set down.
    index, state = facts["before"].split()
    assert int(index) > 1  # lo is 1
    assert state in ("unknown", "up")
    assert facts["after"] == facts["before"]
    assert facts["links"].split() == ["lo", "vsockmon0"]


def test_doctor_on_a_kernel_with_vsockmon_says_ready(run: tuple[dict[str, str], Path]) -> None:
    facts, out = run
    lines = (out / "doctor-with.txt").read_text().splitlines()
    assert facts["doctor with"] == "0"
    # The lab's Debian kernel has no readable config (no /boot, no /proc/config.gz), so the
    # verdict comes from the loaded module.
    assert any(ln.startswith("✓ CONFIG_VSOCKMON: module vsockmon loaded") for ln in lines)
    assert "✓ vsockmon0: present" in lines
    assert lines[-1] == "capture: ready"


def test_a_kernel_that_cannot_load_vsockmon(run: tuple[dict[str, str], Path]) -> None:
    facts, out = run
    lines = (out / "doctor-without.txt").read_text().splitlines()
    assert facts["doctor without"] == "1"
    bad = next(ln for ln in lines if "CONFIG_VSOCKMON" in ln)
    assert bad.startswith("✗ CONFIG_VSOCKMON: unknown (no /boot/config-")
    assert "module vsockmon not found" in bad
    assert lines[-1] == "capture: NOT ready (see ✗ above)"
    # `link up` tries modprobe, which has no module tree here: one line that says so.
    err = (out / "link-up.txt").read_text()
    assert facts["link up"] == "1"
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("Error: cannot create vsockmon0: cannot load module vsockmon: ")
    assert "in a container, load it on the host with `modprobe vsockmon`" in err
    # capture says the same in one line, and writes no file.
    err = (out / "capture.txt").read_text()
    assert facts["capture"] == "1" and facts["capture file"] == "none"
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("Error: cannot create vsockmon0: cannot load module vsockmon: ")
    assert facts["links at the end"].split() == ["lo"]
