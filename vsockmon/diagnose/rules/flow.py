"""Rules about flow control: full windows, deadlocks, credit ignored or exhausted by overhead."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from vsockmon.conntrack.tracker import CLIENT, SERVER, Close, Connection, Violation
from vsockmon.diagnose.digest import Stall
from vsockmon.diagnose.model import Severity
from vsockmon.diagnose.registry import Context, rule
from vsockmon.diagnose.rules.common import seconds_text
from vsockmon.wire.protocol import Op, enum_name


@rule("window-full", Severity.WARNING, "receive window full with fwd_cnt frozen",
      kinds=("not-reading", "deadlock", "no-credit-update", "credit-request-unanswered"))
def window_full(ctx: Context) -> None:
    """Long stalls (a full window), a deadlock when both directions stall at once."""
    t = ctx.t
    long = [st for st in ctx.digest.all_stalls() if st.seconds(ctx.end_ns) >= t.stall_s
            or _unanswered_requests(st, ctx)]
    by_stream: dict[int, list[Stall]] = defaultdict(list)
    for st in long:
        by_stream[st.stream].append(st)
    for sid, stalls in sorted(by_stream.items()):
        c = ctx.conns[sid]
        pair = _overlap(stalls, ctx.end_ns, t.stall_s)
        if pair is not None:
            _deadlock(ctx, c, *pair)
            stalls = [st for st in stalls if st not in pair]
        for st in stalls:
            _one_stall(ctx, c, st)


def _unanswered_requests(st: Stall, ctx: Context) -> list[tuple[int, int, int | None]]:
    return [(f, ts, reply) for f, ts, reply in st.unanswered
            if ((reply if reply is not None else ctx.end_ns) - ts) / 1e9 >= ctx.t.credit_reply_s]


def _overlap(stalls: list[Stall], end_ns: int, minimum: float) -> tuple[Stall, Stall] | None:
    for a in stalls:
        for b in stalls:
            if a.sender == CLIENT and b.sender == SERVER:
                start = max(a.start_ns, b.start_ns)
                stop = min(a.end_ns if a.end_ns is not None else end_ns,
                           b.end_ns if b.end_ns is not None else end_ns)
                if (stop - start) / 1e9 >= minimum:
                    return a, b
    return None


def _deadlock(ctx: Context, c: Connection, a: Stall, b: Stall) -> None:
    start = max(a.start_ns, b.start_ns)
    stops = [st.end_ns if st.end_ns is not None else ctx.end_ns for st in (a, b)]
    both = (min(stops) - start) / 1e9
    if a.end_frame is None and b.end_frame is None:
        ctx.open_end_explained.add(c.stream)
    ctx.add(c, [f for st in (a, b) for f in (st.start_frame, st.end_frame) if f],
            f"Both directions were full at once for {seconds_text(both)}: client→server "
            f"{a.in_flight}/{a.limit} bytes (full at frame {a.start_frame}), server→client "
            f"{b.in_flight}/{b.limit} bytes (full at frame {b.start_frame}); neither fwd_cnt "
            f"moved{_until(a, b)}.",
            "A write–write deadlock: each application is blocked writing to the other and "
            "neither reads, so neither window can ever reopen.",
            "Read and write concurrently (a reader thread, or non-blocking I/O with poll), or "
            "bound how much each side writes before it reads the other's data.",
            kind="deadlock", severity=Severity.ERROR, time_ns=start,
            seconds=round(both, 3), client_in_flight=a.in_flight, client_limit=a.limit,
            server_in_flight=b.in_flight, server_limit=b.limit)


def _until(*stalls: Stall) -> str:
    ends = [st.end_frame for st in stalls]
    if all(e is None for e in ends):
        return " until the capture ended"
    return f" until frame {min(e for e in ends if e is not None)}"


def _one_stall(ctx: Context, c: Connection, st: Stall) -> None:
    sender, receiver = c.sides[st.sender], c.sides[1 - st.sender]
    secs = st.seconds(ctx.end_ns)
    frames = [st.start_frame] + ([st.end_frame] if st.end_frame else [])
    common: dict[str, Any] = dict(time_ns=st.start_ns, seconds=round(secs, 3),
                                  in_flight=st.in_flight, buf_alloc=st.limit,
                                  sender=sender.addr, receiver=receiver.addr)
    head = (f"{sender.role} {sender.addr} → {receiver.addr}: {st.in_flight} bytes in flight "
            f"filled the receiver's buffer (buf_alloc {st.limit}) at frame {st.start_frame}")
    if st.end_frame is None:
        ctx.open_end_explained.add(c.stream)
    unanswered = _unanswered_requests(st, ctx)
    if unanswered:
        f, ts, reply = unanswered[0]
        wait = ((reply if reply is not None else ctx.end_ns) - ts) / 1e9
        ctx.add(c, [*frames, f],
                f"{head}; the sender asked for credit (CREDIT_REQUEST, frame {f}) and the "
                f"receiver sent nothing for {seconds_text(wait)}.",
                "The receiver's vsock transport does not answer CREDIT_REQUEST (Linux always "
                "does): a transport bug, so the sender may wait forever.",
                "Update or fix the receiver's vsock implementation (VMM device or driver) so "
                "it answers CREDIT_REQUEST with a CREDIT_UPDATE.",
                kind="credit-request-unanswered", credit_request_frame=f,
                unanswered_s=round(wait, 3), **common)
    elif st.end_frame is not None and st.freed_by_fwd and st.ended_by != Op.CREDIT_UPDATE:
        op = enum_name(Op, st.ended_by or 0)
        ctx.add(c, frames,
                f"{head}; for {seconds_text(secs)} the receiver announced no free space, "
                f"until its {op} at frame {st.end_frame} carried a higher fwd_cnt.",
                "The receiver consumed the data without sending a CREDIT_UPDATE: its "
                "transport does not announce freed buffer space, so the sender waited for "
                "nothing (a transport bug, e.g. vhost-device-vsock #494).",
                "Fix or update the receiver's vsock implementation to send CREDIT_UPDATE when "
                "its application frees buffer space.",
                kind="no-credit-update", ended_by=op, **common)
    else:
        until = (f"until frame {st.end_frame}" if st.end_frame is not None
                 else "until the capture ended")
        ctx.add(c, frames,
                f"{head}, and its fwd_cnt stayed frozen for {seconds_text(secs)} ({until}).",
                f"The application at {receiver.addr} stopped reading (busy, blocked, or "
                f"waiting for something else), so the sender cannot send more.",
                "Keep reading the socket (a dedicated reader, or non-blocking I/O with poll); "
                "if bursts are expected, raise SO_VM_SOCKETS_BUFFER_SIZE on the receiver.",
                kind="not-reading", **common)


@rule("credit-violation", Severity.ERROR, "RW beyond the advertised credit")
def credit_violation(ctx: Context) -> None:
    """Senders that ignored the peer's advertised credit."""
    for (sid, d), e in sorted(ctx.digest.beyond.items()):
        c = ctx.conns[sid]
        sender, receiver = c.sides[d], c.sides[1 - d]
        ev = sender.violations.get(Violation.BEYOND_CREDIT)
        count = ev.count if ev else e.count
        ctx.add(c, [e.first_frame, e.last_frame],
                f"{sender.role} {sender.addr} sent {count} RW packet(s) beyond the credit "
                f"{receiver.addr} advertised: the first at frame {e.first_frame} carried "
                f"{e.length} bytes with {max(e.credit, 0)} bytes of credit left; at worst "
                f"{e.max_in_flight} bytes were in flight for a {e.limit}-byte buffer.",
                "The sender ignores flow control: it must keep the bytes in flight within the "
                "peer's buf_alloc minus what the peer has not consumed (fwd_cnt). A transport "
                "bug; the receiver may drop the excess or reset.",
                "Fix the sender's vsock implementation (VMM device, driver or user-space "
                "stack) to honour buf_alloc and fwd_cnt.",
                time_ns=e.first_ns, packets=count, first_len=e.length,
                credit_before=e.credit, max_in_flight=e.max_in_flight, buf_alloc=e.limit)


@rule("small-packet-reset", Severity.ERROR, "reset after many small writes while credit "
      "remained")
def small_packet_reset(ctx: Context) -> None:
    """Resets after many small writes while byte credit remained (per-packet overhead)."""
    for c in ctx.conns:
        if c.close not in (Close.RESET_BY_CLIENT, Close.RESET_BY_SERVER):
            continue
        rst = ctx.digest.resets.get(c.stream)
        if rst is None:
            continue
        d = 1 - rst.sender
        small = ctx.digest.small_rw.get((c.stream, d), 0)
        credit = rst.limit[d] - rst.in_flight[d]
        if small < ctx.t.small_rw_count or rst.limit[d] < 0 or credit <= 0:
            continue
        sender, receiver = c.sides[d], c.sides[rst.sender]
        ctx.reset_explained.add(c.stream)
        ctx.add(c, [rst.frame],
                f"{receiver.addr} reset the connection (frame {rst.frame}) after {small} RW "
                f"packets under {ctx.t.small_rw_bytes} bytes from {sender.addr}, while the "
                f"sender still had {credit} of {rst.limit[d]} bytes of credit.",
                "The receiver charges per-packet overhead against its buffer: many small "
                "packets used it up long before the byte credit ran out, so it dropped data "
                "(ENOBUFS) and reset the connection (e.g. libkrun #795).",
                "Raise SO_VM_SOCKETS_BUFFER_SIZE on the receiver and coalesce small writes "
                "(buffer them, write larger chunks).",
                time_ns=rst.ts_ns, small_writes=small, credit_left=credit,
                buf_alloc=rst.limit[d])
