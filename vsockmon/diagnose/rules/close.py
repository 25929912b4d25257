"""Rules about closing: a half-close nobody answers or answers late, resets, data discarded
unread."""

from __future__ import annotations

from typing import Any

import numpy as np

from vsockmon.conntrack.tracker import CLIENT, SERVER, Close, Connection, Event
from vsockmon.diagnose.digest import U32
from vsockmon.diagnose.model import Severity
from vsockmon.diagnose.registry import Context, rule
from vsockmon.diagnose.rules.common import event_at, seconds_text
from vsockmon.wire.protocol import Op, ShutdownFlag


@rule("half-close-hang", Severity.WARNING, "SHUTDOWN(SEND), then silence until the end")
def half_close_hang(ctx: Context) -> None:
    """One side shut its sending half; then nothing, up to the capture's end."""
    for c in ctx.conns.pick(np.flatnonzero(ctx.conns.index.closed(Close.HALF_CLOSED))):
        shut = next((s for s in c.sides if s.shutdown_flags & ShutdownFlag.SEND), None)
        if shut is None or shut.shutdown_frame is None:
            continue
        silence = (ctx.end_ns - c.last_ts_ns) / 1e9
        if silence < ctx.t.half_close_s:
            continue
        peer = c.sides[1 - (shut is c.server)]
        ev = event_at(c, shut.shutdown_frame)
        ctx.open_end_explained.add(c.stream)
        ctx.add(c, [shut.shutdown_frame, c.last_frame],
                f"{shut.role} {shut.addr} shut down its sending side (SHUTDOWN SEND, frame "
                f"{shut.shutdown_frame}) and waited; {peer.addr} neither answered nor closed: "
                f"nothing on the connection for the last {seconds_text(silence)} of the capture "
                f"(last packet at frame {c.last_frame}).",
                f"{peer.addr} never acted on the end of file: its application waits for more "
                f"data instead of finishing, or a relay between them dropped the "
                f"shutdown(SHUT_WR).",
                "Make the peer treat read() = 0 as the end of the request (reply, then close); "
                "relays and proxies must pass shutdown(SHUT_WR) on, not drop it or close fully.",
                time_ns=ev.ts_ns if ev else c.first_ts_ns, silence_s=round(silence, 3),
                shutdown_frame=shut.shutdown_frame)


@rule("half-close-stall", Severity.WARNING, "SHUTDOWN(SEND), then nothing but a late close")
def half_close_stall(ctx: Context) -> None:
    """One side shut its sending half and waited for the peer's end; the peer sent no data,
    and only a close seconds later (the peer's, or the waiting side giving up) ended the wait.
    Unlike half-close-hang the wait ends inside the capture: it cost time, every time (systemd
    v256+ sd_notify: ~2 s per message, microvm.nix)."""
    least = int(ctx.t.half_close_stall_s * 1e9)
    ix = ctx.conns.index
    for c in ctx.conns.pick(np.flatnonzero(ix.last_ts - ix.first_ts >= least)):  # most are brief
        wait = _half_close_wait(c)
        if wait is None:
            continue
        shut, end = wait
        read = ctx.digest.eof_read.get((c.stream, shut.sender))
        if read is None or read > end.ts_ns:
            continue  # the peer was still reading the data: not waiting on the end of file
        secs = (end.ts_ns - max(shut.ts_ns, read)) / 1e9
        if secs < ctx.t.half_close_stall_s:
            continue
        waiter, peer = c.sides[shut.sender], c.sides[1 - shut.sender]
        closing = f"({end.op_name}, frame {end.frame})"
        if end.sender == shut.sender:
            how = (f"did not close: after {seconds_text(secs)} {waiter.addr} gave up and "
                   f"closed {closing}")
            cause = (f"{peer.addr} read the end of file but kept the connection open; "
                     f"{waiter.addr} waited for its close until a timeout of its own.")
        else:
            how = f"closed only {seconds_text(secs)} later {closing}"
            cause = (f"{peer.addr} read the end of file but closed the connection only "
                     f"{seconds_text(secs)} later; {waiter.addr} waited for that close.")
        ctx.add(c, [shut.frame, end.frame],
                f"{waiter.role} {waiter.addr} shut down its sending side (SHUTDOWN SEND, frame "
                f"{shut.frame}) and waited; {peer.addr} sent no data and {how}.",
                f"{cause} A sender that half-closes and waits for EOF (systemd v256+ "
                f"sd_notify does) stalls this long on every message.",
                "Make the receiving side close as soon as read() returns 0 (or answer, then "
                "close); relays must pass shutdown(SHUT_WR) on at once. A sender that needs "
                "no answer can close() instead of waiting.",
                time_ns=shut.ts_ns, stall_s=round(secs, 3), shutdown_frame=shut.frame,
                end_frame=end.frame, closed_by=c.sides[end.sender].role)


def _half_close_wait(c: Connection) -> tuple[Event, Event] | None:
    """A one-sided SHUTDOWN(SEND) while the peer could still send, and the next SHUTDOWN or
    RST that ended the wait; None when the peer sent data after it (it answered: a server
    computing its reply is not a stall) or nothing ended it (half-close-hang's case)."""
    shut = None
    for ev in c.events:
        if ev.op not in (Op.SHUTDOWN, Op.RST):
            continue
        if shut is None:
            if ev.op == Op.RST or ev.flags != ShutdownFlag.SEND:
                return None  # the first close is not a half-close
            shut = ev
            continue
        last_rw = c.sides[1 - shut.sender].last_rw_frame
        if last_rw is not None and last_rw > shut.frame:
            return None
        return shut, ev
    return None

def _unconsumed(c: Connection, d: int) -> int | None:
    """Bytes side ``d`` sent that its peer never consumed, counting the fwd_cnt of its RSTs;
    None when unknown (the connection's start, hence fwd_cnt's base, was not captured)."""
    receiver = c.sides[1 - d]
    if not c.start_seen or receiver.fwd_cnt is None:
        return None
    fwd = receiver.fwd_cnt
    for ev in c.events:
        newer = 0 < (ev.fwd_cnt - fwd) % U32 < U32 // 2
        if ev.op == Op.RST and ev.sender == 1 - d and ev.buf_alloc and newer:
            fwd = ev.fwd_cnt
    left = (c.sides[d].bytes - fwd) % U32
    return left if left < U32 // 2 else 0


@rule("abrupt-close", Severity.WARNING, "reset without shutdown, or with data unread",
      kinds=("reset", "unread"), after=("cid-mismatch", "state-lost", "small-packet-reset",
                                        "stale-rst", "transport-reset"))
def abrupt_close(ctx: Context) -> None:
    """Resets without a shutdown, and closes that discarded unread data (a graceful close
    only when bytes were waiting unconsumed: :func:`_lost`)."""
    ix = ctx.conns.index
    waited = ix.among({sid for sid, _ in ctx.digest.pending})
    ended = ix.closed(Close.RESET_BY_CLIENT, Close.RESET_BY_SERVER) | (
        ix.closed(Close.GRACEFUL) & waited)
    for c in ctx.conns.pick(np.flatnonzero(ended & ~ix.among(ctx.reset_explained))):
        if c.stream in ctx.unestablished or (c.start_seen and c.response_frame is None):
            continue  # a connect that failed is not a close
        rst = event_at(c, c.close_frame) if c.close != Close.GRACEFUL else None
        if rst is None:
            rst = next((e for e in c.events if e.op == Op.RST), None)
        if rst is None:
            continue
        lost = _lost(ctx, c, rst.ts_ns)
        if c.close == Close.GRACEFUL and not lost:
            continue
        by = c.sides[rst.sender]
        lost_text = "".join(f"; {n} bytes {c.sides[d].addr} sent were never consumed"
                            for d, n in lost)
        evidence: dict[str, Any] = {f"{c.sides[d].role}_unconsumed": n for d, n in lost}
        if c.close != Close.GRACEFUL:
            ctx.add(c, [rst.frame],
                    f"{by.role} {by.addr} reset the connection (RST, frame {rst.frame}) "
                    f"without shutting it down first{lost_text}.",
                    f"{by.addr} dropped the connection instead of closing it: its process was "
                    f"killed or crashed, its transport was reset, or it no longer knew the "
                    f"connection and answered with RST.",
                    "Close with shutdown(SHUT_WR), read to EOF, then close(); look at what "
                    f"happened to {by.addr}'s application or VM at that moment.",
                    kind="reset", time_ns=rst.ts_ns, rst_frame=rst.frame, **evidence)
            continue
        d, n = lost[0]
        receiver = c.sides[1 - d]
        closer = event_at(c, receiver.shutdown_frame) or rst
        also = "".join(f"; {m} bytes from {c.sides[e].addr} were left unread too"
                       for e, m in lost[1:])
        ctx.add(c, [closer.frame, rst.frame],
                f"{receiver.role} {receiver.addr} closed (frame {closer.frame}) with {n} bytes "
                f"from {c.sides[d].addr} unread; they were discarded when the connection was "
                f"reset (frame {rst.frame}){also}.",
                "close() with unread data: the application closed the socket without reading "
                "what its peer had sent. vsock keeps no unread data after close.",
                "Before close(): shutdown(SHUT_WR), then read until EOF (read() = 0); or make "
                "the protocol say when each side is done.",
                kind="unread", time_ns=closer.ts_ns, rst_frame=rst.frame, **evidence)


def _lost(ctx: Context, c: Connection, reset_ns: int) -> list[tuple[int, int]]:
    """(sender, bytes) of data never consumed and waiting long enough before the reset."""
    out = []
    for d in (CLIENT, SERVER):
        n = _unconsumed(c, d)
        since = ctx.digest.pending.get((c.stream, d))
        if n and since is not None and (reset_ns - since) / 1e9 >= ctx.t.unread_grace_s:
            out.append((d, n))
    return out
