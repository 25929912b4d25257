"""The full screen of ``vsockmon top``, driven by keystrokes: Textual's pilot on the app
itself (its rendered screen read back from the SVG it exports), and the real command in a
tmux pane (read with ``capture-pane``). Both replay committed fixtures, so they run on the
host; the live screen is exercised in the lab (tests/test_top_lab.py).
"""

from __future__ import annotations

import asyncio
import html
import re
import subprocess
import sys
import time
from pathlib import Path

from vsockmon.top.model import TopModel
from vsockmon.top.source import ReplayFeed
from vsockmon.top.view import TopApp
from vsockmon.wire.pcapio import open_capture

FIXTURES = Path(__file__).parent.parent / "fixtures"
VSOCKMON = str(Path(sys.executable).with_name("vsockmon"))
CELL_X = 12.2
"""Width of a cell in Textual's SVG (its font size 20 × 0.61)."""
_TEXT = re.compile(r'<text class="[^"]*" x="([\d.]+)" y="[\d.]+" textLength="[\d.]+" '
                   r'clip-path="url\(#[\w-]+-line-(\d+)\)">([^<]*)</text>')


def screen_lines(app: TopApp) -> list[str]:
    """What the screen shows, one string per terminal line (from Textual's SVG export)."""
    rows: dict[int, dict[int, str]] = {}
    for x, line, text in _TEXT.findall(app.export_screenshot()):
        rows.setdefault(int(line), {})[round(float(x) / CELL_X)] = \
            html.unescape(text).replace("\xa0", " ")
    out = []
    for n in range(max(rows) + 1 if rows else 0):
        line = ""
        for col, text in sorted(rows.get(n, {}).items()):
            line = line.ljust(col) + text
        out.append(line)
    return [line.strip() for line in out]  # the status line and the table have a margin


def table_rows(lines: list[str]) -> list[list[str]]:
    """The table's rows (those starting with a stream number), split into cells."""
    return [line.split() for line in lines
            if re.match(r"^\d+ ", line) and "connections," not in line]


async def _settle(pilot: object, app: TopApp) -> None:
    """Let the keys take effect, then take a snapshot as the timer would."""
    await pilot.pause()  # type: ignore[attr-defined]
    app.refresh_view()
    await pilot.pause()  # type: ignore[attr-defined]


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_keys_sort_filter_pause_select_and_save(tmp_path: Path) -> None:
    """many-connections.pcap (fixtures/README.md): 8 clients on port 5005, each sending
    its line 1–8 times; every connection closed."""
    with open_capture(str(FIXTURES / "real/many-connections.pcap")) as reader:
        frames = list(reader.records())

    async def scenario() -> None:
        feed = ReplayFeed(str(FIXTURES / "real/many-connections.pcap"), pace=False).start()
        model = TopModel(linger_s=1e9)
        app = TopApp(feed, model, delay=0.2)
        try:
            async with app.run_test(size=(200, 50)) as pilot:
                await _settle(pilot, app)
                lines = screen_lines(app)
                assert lines[0].startswith(f"8 connections, {len(frames)} frames")
                assert "sort stream ↑" in lines[0]
                rows = table_rows(lines)
                assert [r[0] for r in rows] == [str(i) for i in range(8)]
                assert all(r[2] == "1:5005" and r[3] == "STREAM" and r[4] == "closed"
                           for r in rows)
                # sort: s moves to the next column (client), S reverses
                await pilot.press("s", "S")
                await _settle(pilot, app)
                lines = screen_lines(app)
                assert "sort client ↓" in lines[0]
                clients = [r[1] for r in table_rows(lines)]
                assert clients == sorted(clients, reverse=True)
                # filter with the display-filter language
                await pilot.press("slash", *"port == 5005 and cid == 1", "enter")
                await _settle(pilot, app)
                assert len(table_rows(screen_lines(app))) == 8
                await pilot.press("slash", *"port == 5006", "enter")
                await _settle(pilot, app)
                lines = screen_lines(app)
                assert table_rows(lines) == [] and "filter port == 5006" in lines[0]
                await pilot.press("slash", "ctrl+u", "enter")  # an empty filter: all again
                await _settle(pilot, app)
                assert len(table_rows(screen_lines(app))) == 8
                # a bad filter says why on the status line and leaves the view as it was
                await pilot.press("slash", *"port ==", "enter")
                await _settle(pilot, app)
                lines = screen_lines(app)
                assert "bad filter" in lines[0] and len(table_rows(lines)) == 8
                # pause
                await pilot.press("p")
                await pilot.pause(0.1)
                assert "PAUSED" in screen_lines(app)[0]
                await pilot.press("p")
                await _settle(pilot, app)
                assert "PAUSED" not in screen_lines(app)[0]
                # select the first row: its ladder (client 1:... ↔ server 1:5005) below
                await pilot.press("home", "enter")
                await _settle(pilot, app)
                lines = screen_lines(app)
                top_client = clients[0]
                title = next(line for line in lines if re.match(r"stream \d+ ", line))
                assert f"client {top_client}" in title and "server 1:5005" in title
                assert any("REQUEST" in line and "▶" in line for line in lines)
                assert any("RST" in line for line in lines)
                assert "no findings" in "\n".join(lines)
                await pilot.press("escape")
                await _settle(pilot, app)
                assert not any(re.match(r"stream \d+ ", line) for line in screen_lines(app))
                # w: write what was replayed so far; never over an existing file
                out = tmp_path / "saved.pcap"
                await pilot.press("w", "ctrl+u", *str(out), "enter")
                await _settle(pilot, app)
                assert f"wrote {len(frames)} frames to {out}" in screen_lines(app)[0]
                await pilot.press("w", "ctrl+u", *str(out), "enter")
                await _settle(pilot, app)
                assert "exists; not overwritten" in screen_lines(app)[0]
                await pilot.press("q")
        finally:
            feed.stop()

    run(scenario())
    with open_capture(str(tmp_path / "saved.pcap")) as reader:
        assert [(r.ts_ns, r.data) for r in reader.records()] == \
            [(r.ts_ns, r.data) for r in frames]


def test_a_stalled_connection_shows_its_stall_and_finding() -> None:
    """window-full.pcap: a reader with a 4 KiB buffer that never reads (fixtures/README.md);
    replayed at once, the screen's clock is the capture's last frame."""

    async def scenario() -> None:
        feed = ReplayFeed(str(FIXTURES / "diagnose/window-full.pcap"), pace=False).start()
        app = TopApp(feed, TopModel(), delay=0.2)
        try:
            async with app.run_test(size=(200, 50)) as pilot:
                await _settle(pilot, app)
                lines = screen_lines(app)
                (row,) = [r for r in table_rows(lines) if r[2] == "1:5200"]
                assert row[4] == "open"
                assert "0:4K" in row  # no free credit of a 4 KiB window
                assert any(c.endswith("ms") for c in row)
                assert row[-1] == "window-full/not-reading" and row[-2] == "WARNING"
                assert "1 problem(s)" in lines[0]
                await pilot.press("home", "enter")
                await _settle(pilot, app)
                text = "\n".join(screen_lines(app))
                assert "WARNING window-full/not-reading:" in text
                assert "credit=0 stall" in text
        finally:
            feed.stop()

    run(scenario())


def test_the_real_command_in_a_terminal(tmp_path: Path) -> None:
    """``vsockmon top -r FILE`` in a tmux pane: keys in, the pane's text out, q to leave."""
    session = f"vsockmon-top-test-{time.monotonic_ns()}"
    fixture = FIXTURES / "real/stream-echo.pcap"

    tmux = ["tmux", "-L", session]  # a server of its own: nobody else's sessions or options

    def pane() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-t", session],
                              capture_output=True, text=True, check=True).stdout

    def wait_for(text: str) -> str:
        for _ in range(300):
            shown = pane()
            if text in shown:
                return shown
            time.sleep(0.1)
        raise AssertionError(f"{text!r} never shown:\n{pane()}")

    subprocess.run([*tmux, "-f", "/dev/null", "new-session", "-d", "-s", session,
                    "-x", "180", "-y", "40", "-c", str(tmp_path),
                    # the size is the pane's: a COLUMNS from the test's environment would win
                    f"env -u COLUMNS -u LINES {VSOCKMON} top -r {fixture} --at-once --linger 1e9; "
                    "echo exited $?; sleep 30"], check=True)
    try:
        shown = wait_for("1:5001")
        row = next(line for line in shown.splitlines() if "1:5001" in line)
        assert row.split()[:5][2:] == ["1:5001", "STREAM", "closed"]
        assert "1016" in row.split()  # 12 + 1000 + 4 bytes each way
        subprocess.run([*tmux, "send-keys", "-t", session, "Enter"], check=True)
        shown = wait_for("graceful, 17 packets, 2032 bytes")
        subprocess.run([*tmux, "send-keys", "-t", session, "q"], check=True)
        assert "exited 0" in wait_for("exited")
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
