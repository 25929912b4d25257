"""Rules about resets that do not belong to the connection they end: a stale RST from an
earlier connection on the same address pair, and a whole guest's connections dropped by the
device's TRANSPORT_RESET (a snapshot restore or migration)."""

from __future__ import annotations

from vsockmon.conntrack.tracker import Close, Connection, Event
from vsockmon.diagnose.digest import U32
from vsockmon.diagnose.model import Severity
from vsockmon.diagnose.registry import Context, rule
from vsockmon.diagnose.rules.common import event_at

RESET = (Close.RESET_BY_CLIENT, Close.RESET_BY_SERVER)


def _pair(c: Connection) -> tuple[int, frozenset[tuple[int, int]]]:
    """The connection's type and address pair, whichever end dialled."""
    return c.type, frozenset(((c.client.cid, c.client.port), (c.server.cid, c.server.port)))


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
    earlier: dict[tuple[int, frozenset[tuple[int, int]]], Connection] = {}
    for c in ctx.conns:
        old = earlier.get(_pair(c))
        earlier[_pair(c)] = c
        rst = _first_rst(c)
        if old is None or rst is None or not c.start_seen or c.response_frame is None:
            continue
        peer = c.sides[1 - rst.sender]
        ahead = _ahead(rst.fwd_cnt, peer.bytes)
        if not ahead:
            continue
        by = c.sides[rst.sender]
        ctx.reset_explained.add(c.stream)
        ctx.add(c, [old.last_frame, c.response_frame, rst.frame],
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


@rule("transport-reset", Severity.ERROR, "every connection of a CID reset at once: its "
      "transport was reset (snapshot restore, migration)")
def transport_reset(ctx: Context) -> None:
    """Several established connections, reset within a moment by one CID that had forgotten
    them all: the device's TRANSPORT_RESET made that kernel drop every connection."""
    by_cid: dict[int, list[tuple[Event, Connection]]] = {}
    for c in ctx.conns:
        rst = _forgotten(c)
        if rst is not None and c.stream not in ctx.reset_explained:
            by_cid.setdefault(c.sides[rst.sender].cid, []).append((rst, c))
    for cid, resets in sorted(by_cid.items()):
        resets.sort(key=lambda rc: rc[0].ts_ns)
        for burst in _bursts(resets, int(ctx.t.transport_reset_s * 1e9)):
            if len(burst) >= ctx.t.transport_reset_count:
                _report_transport_reset(ctx, cid, burst)


def _bursts(resets: list[tuple[Event, Connection]], window_ns: int
            ) -> list[list[tuple[Event, Connection]]]:
    """The resets cut into runs, each within ``window_ns`` of its first."""
    runs: list[list[tuple[Event, Connection]]] = []
    for rc in resets:
        if runs and rc[0].ts_ns - runs[-1][0][0].ts_ns <= window_ns:
            runs[-1].append(rc)
        else:
            runs.append([rc])
    return runs


def _report_transport_reset(ctx: Context, cid: int,
                            burst: list[tuple[Event, Connection]]) -> None:
    first, last = burst[0][0], burst[-1][0]
    streams = [c.stream for _, c in burst]
    ctx.reset_explained.update(streams)
    span = (last.ts_ns - first.ts_ns) / 1e6
    ctx.add(None, [rst.frame for rst, _ in burst],
            f"CID {cid} reset {len(burst)} established connections within {span:.1f} ms "
            f"(RST frames {', '.join(str(rst.frame) for rst, _ in burst)}), each with "
            f"buf_alloc 0 and no shutdown before: it no longer knew any of them.",
            f"CID {cid}'s vsock transport was reset: after a snapshot restore or a migration "
            "the device sends TRANSPORT_RESET and the guest's kernel drops every connection "
            "silently; the other ends learn it only from these RSTs, or hang waiting "
            "(firecracker #5969, cloud-hypervisor #7759).",
            "Reconnect after a restore or migration: treat ECONNRESET as the end of the "
            "session and dial again; VMMs should reset each saved connection (send RST to "
            "both ends) instead of leaving the peers waiting.",
            streams=streams, time_ns=first.ts_ns, cid=cid, connections=len(burst),
            span_ms=round(span, 3))
