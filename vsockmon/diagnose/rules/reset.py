"""Rules about resets that do not belong to the connection they end: a stale RST from an
earlier connection on the same address pair, and a whole guest's connections dropped by the
device's TRANSPORT_RESET (a snapshot restore or migration)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from vsockmon.conntrack.tracker import Close, Connection, Event
from vsockmon.diagnose.connections import present
from vsockmon.diagnose.digest import U32
from vsockmon.diagnose.model import Severity
from vsockmon.diagnose.registry import Context, rule
from vsockmon.diagnose.rules.common import event_at

RESET = (Close.RESET_BY_CLIENT, Close.RESET_BY_SERVER)


class _Earlier(NamedTuple):
    """The connection before, on the same address pair."""

    stream: int
    last_frame: int


def _first_rst(c: Connection) -> Event | None:
    if c.close not in RESET:
        return None
    return event_at(c, c.close_frame)


def _ahead(fwd_cnt: int, sent: int) -> int:
    """How many bytes ``fwd_cnt`` acknowledges beyond the ``sent`` bytes (u32 counters that
    wrap); 0 when it does not."""
    ahead = (fwd_cnt - sent) % U32
    return ahead if ahead < U32 // 2 else 0


@rule("stale-rst", Severity.ERROR, "an RST of an earlier connection kills the new one on the "
      "same address pair")
def stale_rst(ctx: Context) -> None:
    """Resets whose fwd_cnt acknowledges bytes the connection never carried: they belong to
    an earlier connection on the same address pair (their counters started with it)."""
    ix = ctx.conns.index
    prev = ix.previous_same_pair()
    maybe = ((prev >= 0) & ix.closed(*RESET) & ix.start_seen & present(ix.response_frame))
    rows = np.flatnonzero(maybe)
    olds = prev[rows]
    found = zip(ix.take("stream", olds).tolist(), ix.take("last_frame", olds).tolist(),
                ix.take("response_frame", rows).tolist(), ctx.conns.pick(rows), strict=True)
    for old_stream, old_last, response_frame, c in found:
        rst = _first_rst(c)
        if rst is None:
            continue
        old = _Earlier(old_stream, old_last)
        peer = c.sides[1 - rst.sender]
        ahead = _ahead(rst.fwd_cnt, peer.bytes)
        if not ahead:
            continue
        by = c.sides[rst.sender]
        ctx.reset_explained.add(c.stream)
        ctx.add(c, [old.last_frame, response_frame, rst.frame],
                f"{by.role} {by.addr}'s RST (frame {rst.frame}) reset this connection, "
                f"established at frame {c.response_frame}, though it acknowledges "
                f"{rst.fwd_cnt} bytes received (fwd_cnt) where {peer.addr} had sent "
                f"{peer.bytes} on it: the RST belongs to stream {old.stream}, the earlier "
                f"connection on the same address pair (last packet at frame {old.last_frame}).",
                "A late RST of the old connection arrived after the same ports were reused: "
                "the new connection is killed by a reset meant for the old one (port pairs "
                "reused quickly, as systemd does; a VMM or relay that delays or answers RSTs "
                "of connections it no longer knows).",
                "Do not reuse a local port right after a close (let the kernel pick one); fix "
                "the VMM or relay so it neither delays RSTs nor replies to an RST with one.",
                streams=[c.stream, old.stream], time_ns=rst.ts_ns, rst_frame=rst.frame,
                previous_stream=old.stream, rst_fwd_cnt=rst.fwd_cnt, peer_sent=peer.bytes)


def _forgotten(c: Connection) -> Event | None:
    """The RST that ended an established connection from an end that no longer knew it: it
    carries no buffer (buf_alloc 0: Linux answers for a socket it does not have)."""
    rst = _first_rst(c)
    if rst is None or rst.buf_alloc or c.response_frame is None:
        return None
    return rst


@rule("transport-reset", Severity.ERROR, "a CID forgot all its connections at once: its "
      "transport was reset (snapshot restore, migration)")
def transport_reset(ctx: Context) -> None:
    """Established connections that one CID resets, one after another, having forgotten
    them all: none heard from it since before its first such RST, so they were lost at one
    moment, when the device's TRANSPORT_RESET made that kernel drop every connection."""
    by_cid: dict[int, list[tuple[Event, Connection]]] = {}
    ix = ctx.conns.index
    maybe = ix.closed(*RESET) & present(ix.response_frame) & ~ix.among(ctx.reset_explained)
    for c in ctx.conns.pick(np.flatnonzero(maybe)):
        rst = _forgotten(c)
        if rst is not None and c.stream not in ctx.reset_explained:
            by_cid.setdefault(c.sides[rst.sender].cid, []).append((rst, c))
    for cid, resets in sorted(by_cid.items()):
        resets.sort(key=lambda rc: rc[0].frame)
        for burst in _lost_together(resets):
            if len(burst) >= ctx.t.transport_reset_count:
                _report_transport_reset(ctx, cid, burst)


def _last_heard(c: Connection, rst: Event) -> int:
    """The last frame before ``rst`` in which its sender still knew the connection: its
    last RW or control packet."""
    side = c.sides[rst.sender]
    control = [e.frame for e in c.events if e.sender == rst.sender and e.frame < rst.frame]
    return max([*control, side.last_rw_frame or 0])


def _lost_together(resets: list[tuple[Event, Connection]]
                   ) -> list[list[tuple[Event, Connection]]]:
    """The resets (in frame order) cut into runs that one moment explains: each joins the
    run when its sender was last heard on it before the run's first RST."""
    runs: list[list[tuple[Event, Connection]]] = []
    for rst, c in resets:
        if runs and _last_heard(c, rst) < runs[-1][0][0].frame:
            runs[-1].append((rst, c))
        else:
            runs.append([(rst, c)])
    return runs


def _report_transport_reset(ctx: Context, cid: int,
                            burst: list[tuple[Event, Connection]]) -> None:
    (first, conn), last = burst[0], burst[-1][0]
    streams = [c.stream for _, c in burst]
    heard = max(_last_heard(c, rst) for rst, c in burst)
    ctx.reset_explained.update(streams)
    ctx.add(conn, [rst.frame for rst, _ in burst],
            f"CID {cid} reset {len(burst)} established connections (streams "
            f"{', '.join(map(str, streams))}; RST frames "
            f"{', '.join(str(rst.frame) for rst, _ in burst)}) without shutting any down, "
            f"each RST with buf_alloc 0, the mark of an end that has no socket for the "
            f"connection; it had said nothing on them since frame {heard}: it lost them all "
            f"at one moment.",
            f"CID {cid}'s vsock transport was reset: after a snapshot restore or a migration "
            "the device sends TRANSPORT_RESET and the guest's kernel drops every connection "
            "without a packet; the other ends learn it only from these RSTs when they next "
            "send, or hang waiting (firecracker #5969, cloud-hypervisor #7759).",
            "Reconnect after a restore or migration: treat ECONNRESET as the end of the "
            "session and dial again; a VMM should reset each saved connection (RST to both "
            "ends) rather than leave the peers waiting.",
            streams=streams, time_ns=first.ts_ns, cid=cid, connections=len(burst),
            last_heard_frame=heard, seconds=round((last.ts_ns - first.ts_ns) / 1e9, 3))
