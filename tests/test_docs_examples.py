"""Every fenced example of README.md and docs/*.md runs on the committed fixtures, and its
shown output is what the command prints (the rules: tests/docs_examples.py)."""

from __future__ import annotations

import contextlib
import doctest
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from docs_examples import ROOT, RUN, Block, Command, all_blocks, blocks, output_matches

BLOCKS = all_blocks()
SHELL = [pytest.param(b, id=b.id, marks=[pytest.mark.lab] if b.kind == "lab" else [])
         for b in BLOCKS if b.kind in RUN]
PYTHON_PAGES = sorted({b.page for b in BLOCKS if b.kind in ("doctest", "python")})
# What a sandbox sees of the repository: the paths the examples name.
SHARED = ("fixtures", "dissectors", "tests", "benchmarks")
# The names examples use for "any capture of yours": a real lab capture, host and guest
# (CIDs 2 and 3), nothing wrong in it; "captures/" (a directory of them) is fixtures/real.
PLACEHOLDERS = ("cap.pcap", "capture.pcap", "c.pcap")
ANY_CAPTURE = ROOT / "fixtures" / "real" / "host-guest.pcap"
# Printed by tshark to stderr whenever it runs as root: the machine's, not the example's.
NOISE = ('Running as user "root" and group "root". This could be dangerous.',)


_SANDBOXES: dict[tuple[str, Path], tuple[Path, dict[str, str]]] = {}


@pytest.fixture
def sandbox(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The working directory of one page's shell (or Python) examples, shared by them in
    page order (an example may read what one before it wrote), and their environment."""
    params = request.node.callspec.params
    page = params["block"].page if "block" in params else params["page"]
    key = (request.node.originalname, page)
    if key not in _SANDBOXES:
        _SANDBOXES[key] = _new_sandbox(tmp_path_factory.mktemp("docs"))
    return _SANDBOXES[key]


def _new_sandbox(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A working directory with the repository's fixtures, and an environment with our
    venv first on PATH and a private HOME: no Wireshark plugin installed, no config (a block
    whose marker says "plugin installed" gets a HOME with the plugin installed)."""
    for name in SHARED:
        (tmp_path / name).symlink_to(ROOT / name)
    for name in PLACEHOLDERS:
        (tmp_path / name).symlink_to(ANY_CAPTURE)
    (tmp_path / "captures").symlink_to(ROOT / "fixtures" / "real")
    home = tmp_path / ".home"
    home.mkdir()
    plugins = tmp_path / ".home-plugin" / ".local" / "lib" / "wireshark" / "plugins"
    plugins.mkdir(parents=True)  # where `vsockmon wireshark install` puts it
    shutil.copy(ROOT / "dissectors" / "vsockmon.lua", plugins)
    env = {**os.environ, "HOME": str(home), "TZ": "UTC", "NO_COLOR": "1",
           "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("XDG_CONFIG_HOME", None)
    return tmp_path, env


def _run(command: str, cwd: Path, env: dict[str, str],
         timeout: float = 120) -> tuple[int, list[str]]:
    res = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=timeout, check=False)
    lines = (res.stdout + res.stderr).splitlines()
    return res.returncode, [s for s in lines if s.strip() not in NOISE]


def test_every_block_runs_or_says_why() -> None:
    unknown = [b.id for b in BLOCKS if b.kind == "unknown"]
    assert not unknown, f"blocks neither runnable nor marked <!-- not run: REASON -->: {unknown}"
    needs_text = ("not run", "output of", "excerpt of")
    unexplained = [b.id for b in BLOCKS
                   if b.kind in needs_text and not (b.marker and b.marker[1])]
    assert not unexplained, f"markers without a reason or command: {unexplained}"


@pytest.mark.parametrize("block", SHELL)
def test_shell_example(block: Block, sandbox: tuple[Path, dict[str, str]]) -> None:
    cwd, env = sandbox
    if block.marker and block.kind in ("output of", "excerpt of"):
        commands = [Command(block.marker[1], block.lines)]
    else:
        commands = block.commands()
    if block.marker and "plugin installed" in block.marker[1]:
        env = {**env, "HOME": str(cwd / ".home-plugin")}
    if block.kind == "lab":
        env = {**env, "HOME": os.environ["HOME"]}  # the lab's cache (~/.cache/vsockmon/lab)
    for c in commands:
        text, shown, status = c.text, c.output, c.exit_status
        # A lab boot under a loaded host takes minutes (docs/lab.md).
        code, actual = _run(text, cwd, env, timeout=900 if block.kind == "lab" else 120)
        assert code == status, f"$ {text}\nexit {code}, expected {status}:\n" + "\n".join(actual)
        assert output_matches(shown, actual, excerpt=block.kind == "excerpt of"), (
            f"$ {text}\n--- shown\n" + "\n".join(shown) + "\n--- printed\n" + "\n".join(actual))


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=[str(p.relative_to(ROOT)) for p in PYTHON_PAGES])
def test_python_examples(page: Path, sandbox: tuple[Path, dict[str, str]],
                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A page's Python blocks in order, in one namespace: doctests compared, the others
    run (their printing swallowed)."""
    cwd, env = sandbox
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", env["HOME"])
    globs: dict[str, object] = {"__name__": "__docs__"}
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    for block in (b for b in BLOCKS if b.page == page and b.kind in ("doctest", "python")):
        text = "\n".join(block.lines) + "\n"
        if block.kind == "python":
            with contextlib.redirect_stdout(io.TextIOWrapper(io.BytesIO())):
                exec(compile(text, block.id, "exec"), globs)
            continue
        test = doctest.DocTestParser().get_doctest(text, globs, block.id, str(page), block.line)
        report = io.StringIO()
        runner = doctest.DocTestRunner(optionflags=flags)
        runner.run(test, out=report.write, clear_globs=False)
        globs.update(test.globs)  # a DocTest runs in a copy: later blocks see this one's names
        assert not runner.failures, report.getvalue()


def test_echo_fixture_is_the_scenario(tmp_path: Path) -> None:
    """fixtures/synthetic/echo.pcap (docs/analysis.md's examples) is what the connection
    scenarios of the tests write, byte for byte: regenerate it from there if they change."""
    from conntrack_scenarios import echo_capture

    fresh = echo_capture(tmp_path / "echo.pcap")
    assert (ROOT / "fixtures" / "synthetic" / "echo.pcap").read_bytes() == fresh.read_bytes()


# -- the runner's own rules ----------------------------------------------------------------


def test_output_matching_rules() -> None:
    printed = ["a  b   c", "--  --", "1  2   3", "total 1"]
    assert output_matches(["a b c", "-- --", "1 2 3", "total 1"], printed)
    assert not output_matches(["a b c", "1 2 3", "total 1"], printed)  # a line left out
    assert not output_matches(["a b c", "-- --", "1 2 4", "total 1"], printed)  # a digit
    assert output_matches(["a b c", "...", "total 1"], printed)
    assert output_matches(["a … c", "…  (the rule)", "1 … 3", "..."], printed)
    assert not output_matches(["a … d", "..."], printed)
    assert output_matches(["1 2 3"], printed, excerpt=True)
    assert not output_matches(["1 2 3"], printed)
    assert not output_matches(["2 3 total"], printed, excerpt=False)


def test_blocks_kinds_commands_and_markers(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("\n".join([
        "```", "$ echo 'a", "b'   # exit status 3", "a", "b", "$ true", "```", "",
        "<!-- not run: needs root -->", "", "```sh", "sudo x", "```",
        "<!-- run each line -->", "```", "# a comment", "x --y \\", "  z", "w", "```",
        "```", "plain text", "```",
        "  ```python", "  >>> 1", "  1", "  ```"]))
    found = blocks(page)
    assert [b.kind for b in found] == ["session", "not run", "run each line", "unknown",
                                       "doctest"]
    [one, two] = found[0].commands()
    assert (one.text, one.output, one.exit_status) == ("echo 'a\nb'   # exit status 3",
                                                        ["a", "b"], 3)
    assert (two.text, two.output, two.exit_status) == ("true", [], 0)
    assert found[1].marker == ("not run", "needs root")
    assert [c.text for c in found[2].commands()] == ["x --y \\\n  z", "w"]
    assert found[4].lines == [">>> 1", "1"] and found[4].line == 24
