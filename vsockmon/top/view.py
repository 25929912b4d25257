"""The full screen of ``vsockmon top``: a Textual app over a :class:`TopModel` and a feed.

Textual, not ``rich.live``: the screen needs keys (sort, filter input, pause, select, save),
a scrolling selectable table and an input line, which rich.live leaves to the caller; and
Textual's pilot drives the real app in tests, keystroke by keystroke, and renders its screen
to SVG for the documentation's screenshot.

Two timers: every :data:`~vsockmon.top.source.FEED_EVERY_S` frames move from the feed into
the model (so the capture's queue stays short whatever ``-d`` is); every ``delay`` seconds a
snapshot redraws the table (unless paused).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Footer, Input, Static

from vsockmon.errors import VsockmonError
from vsockmon.top.model import Row, Snapshot, TopModel, credit, rate
from vsockmon.top.source import FEED_EVERY_S, Feed, save_name


@dataclass(frozen=True)
class Column:
    """A column of the table: its title, how to show a row's value and how to sort on it."""

    key: str
    title: str
    show: Callable[[Row], str]
    sort: Callable[[Row], Any]


def _opt(value: int | None) -> int:
    return -1 if value is None else value


COLUMNS = (
    Column("stream", "stream", lambda r: str(r.stream), lambda r: r.stream),
    Column("client", "client", lambda r: r.client, lambda r: r.client),
    Column("server", "server", lambda r: r.server, lambda r: r.server),
    Column("type", "type", lambda r: r.type, lambda r: r.type),
    Column("state", "state", lambda r: r.state, lambda r: r.state),
    Column("age", "age", lambda r: f"{r.age_s:.1f}s", lambda r: r.age_s),
    Column("bytes_c2s", "c→s B", lambda r: str(r.bytes_c2s), lambda r: r.bytes_c2s),
    Column("bytes_s2c", "s→c B", lambda r: str(r.bytes_s2c), lambda r: r.bytes_s2c),
    Column("rate_c2s", "c→s B/s", lambda r: rate(r.rate_c2s), lambda r: r.rate_c2s),
    Column("rate_s2c", "s→c B/s", lambda r: rate(r.rate_s2c), lambda r: r.rate_s2c),
    Column("free_c2s", "c→s free", lambda r: credit(r.peer_free_c2s, r.buf_alloc_c2s),
           lambda r: _opt(r.peer_free_c2s)),
    Column("free_s2c", "s→c free", lambda r: credit(r.peer_free_s2c, r.buf_alloc_s2c),
           lambda r: _opt(r.peer_free_s2c)),
    Column("stall", "stall", lambda r: f"{r.stall_ms:.0f}ms" if r.stall_ms else "-",
           lambda r: r.stall_ms),
    Column("last_op", "last op", lambda r: r.last_op or "-", lambda r: r.last_op),
    Column("finding", "finding", lambda r: r.finding or "-",
           lambda r: (r.finding or "").startswith(("ERROR", "WARNING"))),
)

_FINDING_STYLE = {"ERROR": "bold red", "WARNING": "yellow", "INFO": "cyan"}


class TopApp(App[None]):
    """The live table, a status line, and on demand a connection's ladder and findings."""

    TITLE = "vsockmon top"
    CSS = """
    #status { height: 1; background: $primary-background; padding: 0 1; }
    #table { height: 1fr; }
    #detail { height: 45%; border-top: solid $accent; display: none; }
    #detail.open { display: block; }
    #ask { display: none; }
    #ask.open { display: block; }
    """
    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("q", "quit", "quit"),
        Binding("ctrl+c", "quit", "quit", show=False, priority=True),
        Binding("s", "sort(1)", "sort"),
        Binding("S", "sort(0)", "reverse", key_display="S"),
        Binding("slash", "ask('filter')", "filter", key_display="/"),
        Binding("p", "pause", "pause"),
        Binding("w", "ask('save')", "write pcap"),
        Binding("escape", "close", "close", show=False),
    ]

    def __init__(self, feed: Feed, model: TopModel, delay: float = 1.0,
                 ready_s: float | None = None) -> None:
        super().__init__()
        self.feed, self.model, self.delay = feed, model, delay
        self.ready_s = ready_s
        self.sort_index, self.reverse = 0, False
        self.paused = False
        self.selected: int | None = None
        self.snap: Snapshot | None = None
        self.message = ""
        self._asking: str | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="status")
        table: DataTable[Text] = DataTable(id="table", cursor_type="row", zebra_stripes=False)
        for col in COLUMNS:
            table.add_column(col.title, key=col.key)
        yield table
        yield Input(id="ask")
        with VerticalScroll(id="detail"):
            yield Static(id="ladder")
        yield Footer()

    def on_mount(self) -> None:
        if self.ready_s is not None:
            self.message = f"ready {self.ready_s:.2f} s after start"
        self.set_interval(FEED_EVERY_S, self.poll)
        self.set_interval(self.delay, self.refresh_view)
        self.poll()
        self.refresh_view()
        self.query_one(DataTable).focus()

    # -- timers ---------------------------------------------------------------------------

    def poll(self) -> None:
        """Move captured frames into the model; leave when a live capture stopped."""
        self.model.feed(self.feed.take())
        if self.feed.live and self.feed.finished:
            self.exit()

    def refresh_view(self) -> None:
        if self.paused:
            return
        self.poll()
        self.snap = self.model.snapshot(self.feed.now_ns(), self.feed.drops)
        self._fill_table()
        self._show_detail()
        self._show_status()

    # -- drawing --------------------------------------------------------------------------

    def _sorted(self, rows: list[Row]) -> list[Row]:
        col = COLUMNS[self.sort_index]
        return sorted(rows, key=lambda r: (col.sort(r), r.stream), reverse=self.reverse)

    def _fill_table(self) -> None:
        assert self.snap is not None
        table: DataTable[Text] = self.query_one(DataTable)
        keep = None  # the cursor stays on its connection while rows move
        if table.row_count:
            keep = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        table.clear()
        for row in self._sorted(self.snap.rows):
            cells = []
            for col in COLUMNS:
                style = "dim" if row.ended else ""
                if col.key == "finding" and row.finding and not row.ended:
                    style = _FINDING_STYLE[row.finding.split(" ", 1)[0]]
                elif col.key == "stall" and row.stall_ms and not row.ended:
                    style = "bold red"
                cells.append(Text(col.show(row), style=style))
            table.add_row(*cells, key=str(row.stream))
        shown = [str(r.stream) for r in self._sorted(self.snap.rows)]
        if keep in shown:
            table.move_cursor(row=shown.index(keep), animate=False)

    def _show_status(self) -> None:
        snap = self.snap
        assert snap is not None
        problems = sum(1 for f in snap.findings if str(f.severity) != "info")
        drops = "" if snap.drops is None else f", {snap.drops} dropped"
        order = "↑" if not self.reverse else "↓"
        parts = [f"{len(snap.rows)} connections, {snap.frames} frames{drops}, "
                 f"{problems} problem(s)", f"sort {COLUMNS[self.sort_index].title} {order}"]
        if self.model.filter_text:
            parts.append(f"filter {self.model.filter_text}")
        if self.paused:
            parts.append("PAUSED")
        if self.feed.error:
            parts.append(self.feed.error)
        if self.message:
            parts.append(self.message)
        self.query_one("#status", Static).update(" │ ".join(parts))

    def _show_detail(self) -> None:
        panel = self.query_one("#detail")
        if self.selected is None:
            panel.remove_class("open")
            return
        panel.add_class("open")
        lines = self.model.ladder_lines(self.selected)
        if not lines:
            lines = [f"stream {self.selected}: gone"]
        text = Text("\n".join(lines))
        found = self.model.findings_of(self.selected)
        for f in found:
            text.append(f"\n{str(f.severity).upper()} {f.rule_id}: ",
                        style=_FINDING_STYLE[str(f.severity).upper()])
            text.append(f"{f.message}\n  fix: {f.fix}")
        if not found:
            text.append("\nno findings", style="dim")
        self.query_one("#ladder", Static).update(text)

    # -- keys -----------------------------------------------------------------------------

    def action_sort(self, step: int) -> None:
        if step:
            self.sort_index = (self.sort_index + 1) % len(COLUMNS)
        else:
            self.reverse = not self.reverse
        self._redraw()

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        index = [c.key for c in COLUMNS].index(str(event.column_key.value))
        self.reverse = not self.reverse if index == self.sort_index else False
        self.sort_index = index
        self._redraw()

    def action_pause(self) -> None:
        self.paused = not self.paused
        if not self.paused:
            self.refresh_view()
        else:
            self._show_status()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.selected = int(str(event.row_key.value))
        self._show_detail()

    def action_close(self) -> None:
        ask = self.query_one(Input)
        if ask.has_class("open"):
            ask.remove_class("open")
            self._asking = None
        else:
            self.selected = None
            self._show_detail()
        self.query_one(DataTable).focus()

    def action_ask(self, what: str) -> None:
        ask = self.query_one(Input)
        self._asking = what
        if what == "filter":
            ask.placeholder = "display filter, e.g. port == 1024 and type == STREAM (empty: all)"
            ask.value = self.model.filter_text or ""
        else:
            ask.placeholder = "write what was captured so far to this pcap"
            ask.value = save_name()
        ask.add_class("open")
        ask.focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        what, self._asking = self._asking, None
        event.input.remove_class("open")
        self.query_one(DataTable).focus()
        try:
            if what == "filter":
                self.model.set_filter(event.value)
                self.message = ""
            elif what == "save" and event.value.strip():
                name = event.value.strip()
                frames = self.feed.spool.save(name)
                full = " (the first ones: the spool is full, see --keep)" \
                    if self.feed.spool.full else ""
                self.message = f"wrote {frames} frames to {name}{full}"
        except VsockmonError as e:
            self.message = str(e)
        self._redraw()

    def _redraw(self) -> None:
        """Show a changed sort or filter at once, without a new snapshot when paused."""
        if self.paused and self.snap is not None:
            self._fill_table()
            self._show_status()
        else:
            self.refresh_view()
