"""The timeline's drawings read back: the SVG sequence diagram, the credit plot, the HTML
page and the terminal ladder.

One scenario throughout (the one of tests/test_timeline_model.py): a STREAM connection whose
server advertises a 100-byte buffer; the client sends 60, 40 (the window is full: a stall)
and 10 bytes (10 beyond it), the server's CREDIT_UPDATE says it consumed all 110, then a
Linux close. Frames are 1 µs apart (the scenario builder's default delay). Every expected
value is reasoned here from those packets and from what the drawing promises (an arrow from
the sender's lifeline to the receiver's, one row per packet, a step line of bytes in flight
under the receiver's buffer), read back from the SVG's own geometry.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conntrack_scenarios import Conv, write

import vsockmon
from vsockmon.analysis.timeline import (
    Ladder,
    _downsample,
    credit_svg,
    figure,
    html_page,
    ladder,
    sequence_svg,
    text_lines,
)
from vsockmon.conntrack.tracker import StreamRows
from vsockmon.wire.protocol import Op, ShutdownFlag

SVG = "{http://www.w3.org/2000/svg}"
SENDERS = [0, 1, 0, 0, 0, 1, 0, 1]  # REQUEST, RESPONSE, RW×3, CREDIT_UPDATE, SHUTDOWN, RST
LABELS = ["REQUEST buf=262144 fwd=0", "RESPONSE buf=100 fwd=0", "RW len=60 credit=40",
          "RW len=40 credit=0 stall", "RW len=10 credit=-10 OVER",
          "CREDIT_UPDATE buf=100 fwd=110", "SHUTDOWN RCV|SEND", "RST"]


def scenario(tmp_path: Path, *, reply: bool = False) -> Ladder:
    """The connection above; ``reply``: the server also sends 30 bytes before the close."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out, buf=[262144, 100])
    c.open()
    c.send(0, Op.RW, bytes(60))
    c.send(0, Op.RW, bytes(40))
    c.send(0, Op.RW, bytes(10))
    c.fwd[1] = 110
    c.send(1, Op.CREDIT_UPDATE)
    if reply:
        c.send(1, Op.RW, bytes(30))
    c.send(0, Op.SHUTDOWN, flags=ShutdownFlag.RCV | ShutdownFlag.SEND)
    c.send(1, Op.RST)
    rows = StreamRows([0])
    table = vsockmon.open(write(tmp_path / "t.pcap", out)).scan(rows).table
    return ladder(table[0], rows.columns(0))


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)


def lines(root: ET.Element) -> list[dict[str, Any]]:
    return [dict(e.attrib) for e in root.iter(f"{SVG}line")]


def texts(root: ET.Element) -> list[tuple[float, float, str, dict[str, str]]]:
    return [(float(e.get("x", 0)), float(e.get("y", 0)), "".join(e.itertext()), dict(e.attrib))
            for e in root.iter(f"{SVG}text")]


# -- the sequence diagram --------------------------------------------------------------------


def test_each_packet_is_an_arrow_from_its_senders_lifeline_to_its_peers(tmp_path: Path
                                                                         ) -> None:
    root = parse(sequence_svg(scenario(tmp_path)))
    height = float(root.get("height", 0))
    assert root.get("viewBox") == f"0 0 {root.get('width')} {root.get('height')}"
    names = {t: x for x, _, t, _ in texts(root) if t.startswith(("client ", "server "))}
    client_x, server_x = names["client 1:50000"], names["server 1:1234"]
    assert client_x < server_x
    lifelines = [ln for ln in lines(root) if ln["x1"] == ln["x2"]]
    assert sorted(float(ln["x1"]) for ln in lifelines) == [client_x, server_x]
    arrows = [ln for ln in lines(root) if "marker-end" in ln]
    assert len(arrows) == len(SENDERS)
    for ln, sender in zip(arrows, SENDERS, strict=True):
        ends = (client_x, server_x) if sender == 0 else (server_x, client_x)
        assert (float(ln["x1"]), float(ln["x2"])) == ends
        assert ln["y1"] == ln["y2"]
    ys = [float(ln["y1"]) for ln in arrows]
    steps = {b - a for a, b in itertools.pairwise(ys)}
    assert len(steps) == 1 and steps.pop() > 0  # one row per packet, evenly spaced
    top = min(float(ln["y1"]) for ln in lifelines)
    bottom = max(float(ln["y2"]) for ln in lifelines)
    assert top < ys[0] and ys[-1] < bottom < height  # the lifelines run past every arrow


def test_each_arrow_carries_its_label_time_and_frame_on_its_row(tmp_path: Path) -> None:
    root = parse(sequence_svg(scenario(tmp_path)))
    arrows = [ln for ln in lines(root) if "marker-end" in ln]
    all_texts = texts(root)
    names = {t: x for x, _, t, _ in all_texts if t.startswith(("client ", "server "))}
    middle = (names["client 1:50000"] + names["server 1:1234"]) / 2
    labels = [(x, y, t, a) for x, y, t, a in all_texts if t in LABELS]
    assert [t for _, _, t, _ in labels] == LABELS
    times = [t for _, _, t, _ in all_texts if t.startswith("+")]
    assert times == [f"+0.00000{i}" for i in range(8)]  # frames 1 µs apart
    frames = [t for _, _, t, _ in all_texts if t.isdigit()]
    assert frames == [str(i) for i in range(1, 9)]
    for ln, (x, y, _, attrs) in zip(arrows, labels, strict=True):
        assert x == middle and y < float(ln["y1"])  # centred just above its arrow
        assert attrs["fill"] == ln["stroke"]  # in its arrow's colour
    row = {float(ln["y1"]) for ln in arrows}
    time_rows = [y for _, y, t, _ in all_texts if t.startswith("+")]
    frame_rows = [y for _, y, t, _ in all_texts if t.isdigit()]
    assert time_rows == frame_rows and len(set(time_rows)) == 8
    gap = sorted(row)[1] - sorted(row)[0]
    assert all(min(abs(y - r) for r in row) < gap / 2 for y in time_rows)


def test_an_arrow_that_leaves_no_credit_stands_out(tmp_path: Path) -> None:
    """The RWs of frames 4 (credit 0) and 5 (beyond the buffer) are drawn alike, in another
    colour and thicker than the RW of frame 3 that left credit."""
    root = parse(sequence_svg(scenario(tmp_path)))
    arrows = [ln for ln in lines(root) if "marker-end" in ln]
    rw, stall, over = arrows[2], arrows[3], arrows[4]
    assert stall["stroke"] == over["stroke"] != rw["stroke"]
    assert float(stall["stroke-width"]) == float(over["stroke-width"]) > float(
        rw["stroke-width"])
    assert {a["stroke-width"] for i, a in enumerate(arrows) if i not in (3, 4)} == {
        rw["stroke-width"]}
    # the other ops have their own colours: opening, credit, shutdown
    assert len({arrows[i]["stroke"] for i in (0, 2, 5, 6)}) == 4
    assert arrows[0]["stroke"] == arrows[1]["stroke"]  # REQUEST and RESPONSE: the handshake


def test_a_long_diagram_draws_the_first_and_last_packets_and_counts_the_rest(
        tmp_path: Path) -> None:
    """8 packets in 5 rows: the first 2, a note of the 3 left out, the last 3."""
    root = parse(sequence_svg(scenario(tmp_path), max_rows=5))
    frames = [t for _, _, t, _ in texts(root) if t.isdigit()]
    assert frames == ["1", "2", "6", "7", "8"]
    notes = [(y, t) for _, y, t, _ in texts(root) if "not drawn" in t]
    assert [t for _, t in notes] == ["… 3 packets not drawn …"]
    arrows = [float(ln["y1"]) for ln in lines(root) if "marker-end" in ln]
    assert arrows[1] < notes[0][0] < arrows[2]  # in the row between
    full = parse(sequence_svg(scenario(tmp_path)))
    assert float(root.get("height", 0)) < float(full.get("height", 0))


def test_a_marked_frame_has_a_flag_with_its_note(tmp_path: Path) -> None:
    lad = scenario(tmp_path)
    lad.marks = {4: ["window full", "<b>&"]}
    root = parse(sequence_svg(lad))
    flags = [e for e in root.iter(f"{SVG}text") if (e.text or "").startswith("⚑")]
    assert len(flags) == 1
    (title,) = flags[0].iter(f"{SVG}title")
    assert title.text == "window full; <b>&"  # escaped in the file, itself once parsed
    frame4 = next(float(y) for _, y, t, _ in texts(root) if t == "4")
    assert float(flags[0].get("y", 0)) == frame4


# -- the credit plot -------------------------------------------------------------------------


def points(attr: str) -> list[tuple[float, float]]:
    return [(float(a), float(b)) for a, b in (p.split(",") for p in attr.split())]


def test_the_credit_plot_is_a_step_line_of_bytes_in_flight_under_the_buffer(tmp_path: Path
                                                                           ) -> None:
    """The client's bytes in flight after each packet whose credit is known (frames 2-8,
    1-7 µs after the first): 0, 60, 100, 110, then 0 once the CREDIT_UPDATE gives all back;
    the server's buffer is 100 throughout. Scaled into the plot area (the grey rectangle):
    time 0 to the last packet (7 µs) left to right, bytes 0 to the highest value (110)
    bottom to top. The server sent nothing: no line for its direction."""
    root = parse(credit_svg(scenario(tmp_path)))
    area = next(e for e in root.iter(f"{SVG}rect") if e.get("stroke"))
    left, top = float(area.get("x", 0)), float(area.get("y", 0))
    w, h = float(area.get("width", 0)), float(area.get("height", 0))

    def at(t_us: float, v: float) -> tuple[float, float]:
        return left + w * t_us / 7, top + h * (1 - v / 110)

    def step_line(values: list[int]) -> list[tuple[float, float]]:
        ts = range(1, 8)
        out = [at(1, values[0])]
        for j in range(1, 7):
            out += [at(ts[j], values[j - 1]), at(ts[j], values[j])]
        return out

    assert left > 0 and left + w < float(root.get("width", 0))  # room for the labels
    assert top > 0 and top + h < float(root.get("height", 0))
    solid, dashed = root.iter(f"{SVG}polyline")
    assert "stroke-dasharray" not in solid.attrib and "stroke-dasharray" in dashed.attrib
    assert solid.get("stroke") == dashed.get("stroke")  # one direction, one colour
    assert len(list(root.iter(f"{SVG}polyline"))) == 2
    for line, want in ((solid, step_line([0, 60, 100, 110, 0, 0, 0])),
                       (dashed, step_line([100] * 7))):
        got = points(line.get("points", ""))
        assert len(got) == len(want)
        assert np.allclose(got, want, atol=0.06), (got, want)


def test_the_credit_plot_axes_and_legend(tmp_path: Path) -> None:
    """Five labels on each axis, at 0, ¼, ½, ¾ and all of the range (110 bytes, 7 µs), and
    a legend entry per line in the line's colour and dash."""
    root = parse(credit_svg(scenario(tmp_path)))
    area = next(e for e in root.iter(f"{SVG}rect") if e.get("stroke"))
    top, h = float(area.get("y", 0)), float(area.get("height", 0))
    all_texts = texts(root)
    ys = [(y, t) for _, y, t, a in all_texts if a.get("text-anchor") == "end"]
    assert [t for _, t in ys] == ["0", "27", "55", "82", "110"]  # int(110 * i / 4)
    for i, (y, _) in enumerate(ys):  # on its level, 4 px lower (the text's baseline)
        assert y - 4 == pytest.approx(top + h * (1 - i / 4), abs=0.06)
    xs = [t for _, _, t, _ in all_texts if t.endswith("s") and t[0].isdigit()]
    assert xs == [f"{7e-6 * i / 4:.6f}s" for i in range(5)]
    legend = [ln for ln in lines(root)]
    polylines = list(root.iter(f"{SVG}polyline"))
    assert [ln["stroke"] for ln in legend] == [p.get("stroke") for p in polylines]
    assert ["stroke-dasharray" in ln for ln in legend] == [False, True]
    names = [t for _, _, t, _ in all_texts if t.startswith(("in flight", "peer buffer"))]
    assert names == ["in flight client→server", "peer buffer client→server"]


def test_both_directions_get_their_own_colour(tmp_path: Path) -> None:
    root = parse(credit_svg(scenario(tmp_path, reply=True)))
    strokes = [p.get("stroke") for p in root.iter(f"{SVG}polyline")]
    assert len(strokes) == 4 and strokes[0] == strokes[1] != strokes[2] == strokes[3]
    names = [t for _, _, t, _ in texts(root) if t.startswith(("in flight", "peer buffer"))]
    assert names == ["in flight client→server", "peer buffer client→server",
                     "in flight server→client", "peer buffer server→client"]
    legend_x = [float(ln["x1"]) for ln in lines(root)]
    assert legend_x == sorted(set(legend_x))  # side by side, none on another


def _no_data_ladder(tmp_path: Path) -> Ladder:
    """The ladder of a connection opened and closed without a byte sent."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out)
    c.open()
    c.close()
    rows = StreamRows([0])
    table = vsockmon.open(write(tmp_path / "e.pcap", out)).scan(rows).table
    return ladder(table[0], rows.columns(0))


def test_nothing_to_plot_without_data(tmp_path: Path) -> None:
    assert credit_svg(_no_data_ladder(tmp_path)) == (
        '<p class="meta">No data sent with known credit: nothing to plot.</p>')


def test_downsampling_keeps_each_buckets_peak_and_trough() -> None:
    t = np.arange(10_000)
    y = np.zeros(10_000, np.int64)
    y[1234], y[8765] = 500, -7
    kt, ky = _downsample(t, y, 100)
    assert len(kt) <= 100 and list(kt) == sorted(kt)
    assert 500 in ky and -7 in ky and 1234 in kt and 8765 in kt
    assert kt[0] == 0 and kt[-1] >= 10_000 - 10_000 // 50  # the whole span, to its last bucket
    noisy = np.random.default_rng(1).integers(0, 1000, 10_000)
    kt, ky = _downsample(t, noisy, 100)
    assert len(kt) == 100  # 50 buckets of 200 points, each its highest and its lowest
    for i in range(50):
        bucket = noisy[200 * i : 200 * (i + 1)]
        assert sorted(ky[2 * i : 2 * i + 2]) == [bucket.min(), bucket.max()]
    same_t, same_y = _downsample(t[:100], y[:100], 100)
    assert list(same_t) == list(t[:100])  # few enough: all kept
    assert list(same_y) == list(y[:100])
    short_t, _ = _downsample(t[:101], y[:101], 100)
    assert len(short_t) <= 100


# -- the page and the terminal ---------------------------------------------------------------


def test_the_page_names_each_connection_and_sums_it_up(tmp_path: Path) -> None:
    """The summary, from the packets: 60 + 40 + 10 bytes from the client, none back; the
    RESPONSE 1 µs after the REQUEST; one stall from frame 4 (credit 0) to the CREDIT_UPDATE
    of frame 6, 2 µs; frame 5 went beyond the buffer."""
    lad = scenario(tmp_path)
    lad.marks = {5: ["beyond <credit>"]}
    page = html_page("title <&>", [lad], notes=["a note & more"])
    assert page.startswith("<!DOCTYPE html>") and page.endswith("</html>\n")
    assert "<title>title &lt;&amp;&gt;</title>" in page and "<h1>title &lt;&amp;&gt;</h1>" in page
    assert '<p class="meta">a note &amp; more</p>' in page
    assert re.search(r'<h2 id="stream-0">stream 0 ', page)
    assert ('<p class="meta">110 bytes client→server, 0 server→client; handshake 0.001 ms; '
            "1 zero-credit stalls, 0.002 ms; client: 1× beyond-credit (first frame 5)</p>"
            in page)
    assert "<ul><li>⚑ frame 5: beyond &lt;credit&gt;</li></ul>" in page
    assert page.count("<svg") == 2  # the diagram and the plot


def test_the_terminal_ladder_points_each_arrow_at_the_receiver(tmp_path: Path) -> None:
    lad = scenario(tmp_path)
    lad.marks = {3: ["first note"]}
    calls: list[tuple[str, dict[str, Any]]] = []

    def style(text: str, **kw: Any) -> str:
        calls.append((text, kw))
        return text

    out = text_lines(lad, style=style)
    assert out[0] == lad.title and calls[0] == (lad.title, {"bold": True})
    header = out[1].split()
    assert header == ["time", "frame", "client", "1:50000", "server", "1:1234"]
    rows = [ln for ln in out[2:] if ln.split()[0].startswith("+")]
    assert len(rows) == 8
    for ln, sender, label in zip(rows, SENDERS, LABELS, strict=True):
        assert f" {label} " in ln
        assert ln.endswith("▶|") if sender == 0 else ln.split("|")[1].startswith("◀")
    widths = {len(ln) for ln in rows}
    assert len(widths) == 1  # every arrow between the same two lifelines
    note = out[out.index(rows[2]) + 1]
    assert note.split() == ["⚑", "first", "note"]
    painted = {text.strip("─▶◀ "): kw for text, kw in calls[1:]}
    assert painted["RW len=40 credit=0 stall"]["bold"] is True
    assert painted["RW len=10 credit=-10 OVER"] == painted["RW len=40 credit=0 stall"]
    assert painted["RW len=60 credit=40"]["bold"] is False
    assert painted["RW len=60 credit=40"]["fg"] != painted["RW len=40 credit=0 stall"]["fg"]
    assert painted["⚑ first note"]["bold"] is True


def test_a_label_too_long_for_the_arrow_is_cut_with_an_ellipsis(tmp_path: Path) -> None:
    lad = scenario(tmp_path)
    lad.steps[0] = dataclasses.replace(lad.steps[0], buf_alloc=10**40)
    out = text_lines(lad)
    first = next(ln for ln in out if ln.split()[0] == "+0.000000")
    second = next(ln for ln in out if ln.split()[0] == "+0.000001")
    assert len(first) == len(second) and "… " in first and "fwd=0" not in first


# -- the matplotlib figure (--png) -----------------------------------------------------------


def test_the_figure_draws_a_ladder_and_a_credit_plot_per_connection(tmp_path: Path) -> None:
    lad = scenario(tmp_path)
    fig = figure([lad, lad])
    ladder_ax, plot_ax = fig.axes[0], fig.axes[1]
    assert len(fig.axes) == 4  # two connections, each a ladder and a plot
    words = [t.get_text() for t in ladder_ax.texts]
    assert [w for w in words if w in LABELS] == LABELS
    assert [w for w in words if w.startswith("+")] == [f"+0.00000{i}" for i in range(8)]
    assert [w for w in words if w.isdigit()] == [str(i) for i in range(1, 9)]
    assert {"client 1:50000", "server 1:1234"} <= set(words)
    assert ladder_ax.get_title(loc="left") == lad.title
    arrows = [a for a in ladder_ax.texts if a.get_text() == "" and hasattr(a, "xyann")]
    assert [(a.xyann[0], a.xy[0]) for a in arrows] == [(s, 1 - s) for s in SENDERS]
    assert [a.xy[1] for a in arrows] == list(range(8))  # one row each, top down
    (solid, dashed) = plot_ax.get_lines()
    t_us = [round(x * 1e6, 6) for x in solid.get_xdata()]
    assert t_us == [1, 2, 3, 4, 5, 6, 7]  # frames 2-8: their credit is known
    assert list(solid.get_ydata()) == [0, 60, 100, 110, 0, 0, 0]
    assert list(dashed.get_ydata()) == [100] * 7 and dashed.get_linestyle() == "--"
    assert solid.get_linestyle() == "-" and solid.get_color() == dashed.get_color()
    assert [t.get_text() for t in plot_ax.get_legend().get_texts()] == [
        "in flight client→server", "peer buffer client→server"]


def test_a_figure_without_credit_plots_and_a_long_ladder(tmp_path: Path) -> None:
    lad = scenario(tmp_path)
    fig = figure([lad], max_rows=5, credit=False)
    (ax,) = fig.axes
    words = [t.get_text() for t in ax.texts]
    assert "… 3 packets not drawn …" in words
    assert [w for w in words if w.isdigit()] == ["1", "2", "6", "7", "8"]
    wide = figure([lad]).get_size_inches()
    narrow = fig.get_size_inches()
    assert narrow[0] < wide[0]


def test_a_figure_says_when_there_is_nothing_to_plot(tmp_path: Path) -> None:
    fig = figure([_no_data_ladder(tmp_path)])
    assert [t.get_text() for t in fig.axes[1].texts] == ["no data sent with known credit"]
    assert fig.axes[1].get_lines() == []


class _Visible(HTMLParser):
    """The page's text a reader sees outside the drawings."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0  # inside <svg>, <style> or <title>
        self.words: list[str] = []

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        self.depth += tag in ("svg", "style", "title")

    def handle_endtag(self, tag: str) -> None:
        self.depth -= tag in ("svg", "style", "title")

    def handle_data(self, data: str) -> None:
        if not self.depth:
            self.words += data.split()


def test_the_page_shows_only_its_titles_notes_summaries_and_marks(tmp_path: Path) -> None:
    """Two marks on frame 4, a diagram cut to 5 rows: the page's visible text is the title,
    the note, the connection's heading and summary, and each mark, nothing between them;
    the diagram follows max_rows. The RESPONSE comes 1.5 µs after the REQUEST here: the
    handshake, in ms to three decimals, rounds up to 0.002."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out)
    c.send(0, Op.REQUEST)
    c.send(1, Op.RESPONSE, delay=1500)
    c.send(0, Op.RW, b"hi")
    rows = StreamRows([0])
    table = vsockmon.open(write(tmp_path / "h.pcap", out)).scan(rows).table
    lad = ladder(table[0], rows.columns(0))
    lad.marks = {3: ["one", "two"]}
    page = html_page("T", [lad], max_rows=2, notes=["N"])
    seen = _Visible()
    seen.feed(page)
    summary = "2 bytes client→server, 0 server→client; handshake 0.002 ms"
    assert seen.words == ["T", "N", *lad.title.split(), *summary.split(),
                          "⚑", "frame", "3:", "one", "⚑", "frame", "3:", "two"]
    assert "… 1 packets not drawn …" in page


def test_stalls_of_both_directions_add_up_in_the_summary(tmp_path: Path) -> None:
    """Both buffers are 100 bytes. The client fills the server's (frame 3) and the server's
    CREDIT_UPDATE 1.5 µs later frees it; then the server fills the client's (frame 5) and
    the client's update frees it 1 µs later: 2 stalls, 2.5 µs = 0.0025 ms, 0.003 to three
    decimals."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out, buf=[100, 100])
    c.open()
    c.send(0, Op.RW, bytes(100))
    c.fwd[1] = 100
    c.send(1, Op.CREDIT_UPDATE, delay=1500)
    c.send(1, Op.RW, bytes(100))
    c.fwd[0] = 100
    c.send(0, Op.CREDIT_UPDATE)
    rows = StreamRows([0])
    table = vsockmon.open(write(tmp_path / "b.pcap", out)).scan(rows).table
    page = html_page("T", [ladder(table[0], rows.columns(0))])
    assert "; 2 zero-credit stalls, 0.003 ms</p>" in page


def test_the_plots_labels_sit_around_the_plot_area(tmp_path: Path) -> None:
    """Byte labels left of the area, time labels under it, the caption at the bottom, the
    legend above it: each inside the picture, none over the data."""
    root = parse(credit_svg(scenario(tmp_path)))
    area = next(e for e in root.iter(f"{SVG}rect") if e.get("stroke"))
    left, top = float(area.get("x", 0)), float(area.get("y", 0))
    right = left + float(area.get("width", 0))
    bottom = top + float(area.get("height", 0))
    width, height = float(root.get("width", 0)), float(root.get("height", 0))
    all_texts = texts(root)
    bytes_labels = [(x, y) for x, y, _, a in all_texts if a.get("text-anchor") == "end"]
    assert len(bytes_labels) == 5 and all(0 < x < left for x, _ in bytes_labels)
    time_labels = [(x, y) for x, y, t, _ in all_texts if t.endswith("s") and t[0].isdigit()]
    assert len(time_labels) == 5
    assert all(left <= x <= right and bottom < y < height for x, y in time_labels)
    (caption,) = [(x, y) for x, y, t, _ in all_texts if t.startswith("time since")]
    assert [t for _, _, t, _ in all_texts if t.startswith("time since")] == [
        "time since the first frame; y: bytes"]
    assert caption[0] == left and max(y for _, y in time_labels) < caption[1] <= height
    legend = lines(root)
    names = [(x, y) for x, y, t, _ in all_texts if t.startswith(("in flight", "peer buffer"))]
    for ln, (x, y) in zip(legend, names, strict=True):
        x1, x2, y1, y2 = (float(ln[k]) for k in ("x1", "x2", "y1", "y2"))
        assert y1 == y2 < top and x1 < x2 < x < width  # a short line, its name right of it
        assert 0 < y < top
