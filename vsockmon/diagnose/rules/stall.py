"""Rules about full windows: what kept a sender without credit, one rule per cause.

Every rule here reads the same stalls (the digest's :class:`~vsockmon.diagnose.digest.Stall`,
from the one zero-credit test :func:`vsockmon.conntrack.model.no_credit`) through one
classification, :func:`verdicts`: each long stall gets exactly one cause, so two rules can
never report the same stall. Its causes, in the order they are tried: both directions full
at once (``window-full/deadlock``); the sender asked for credit and got no answer
(``credit-request-unanswered``); the receiver consumed more than Linux would have kept
quiet about but announced it only in a later packet that is not a CREDIT_UPDATE
(``fwd-cnt-stuck``); otherwise the receiver did not read (``window-full/not-reading``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from vsockmon.conntrack.tracker import CLIENT, SERVER, Connection
from vsockmon.diagnose.digest import Stall
from vsockmon.diagnose.model import Severity
from vsockmon.diagnose.registry import Context, rule
from vsockmon.diagnose.rules.common import seconds_text
from vsockmon.wire.protocol import Op, enum_name

WINDOW_FULL = "window-full"
CREDIT_REQUEST_UNANSWERED = "credit-request-unanswered"
FWD_CNT_STUCK = "fwd-cnt-stuck"
LINUX_QUIET_SPACE = 65536
"""After a read, Linux sends a CREDIT_UPDATE only once less than this much of its buffer is
free as last announced, or once nothing is left queued (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE; shown
on 6.1 and 6.12 by window-full-partial-read.pcap.gz). A receiver that consumed ``buf_alloc -
64 KiB`` or less of a full window stays silent by design and still has data queued: it
stopped reading, no transport bug."""


@dataclass(frozen=True)
class Verdict:
    """The cause of one long stall (two stalls for a deadlock), as the id of the rule that
    reports it."""

    rule: str
    conn: Connection
    stalls: tuple[Stall, ...]


def verdicts(ctx: Context) -> list[Verdict]:
    """Every stall long enough to matter, each with its one cause (see the module's doc)."""
    long = [st for st in ctx.digest.all_stalls() if st.seconds(ctx.end_ns) >= ctx.t.stall_s
            or _unanswered_requests(st, ctx)]
    by_stream: dict[int, list[Stall]] = defaultdict(list)
    for st in long:
        by_stream[st.stream].append(st)
    out = []
    for sid, stalls in sorted(by_stream.items()):
        c = ctx.conns[sid]
        pair = _overlap(stalls, ctx.end_ns, ctx.t.stall_s)
        if pair is not None:
            out.append(Verdict(WINDOW_FULL, c, pair))
            stalls = [st for st in stalls if st not in pair]
        out += [Verdict(_cause(ctx, st), c, (st,)) for st in stalls]
    return out


def _cause(ctx: Context, st: Stall) -> str:
    if _unanswered_requests(st, ctx):
        return CREDIT_REQUEST_UNANSWERED
    if _consumed_silently(st):
        return FWD_CNT_STUCK
    return WINDOW_FULL


def _revealed(st: Stall) -> bool:
    """The window reopened because the receiver's fwd_cnt advanced, carried by a packet that
    is not a CREDIT_UPDATE: it had consumed without saying so."""
    return st.end_frame is not None and st.freed_by_fwd and st.ended_by != Op.CREDIT_UPDATE


def _consumed_silently(st: Stall) -> bool:
    """:func:`_revealed`, and more consumed than Linux keeps quiet about."""
    return _revealed(st) and st.freed > st.limit - LINUX_QUIET_SPACE


def _mine(ctx: Context) -> list[Verdict]:
    """The verdicts of the running rule."""
    assert ctx.rule is not None
    return [v for v in verdicts(ctx) if v.rule == ctx.rule.id]


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


@rule(WINDOW_FULL, Severity.WARNING, "receive window full with fwd_cnt frozen",
      kinds=("not-reading", "deadlock"))
def window_full(ctx: Context) -> None:
    """Long stalls of a receiver that did not read; a deadlock when both directions stall at
    once."""
    for v in _mine(ctx):
        if len(v.stalls) == 2:
            _deadlock(ctx, v.conn, *v.stalls)
        else:
            _not_reading(ctx, v.conn, v.stalls[0])


@rule(CREDIT_REQUEST_UNANSWERED, Severity.WARNING,
      "window full, and a CREDIT_REQUEST the receiver never answered")
def credit_request_unanswered(ctx: Context) -> None:
    """A sender out of credit asked for an update; the receiver sent nothing at all."""
    for v in _mine(ctx):
        st = v.stalls[0]
        f, ts, reply = _unanswered_requests(st, ctx)[0]
        wait = ((reply if reply is not None else ctx.end_ns) - ts) / 1e9
        head, common = _stall_facts(ctx, v.conn, st)
        ctx.add(v.conn, [*_frames(st), f],
                f"{head}; the sender asked for credit (CREDIT_REQUEST, frame {f}) and the "
                f"receiver sent nothing for {seconds_text(wait)}.",
                "The receiver's vsock transport does not answer CREDIT_REQUEST (Linux always "
                "does): a transport bug, so the sender may wait forever (e.g. "
                "vhost-device-vsock #494).",
                "Update or fix the receiver's vsock implementation (VMM device or driver) so "
                "it answers CREDIT_REQUEST with a CREDIT_UPDATE.",
                credit_request_frame=f, unanswered_s=round(wait, 3), **common)


@rule(FWD_CNT_STUCK, Severity.WARNING,
      "window full: the receiver consumed but its fwd_cnt was not announced")
def fwd_cnt_stuck(ctx: Context) -> None:
    """The receiver's advertised fwd_cnt stood still while it consumed: the sender stopped at
    buf_alloc until some other packet carried the new count."""
    for v in _mine(ctx):
        st = v.stalls[0]
        op = enum_name(Op, st.ended_by or 0)
        head, common = _stall_facts(ctx, v.conn, st)
        ctx.add(v.conn, _frames(st),
                f"{head}; for {seconds_text(st.seconds(ctx.end_ns))} the receiver announced "
                f"no free space, until its {op} at frame {st.end_frame} carried a fwd_cnt "
                f"{st.freed} bytes higher.",
                "The receiver consumed the data without sending a CREDIT_UPDATE: its "
                "transport does not announce freed buffer space, so the sender waited for "
                "nothing: a transport bug, like the Windows driver of virtio-win #865 (Linux "
                "announces once less than 64 KiB of its buffer is left free).",
                "Fix or update the receiver's vsock implementation to send CREDIT_UPDATE when "
                "its application frees buffer space.",
                ended_by=op, consumed=st.freed, **common)


def _frames(st: Stall) -> list[int]:
    return [st.start_frame] + ([st.end_frame] if st.end_frame else [])


def _stall_facts(ctx: Context, c: Connection, st: Stall) -> tuple[str, dict[str, Any]]:
    """The sentence that opens every one-stall finding, and the evidence they share."""
    sender, receiver = c.sides[st.sender], c.sides[1 - st.sender]
    if st.end_frame is None:
        ctx.open_end_explained.add(c.stream)
    common: dict[str, Any] = dict(time_ns=st.start_ns, seconds=round(st.seconds(ctx.end_ns), 3),
                                  in_flight=st.in_flight, buf_alloc=st.limit,
                                  sender=sender.addr, receiver=receiver.addr)
    head = (f"{sender.role} {sender.addr} → {receiver.addr}: {st.in_flight} bytes in flight "
            f"filled the receiver's buffer (buf_alloc {st.limit}) at frame {st.start_frame}")
    return head, common


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


def _not_reading(ctx: Context, c: Connection, st: Stall) -> None:
    head, common = _stall_facts(ctx, c, st)
    receiver = c.sides[1 - st.sender]
    until = (f"until frame {st.end_frame}" if st.end_frame is not None
             else "until the capture ended")
    read = ""
    if _revealed(st):
        read = (f" Its {enum_name(Op, st.ended_by or 0)} then showed {st.freed} bytes "
                f"consumed: too few for Linux to announce (it does once less than "
                f"{LINUX_QUIET_SPACE} bytes of the buffer are left free), the rest unread.")
    ctx.add(c, _frames(st),
            f"{head}, and its fwd_cnt stayed frozen for "
            f"{seconds_text(st.seconds(ctx.end_ns))} ({until}).{read}",
            f"The application at {receiver.addr} stopped reading (busy, blocked, or "
            f"waiting for something else), so the sender cannot send more.",
            "Keep reading the socket (a dedicated reader, or non-blocking I/O with poll); "
            "if bursts are expected, raise SO_VM_SOCKETS_BUFFER_SIZE on the receiver.",
            kind="not-reading", **common)
