"""Rules about the capture itself: the kernel's tap-length bug, connections it cut off."""

from __future__ import annotations

import numpy as np

from vsockmon.conntrack.tracker import Close
from vsockmon.diagnose.model import Severity
from vsockmon.diagnose.registry import Context, rule
from vsockmon.diagnose.rules.common import OPEN_ENDS


@rule("tap-length", Severity.INFO, "the kernel's tap-length bug on split packets")
def tap_length(ctx: Context) -> None:
    """Frames whose captured payload length is not their header's len."""
    tl = ctx.digest.tap_length
    if not tl.count:
        return
    length, captured = tl.detail
    streams = sorted(s for s in tl.streams if s in ctx.conns)  # live: some forgotten
    ctx.add(ctx.conns[streams[0]] if streams else None, tl.frames,
            f"{tl.count} frame(s) carry a payload of another length than their virtio header's "
            f"len (first at frame {tl.frames[0]}: captured {captured} bytes, len {length}). "
            f"This analysis used the header's len.",
            "The kernel's tap-length bug: before the 2026 fix \"fix length and offset in tap "
            "skb for split packets\", vhost-vsock tapped every non-final fragment of a split "
            "packet with all the bytes still to send. The traffic itself is fine.",
            "Nothing to fix in the traffic. Trust len (vsockmon does); Wireshark shows the "
            "surplus as payload. A kernel with the fix captures the right lengths.",
            streams=streams, time_ns=tl.first_ns, frames_affected=tl.count,
            example_len=length, example_captured=captured)


@rule("mid-capture", Severity.INFO, "connection started before or ended after the capture",
      kinds=("start", "end"),
      after=("cid-mismatch", "state-lost", "no-transport", "window-full",
             "credit-request-unanswered", "half-close-hang"))
def mid_capture(ctx: Context) -> None:
    """Connections the capture cut off, unless another finding explains the missing end."""
    ix = ctx.conns.index
    cut = ~ix.start_seen | (ctx.final & ix.closed(*OPEN_ENDS))
    for c in ctx.conns.pick(np.flatnonzero(cut & ~ix.among(ctx.open_end_explained))):
        if not c.start_seen and c.stream not in ctx.open_end_explained:
            ctx.add(c, [c.first_frame],
                    f"The capture began after this connection started: its first frame "
                    f"({c.first_frame}) is not a REQUEST. Its byte counts are what the capture "
                    f"saw; credit figures are lower bounds.",
                    "The connection was opened before the capture started.",
                    "Start the capture before the connection opens to see it whole.",
                    kind="start")
        if ctx.final and c.close in OPEN_ENDS and c.stream not in ctx.open_end_explained:
            state = "still connecting" if c.close == Close.UNANSWERED else str(c.close)
            ctx.add(c, [c.last_frame],
                    f"The capture ended while this connection was {state} (last packet at "
                    f"frame {c.last_frame}).",
                    "The capture stopped before the connection closed.",
                    "Stop the capture after the connection closes to see how it ends.",
                    kind="end", time_ns=c.last_ts_ns)
