"""Timelines of connections: the ladder (sequence) diagram and the credit plot.

Three renderings of one model: lines for the terminal, one self-contained HTML page (inline
SVG made here, no script, no CDN), and a matplotlib figure. Everything is computed from a
:class:`~vsockmon.conntrack.tracker.Connection` and its packets
(:class:`~vsockmon.conntrack.tracker.StreamRows` columns); nothing here reads files or knows
about terminals.
"""

from __future__ import annotations

import html
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vsockmon.conntrack.tracker import CLIENT, SERVER, Connection
from vsockmon.decode.frames import Anomaly
from vsockmon.wire.protocol import Op, enum_name, flag_names

ARROW_WIDTH = 56
"""Characters between the two lifelines of the terminal ladder."""
MAX_PLOT_POINTS = 1500
"""Points per series in the SVG plot: more says nothing a reader can see, and weighs."""

OP_COLOURS = {
    Op.REQUEST: "#2e7d32", Op.RESPONSE: "#2e7d32", Op.RW: "#1f4e9c",
    Op.CREDIT_UPDATE: "#7b61a8", Op.CREDIT_REQUEST: "#7b61a8", Op.SHUTDOWN: "#c77700",
    Op.RST: "#c62828",
}
TERM_COLOURS = {
    Op.REQUEST: "green", Op.RESPONSE: "green", Op.RW: "cyan", Op.CREDIT_UPDATE: "magenta",
    Op.CREDIT_REQUEST: "magenta", Op.SHUTDOWN: "yellow", Op.RST: "red",
}
DIRECTION_COLOURS = ("#1f77b4", "#e6550d")
"""Client→server and server→client, in the plot."""


@dataclass(frozen=True, slots=True)
class Step:
    """One packet of the ladder."""

    frame: int
    t_ns: int
    """Time since the connection's first frame."""
    sender: int
    op: int
    length: int
    flags: int
    buf_alloc: int
    fwd_cnt: int
    in_flight: int | None
    """The sender's bytes not yet consumed by its peer, after this packet."""
    credit: int | None
    """The sender's free credit after this packet (peer buf_alloc - in flight)."""
    anomalies: int
    sock_type: int
    """The connection's type: flags of RW mean EOM/EOR on SEQPACKET only."""

    @property
    def label(self) -> str:
        """What the arrow says: op, length, flags, credit."""
        parts = [enum_name(Op, self.op)]
        if self.op == Op.RW:
            parts.append(f"len={self.length}")
        names = flag_names(self.op, self.sock_type, self.flags)
        if names:
            parts.append("|".join(names))
        if self.op == Op.RW and self.credit is not None:
            note = "" if self.credit > 0 else " stall" if self.credit == 0 else " OVER"
            parts.append(f"credit={self.credit}{note}")
        elif self.op in (Op.CREDIT_UPDATE, Op.CREDIT_REQUEST, Op.REQUEST, Op.RESPONSE):
            parts.append(f"buf={self.buf_alloc} fwd={self.fwd_cnt}")
        if self.anomalies & Anomaly.PAYLOAD_LEN:
            parts.append("tap-len!")
        return " ".join(parts)


@dataclass
class Ladder:
    """A connection with its packets, ready to draw."""

    conn: Connection
    steps: list[Step]
    t_ns: np.ndarray
    """Relative time of every packet (for the plot)."""
    in_flight: np.ndarray
    """(n, 2): bytes in flight per direction (client→server, server→client); -1 unknown."""
    limit: np.ndarray
    """(n, 2): the receiving end's buffer size per direction; -1 unknown."""
    marks: dict[int, list[str]] = field(default_factory=dict)
    """Notes to show at frames, by frame number (e.g. the findings of vsockmon.diagnose.engine)."""

    @property
    def title(self) -> str:
        c = self.conn
        start = "" if c.start_seen else " (unknown start)"
        return (f"stream {c.stream}  {c.type_name}  client {c.client.addr}{start}  "
                f"server {c.server.addr}  {c.close}, {c.packets} packets, {c.bytes} bytes")


def ladder(conn: Connection, cols: dict[str, np.ndarray]) -> Ladder:
    """The ladder of one connection from its :class:`StreamRows` columns."""
    t0 = conn.first_ts_ns
    rel = cols["ts"] - t0
    sender = cols["sender"]
    idx = np.arange(len(sender))
    flight = cols["in_flight"][idx, sender] if len(sender) else np.zeros(0, np.int64)
    limit = cols["limit"][idx, sender] if len(sender) else np.zeros(0, np.int64)
    steps = []
    for row in zip(cols["frame"].tolist(), rel.tolist(), sender.tolist(), cols["op"].tolist(),
                   cols["len"].tolist(), cols["flags"].tolist(), cols["buf"].tolist(),
                   cols["fwd"].tolist(), flight.tolist(), limit.tolist(),
                   cols["anomalies"].tolist(), strict=True):
        frame, t, s, op, length, flags, buf, fwd, fl, lim, anom = row
        known = fl >= 0
        steps.append(Step(frame, t, s, op, length, flags, buf, fwd, fl if known else None,
                          lim - fl if known else None, anom, conn.type))
    return Ladder(conn, steps, rel, cols["in_flight"], cols["limit"])


def _shown(steps: list[Step], max_rows: int) -> Iterator[Step | int]:
    """The steps to draw: all, or the first and last halves with the count left out."""
    if len(steps) <= max_rows:
        yield from steps
        return
    head = max_rows // 2
    tail = max_rows - head
    yield from steps[:head]
    yield len(steps) - max_rows
    yield from steps[-tail:]


def seconds(t_ns: int) -> str:
    return f"+{t_ns / 1e9:.6f}"


# -- terminal ------------------------------------------------------------------------------


def text_lines(lad: Ladder, max_rows: int = 200,
               style: Callable[..., str] | None = None) -> list[str]:
    """The ladder as terminal lines; ``style`` (click.style) colours them, None for plain."""
    paint = style or (lambda text, **_kw: text)
    c = lad.conn
    width = ARROW_WIDTH
    left = f"client {c.client.addr}"
    right = f"server {c.server.addr}"
    out = [paint(lad.title, bold=True),
           f"{'time':>10} {'frame':>7}  {left:<{width + 1}} {right}"]
    for step in _shown(lad.steps, max_rows):
        if isinstance(step, int):
            out.append(f"{'':>10} {'':>7}  |{('… ' + str(step) + ' packets …'):^{width}}|")
            continue
        label = f" {step.label} "
        body = width - 2
        if len(label) > body - 4:
            label = label[: body - 5] + "… "
        if step.sender == CLIENT:
            arrow = "─" + label.center(body, "─") + "▶"
        else:
            arrow = "◀" + label.center(body, "─") + "─"
        colour = TERM_COLOURS.get(Op(step.op)) if step.op in Op._value2member_map_ else None
        stalled = step.credit is not None and step.credit <= 0 and step.op == Op.RW
        arrow = paint(arrow, fg="red" if stalled else colour, bold=stalled)
        out.append(f"{seconds(step.t_ns):>10} {step.frame:>7}  |{arrow}|")
        out += [paint(f"{'':>10} {'':>7}  ⚑ {note}", fg="yellow", bold=True)
                for note in lad.marks.get(step.frame, [])]
    return out


# -- HTML / SVG ----------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 32px; }
.meta { color: #555; font-size: 13px; }
svg text { font-family: ui-monospace, monospace; font-size: 11px; }
.legend span { display: inline-block; margin-right: 16px; font-size: 12px; }
"""


def html_page(title: str, ladders: list[Ladder], max_rows: int = 200,
              notes: list[str] | None = None) -> str:
    """One self-contained page: per connection a sequence diagram and a credit plot."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for note in notes or []:
        body.append(f'<p class="meta">{html.escape(note)}</p>')
    for lad in ladders:
        c = lad.conn
        body.append(f'<h2 id="stream-{c.stream}">{html.escape(lad.title)}</h2>')
        body.append(f'<p class="meta">{html.escape(_summary(c))}</p>')
        if lad.marks:
            body.append("<ul>" + "".join(
                f"<li>⚑ frame {frame}: {html.escape(note)}</li>"
                for frame, notes in sorted(lad.marks.items()) for note in notes) + "</ul>")
        body.append(sequence_svg(lad, max_rows))
        body.append(credit_svg(lad))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _summary(c: Connection) -> str:
    parts = [f"{c.client.bytes} bytes client→server, {c.server.bytes} server→client"]
    if c.handshake_ns is not None:
        parts.append(f"handshake {c.handshake_ns / 1e6:.3f} ms")
    stalls = c.client.stalls.count + c.server.stalls.count
    if stalls:
        total = (c.client.stalls.total_ns + c.server.stalls.total_ns) / 1e6
        parts.append(f"{stalls} zero-credit stalls, {total:.3f} ms")
    for side in c.sides:
        for kind, ev in side.violations.items():
            parts.append(f"{side.role}: {ev.count}× {kind} (first frame {ev.first_frame})")
    return "; ".join(parts)


def sequence_svg(lad: Ladder, max_rows: int = 200) -> str:
    """The ladder as an SVG sequence diagram: two lifelines, one arrow per packet."""
    c = lad.conn
    row_h, top, width = 22, 48, 900
    xs = (190, 810)
    shown = list(_shown(lad.steps, max_rows))
    height = top + row_h * len(shown) + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="sequence diagram">',
           '<defs><marker id="head" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
           'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
           'fill="context-stroke"/></marker></defs>',
           '<rect width="100%" height="100%" fill="#fafafa"/>']
    for x, name in zip(xs, (f"client {c.client.addr}", f"server {c.server.addr}"), strict=True):
        out.append(f'<text x="{x}" y="20" text-anchor="middle" font-weight="bold">'
                   f"{html.escape(name)}</text>")
        out.append(f'<line x1="{x}" y1="28" x2="{x}" y2="{height - 10}" stroke="#888" '
                   'stroke-width="2"/>')
    out.append('<text x="10" y="20" fill="#555">time (s)</text>')
    out.append(f'<text x="{width - 10}" y="20" text-anchor="end" fill="#555">frame</text>')
    for i, step in enumerate(shown):
        y = top + i * row_h
        if isinstance(step, int):
            out.append(f'<text x="{width // 2}" y="{y + 4}" text-anchor="middle" '
                       f'fill="#888">… {step} packets not drawn …</text>')
            continue
        a, b = (xs[0], xs[1]) if step.sender == CLIENT else (xs[1], xs[0])
        colour = OP_COLOURS.get(Op(step.op), "#555") if step.op in Op._value2member_map_ \
            else "#555"
        stalled = step.op == Op.RW and step.credit is not None and step.credit <= 0
        if stalled:
            colour = "#c62828"
        out.append(f'<line x1="{a}" y1="{y + 6}" x2="{b}" y2="{y + 6}" stroke="{colour}" '
                   f'stroke-width="{2.5 if stalled else 1.5}" marker-end="url(#head)"/>')
        out.append(f'<text x="{(a + b) / 2}" y="{y + 2}" text-anchor="middle" '
                   f'fill="{colour}">{html.escape(step.label)}</text>')
        out.append(f'<text x="10" y="{y + 10}" fill="#555">{seconds(step.t_ns)}</text>')
        out.append(f'<text x="{width - 10}" y="{y + 10}" text-anchor="end" fill="#555">'
                   f"{step.frame}</text>")
        if step.frame in lad.marks:
            tip = html.escape("; ".join(lad.marks[step.frame]))
            out.append(f'<text x="{width - 60}" y="{y + 10}" fill="#c62828">⚑<title>{tip}'
                       "</title></text>")
    out.append("</svg>")
    return "\n".join(out)


def _downsample(t: np.ndarray, y: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``limit`` points, keeping each bucket's highest value (peaks stay visible)."""
    if len(t) <= limit:
        return t, y
    buckets = np.linspace(0, len(t), limit // 2 + 1).astype(np.int64)
    keep = []
    for a, b in itertools.pairwise(buckets.tolist()):
        if b > a:
            seg = y[a:b]
            keep += sorted({a + int(np.argmax(seg)), a + int(np.argmin(seg))})
    idx = np.asarray(keep)
    return t[idx], y[idx]


def plot_series(lad: Ladder) -> list[dict[str, Any]]:
    """The plot's lines: bytes in flight and the peer's buffer per direction, where known."""
    series = []
    for d, name in ((CLIENT, "client→server"), (SERVER, "server→client")):
        known = lad.in_flight[:, d] >= 0 if len(lad.in_flight) else np.zeros(0, bool)
        if not known.any() or not (lad.in_flight[known, d] > 0).any():
            continue
        t = lad.t_ns[known]
        series.append({"name": f"in flight {name}", "direction": d, "dashed": False,
                       "t": t, "y": lad.in_flight[known, d]})
        series.append({"name": f"peer buffer {name}", "direction": d, "dashed": True,
                       "t": t, "y": lad.limit[known, d]})
    return series


def credit_svg(lad: Ladder) -> str:
    """Bytes in flight against the receiver's buffer (the credit limit), over time."""
    series = plot_series(lad)
    width, height = 900, 280
    left, right, top, bottom = 80, 50, 40, 40
    if not series:
        return '<p class="meta">No data sent with known credit: nothing to plot.</p>'
    t_max = max(int(s["t"].max()) for s in series) or 1
    y_max = max(int(s["y"].max()) for s in series) or 1
    pw, ph = width - left - right, height - top - bottom

    def px(t: float) -> float:
        return left + pw * t / t_max

    def py(v: float) -> float:
        return top + ph * (1 - v / y_max)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="credit plot">',
           '<rect width="100%" height="100%" fill="#fff"/>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" '
           'stroke="#ccc"/>']
    for i in range(5):
        v = y_max * i / 4
        out.append(f'<text x="{left - 6}" y="{py(v) + 4:.1f}" text-anchor="end">'
                   f"{int(v)}</text>")
        tick = t_max * i / 4
        out.append(f'<text x="{px(tick):.1f}" y="{height - bottom + 16}" text-anchor="middle">'
                   f"{tick / 1e9:.6f}s</text>")
    out.append(f'<text x="{left}" y="{height - 4}" fill="#555">time since the first frame; '
               "y: bytes</text>")
    for s in series:
        t, y = _downsample(s["t"], s["y"], MAX_PLOT_POINTS)
        # a step line: a value holds until the next packet changes it
        xs, ys = [px(v) for v in t.tolist()], [py(v) for v in y.tolist()]
        pts = [f"{xs[0]:.1f},{ys[0]:.1f}"]
        for j in range(1, len(xs)):
            pts.append(f"{xs[j]:.1f},{ys[j - 1]:.1f} {xs[j]:.1f},{ys[j]:.1f}")
        dash = ' stroke-dasharray="6 4"' if s["dashed"] else ""
        out.append(f'<polyline fill="none" stroke="{DIRECTION_COLOURS[s["direction"]]}" '
                   f'stroke-width="1.5"{dash} points="{" ".join(pts)}"/>')
    for i, s in enumerate(series):  # the legend, above the plot
        x = left + 195 * i
        dash = ' stroke-dasharray="6 4"' if s["dashed"] else ""
        out.append(f'<line x1="{x}" y1="{top - 18}" x2="{x + 24}" y2="{top - 18}" '
                   f'stroke="{DIRECTION_COLOURS[s["direction"]]}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{x + 30}" y="{top - 14}">{html.escape(s["name"])}</text>')
    out.append("</svg>")
    return "\n".join(out)


# -- matplotlib ----------------------------------------------------------------------------


def figure(ladders: list[Ladder], max_rows: int = 40, credit: bool = True) -> Any:
    """A matplotlib figure: per connection its ladder (left) and, with ``credit``, its
    credit plot (right; the docs' ladders of how connections close leave it out).

    matplotlib is imported here, with the Agg backend: nothing else pays for it.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = [list(_shown(lad.steps, max_rows)) for lad in ladders]
    heights = [max(3.0 if credit else 1.2, 0.28 * len(r) + 1.2) for r in rows]
    fig = Figure(figsize=(15 if credit else 9, sum(heights)), dpi=100, layout="constrained")
    grid = fig.add_gridspec(len(ladders), 1 + credit, height_ratios=heights,
                            width_ratios=(3, 2) if credit else None)
    for i, (lad, shown) in enumerate(zip(ladders, rows, strict=True)):
        _draw_ladder(fig.add_subplot(grid[i, 0]), lad, shown)
        if credit:
            _draw_credit(fig.add_subplot(grid[i, 1]), lad)
    return fig


def _draw_ladder(ax: Any, lad: Ladder, shown: list[Step | int]) -> None:
    n = len(shown)
    ax.set_xlim(-0.45, 1.3)
    ax.set_ylim(n + 0.5, -1.2)
    ax.axis("off")
    c = lad.conn
    ax.set_title(lad.title, fontsize=9, loc="left")
    for x, name in ((0, f"client {c.client.addr}"), (1, f"server {c.server.addr}")):
        ax.plot([x, x], [-0.5, n], color="#888", lw=1.5)
        ax.text(x, -0.8, name, ha="center", fontsize=8, fontweight="bold")
    for i, step in enumerate(shown):
        if isinstance(step, int):
            ax.text(0.5, i, f"… {step} packets not drawn …", ha="center", fontsize=7,
                    color="#888")
            continue
        a, b = (0, 1) if step.sender == CLIENT else (1, 0)
        colour = OP_COLOURS.get(Op(step.op), "#555") if step.op in Op._value2member_map_ \
            else "#555"
        ax.annotate("", xy=(b, i), xytext=(a, i),
                    arrowprops={"arrowstyle": "-|>", "color": colour, "lw": 1.2})
        ax.text(0.5, i - 0.12, step.label, ha="center", fontsize=6.5, color=colour)
        ax.text(-0.05, i, seconds(step.t_ns), ha="right", va="center", fontsize=6.5,
                color="#555")
        ax.text(1.05, i, str(step.frame), ha="left", va="center", fontsize=6.5, color="#555")


def _draw_credit(ax: Any, lad: Ladder) -> None:
    series = plot_series(lad)
    ax.set_title("bytes in flight vs peer buffer", fontsize=9, loc="left")
    ax.set_xlabel("seconds since the first frame", fontsize=8)
    ax.set_ylabel("bytes", fontsize=8)
    ax.tick_params(labelsize=7)
    if not series:
        ax.text(0.5, 0.5, "no data sent with known credit", ha="center",
                transform=ax.transAxes, fontsize=8)
        return
    for s in series:
        ax.step(s["t"] / 1e9, s["y"], where="post", color=DIRECTION_COLOURS[s["direction"]],
                ls="--" if s["dashed"] else "-", lw=1.2, label=s["name"])
    ax.legend(fontsize=7, loc="upper right")
