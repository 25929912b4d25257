"""The diagnose rules, one module per family; importing this package registers them all.

Where to look: setting a connection up (``connect``: no-listener, seqpacket-refused,
no-transport, dial-retry, state-lost), addresses (``addressing``: cid-mismatch), full windows
(``stall``: window-full, credit-request-unanswered, fwd-cnt-stuck), flow control (``flow``:
credit-violation, small-packet-reset), closing (``close``: half-close-hang, half-close-stall,
abrupt-close), resets that belong elsewhere (``reset``: stale-rst, transport-reset), the
capture itself (``capture``: tap-length, mid-capture).
Each rule is a function registered with :func:`vsockmon.diagnose.registry.rule`.
"""

from vsockmon.diagnose.rules import addressing, capture, close, connect, flow, reset, stall

__all__ = ["addressing", "capture", "close", "connect", "flow", "reset", "stall"]
