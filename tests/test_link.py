"""vsockmon link management, on any host: these tests never create, change or delete a link
of the machine they run on (the host's kernel may well have vsockmon, and its vsockmon0 may
be in use). Link commands only name links that cannot exist; the teardown guarantees and the
left-behind marker are checked with the netlink calls replaced. What needs a real kernel —
creating the link, a kernel that cannot load vsockmon — runs in the lab
(tests/test_link_lab.py, which also runs this file inside the VM, beside a live vsockmon0)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vsockmon.live import link
from vsockmon.live.link import LinkError, LinkState, LinkStatus, Marker, Terminated

VSOCKMON = str(Path(sys.executable).with_name("vsockmon"))


@pytest.fixture(autouse=True)
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(link.RUN_DIR_ENV, str(tmp_path / "run"))
    return tmp_path / "run"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VSOCKMON, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def _absent_name() -> str:
    """A link name no machine has: 15 characters at most, unique to this test run."""
    return f"vsmt{os.getpid() % 100000:05d}x"


def test_status_and_down_of_an_absent_link() -> None:
    name = _absent_name()
    assert link.get_link(name) is None
    done = _cli("link", "status", "-i", name)
    assert (done.returncode, done.stdout) == (0, f"{name}: absent\n")
    done = _cli("link", "down", "-i", name)
    assert (done.returncode, done.stdout) == (0, f"{name}: absent, nothing to do\n")
    done = _cli("link", "status", "-i", name, "--json")
    assert json.loads(done.stdout)["exists"] is False


def test_capabilities_come_from_capeff(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t0000000000003000\n")
    caps = link.capabilities(str(status))
    assert caps == 0x3000
    assert link.has_capability(link.CAP_NET_ADMIN, caps)
    assert link.has_capability(link.CAP_NET_RAW, caps)
    assert not link.has_capability(link.CAP_NET_ADMIN, 0x2000)


def test_missing_cap_net_admin_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(link, "capabilities", lambda *a: 0x2000)  # CAP_NET_RAW only
    with pytest.raises(LinkError, match=r"creating vsockmon0 needs CAP_NET_ADMIN, which this "
                                        r"process lacks \(CapEff 0x2000"):
        link.create_link()


def test_kernel_config_parsing() -> None:
    text = "# comment\nCONFIG_VSOCKMON=m\n# CONFIG_VHOST_VSOCK is not set\nCONFIG_X=\"a b\"\n"
    assert link.parse_config(text) == {"CONFIG_VSOCKMON": "m", "CONFIG_X": "a b"}


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_marker_tells_a_left_behind_link_from_one_in_use(run_dir: Path) -> None:
    link.write_marker("vsockmon0")
    assert link.read_marker("vsockmon0") == Marker(os.getpid(), running=True)
    pid = _dead_pid()
    (run_dir / "vsockmon0.pid").write_text(f"{pid} 12345\n")
    assert link.read_marker("vsockmon0") == Marker(pid, running=False)
    # a live pid with another start time is a reused pid, not the creator
    (run_dir / "vsockmon0.pid").write_text(f"{os.getpid()} 1\n")
    assert link.read_marker("vsockmon0") == Marker(os.getpid(), running=False)

    state = LinkState("vsockmon0", 7, 826, "vsockmon", True, 65568)
    st = LinkStatus("vsockmon0", state, Marker(pid, running=False))
    assert st.describe() == (f"vsockmon0: up, index 7, mtu 65568, left behind by pid {pid} "
                             "(not running); remove it with: vsockmon link down -i vsockmon0")
    assert st.as_dict()["left_behind"] is True
    assert "created by pid 5 (running)" in LinkStatus("vsockmon0", state,
                                                      Marker(5, True)).describe()
    assert "persistent" in LinkStatus("vsockmon0", state, None).describe()


class FakeKernel:
    """Stands in for the netlink calls: records what managed_link does to the link."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, existing: LinkState | None) -> None:
        self.state = existing
        self.calls: list[str] = []
        monkeypatch.setattr(link, "get_link", lambda name: self.state)
        monkeypatch.setattr(link, "create_link", self.create)
        monkeypatch.setattr(link, "delete_link", self.delete)
        monkeypatch.setattr(link, "set_up", self.set_up)
        monkeypatch.setattr(link, "capabilities", lambda *a: 0x3000)

    def create(self, name: str) -> LinkState:
        self.calls.append("create")
        self.state = LinkState(name, 9, 826, "vsockmon", True, 65568)
        return self.state

    def delete(self, name: str) -> bool:
        self.calls.append("delete")
        self.state = None
        return True

    def set_up(self, state: LinkState, up: bool) -> None:
        self.calls.append("up" if up else "down")


def test_a_created_link_is_removed_on_exception(monkeypatch: pytest.MonkeyPatch,
                                                run_dir: Path) -> None:
    kernel = FakeKernel(monkeypatch, None)
    with pytest.raises(RuntimeError), link.managed_link() as held:
        assert held.created and (run_dir / "vsockmon0.pid").exists()
        raise RuntimeError("boom")
    assert kernel.calls == ["create", "delete"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_created_link_is_removed_on_sigterm(monkeypatch: pytest.MonkeyPatch, sig: int) -> None:
    kernel = FakeKernel(monkeypatch, None)
    before = signal.getsignal(sig)
    # Unblocked here (an earlier test or library may leave it blocked in this thread: a full
    # suite once failed so), sent to this thread, then time for the interpreter to run the
    # handler: a sleep returns early on a signal, and the handler raises there.
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    try:
        with pytest.raises(Terminated), link.managed_link():
            signal.pthread_kill(threading.get_ident(), sig)
            for _ in range(100):
                time.sleep(0.01)
            raise AssertionError("not interrupted")
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    assert kernel.calls == ["create", "delete"]
    assert signal.getsignal(sig) is before


def test_a_created_link_is_removed_on_ctrl_c(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = FakeKernel(monkeypatch, None)
    with pytest.raises(KeyboardInterrupt), link.managed_link():
        raise KeyboardInterrupt
    assert kernel.calls == ["create", "delete"]


def test_a_pre_existing_link_is_left_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = FakeKernel(monkeypatch, LinkState("vsockmon0", 3, 826, "vsockmon", True, 65568))
    with link.managed_link() as held:
        assert not held.created
    assert kernel.calls == []
    kernel = FakeKernel(monkeypatch, LinkState("vsockmon0", 3, 826, "vsockmon", False, 65568))
    with pytest.raises(RuntimeError), link.managed_link():
        raise RuntimeError
    assert kernel.calls == ["up", "down"]


def test_a_link_of_another_kind_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeKernel(monkeypatch, LinkState("vsockmon0", 3, 1, "dummy", True, 1500))
    with pytest.raises(LinkError, match="not a vsockmon link"), link.managed_link():
        pass


def test_rtnetlink_lookup_of_real_links() -> None:
    """The same requests that manage vsockmon0, read-only on the host's loopback."""
    lo = link.get_link("lo")
    assert lo is not None and lo.name == "lo" and lo.ifi_type == 772 and lo.up
    assert lo.mtu > 0 and lo.index == socket.if_nametoindex("lo") and not lo.is_vsockmon
    assert link.get_link("no-such-link0") is None


@pytest.mark.parametrize(
    ("config", "modules", "modprobe", "tree", "expected"),
    [
        ({}, True, "modprobe: FATAL: Module vsockmon not found in directory /lib/modules/x",
         None, "cannot load module vsockmon: modprobe: FATAL: Module vsockmon not found in "
               "directory /lib/modules/x (no /lib/modules/"),
        ({"CONFIG_VSOCKETS": "y"}, True, None, True, "is built without CONFIG_VSOCKMON (per "),
        ({"CONFIG_VSOCKETS": "y"}, False, None, None,
         "is built without CONFIG_VSOCKMON (and cannot load modules)"),
    ],
    ids=["container", "no-config-option", "no-modules"],
)
def test_why_the_link_kind_is_missing(monkeypatch: pytest.MonkeyPatch, config: dict,
                                      modules: bool, modprobe: str | None, tree: bool | None,
                                      expected: str) -> None:
    monkeypatch.setattr(link, "kernel_config",
                        lambda *a: (config, "/boot/config-x" if config else None))
    monkeypatch.setattr(link, "modules_supported", lambda: modules)
    monkeypatch.setattr(link, "module_available", lambda *a: tree)
    assert expected in link._explain_missing_kind(modprobe)
