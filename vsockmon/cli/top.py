"""``vsockmon top``: every vsock connection live, full screen or in batches like ``top -b``.

Only click and the capture path are imported before the link is up and the capture thread
runs: the model (numpy) and the screen (Textual) come after, so in a slow VM no frame waits
for them (the ``listening on`` and ``ready`` lines on stderr say when each happened).
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING

import click

from vsockmon.errors import VsockmonError
from vsockmon.live.capture import LiveCaptureError, live_capture
from vsockmon.live.link import DEFAULT_LINK, LinkError, Terminated
from vsockmon.top.source import FEED_EVERY_S, Feed, LiveFeed, ReplayFeed

if TYPE_CHECKING:
    from vsockmon.top.model import TopModel

EXIT_SIGNAL = {"SIGTERM": 143, "SIGHUP": 129}
"""Exit status when a signal stopped a live ``top`` (SIGINT is a normal way out: 0)."""
BUFFER_MB = 32
"""The ring, 4× capture's: it holds what arrives while numpy and Textual import, when loading
their C extensions keeps the capture thread from running (measured in the lab VM at the echo
client's full rate: thousands of frames dropped while starting with 8 MiB, none or a few
hundred with 32; docs/top.md)."""


@click.command()
@click.option("-i", "--interface", "ifname", default=DEFAULT_LINK, show_default=True,
              help="vsockmon link to capture on; created (and removed on exit) if missing.")
@click.option("-r", "--read", "path", metavar="FILE",
              help="Replay a capture file instead of capturing, at the pace it was captured.")
@click.option("--at-once", is_flag=True, help="With -r: read the whole file at once.")
@click.option("-d", "--delay", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              metavar="SECS", help="Seconds between updates (and between batch snapshots).")
@click.option("-b", "--batch", is_flag=True,
              help="No screen: print a snapshot as text every -d seconds (like top -b).")
@click.option("-n", "--iterations", type=click.IntRange(min=1), metavar="N",
              help="Batch mode: stop after N snapshots.")
@click.option("--json", "as_json", is_flag=True,
              help="Batch mode, one JSON object per snapshot per line: time, connections "
                   "(stream, client, server, type, state, bytes_c2s, bytes_s2c, rate_c2s, "
                   "rate_s2c, peer_free_c2s, peer_free_s2c, stall_ms, finding), findings, "
                   "frames, drops.")
@click.option("-Y", "--filter", "expr", metavar="EXPR",
              help="Show only connections with a frame matching this display filter "
                   "(the language of 'vsockmon decode -Y'); '/' changes it on screen.")
@click.option("--linger", type=click.FloatRange(min=0), default=5.0, show_default=True,
              metavar="SECS", help="How long closed connections stay (dimmed).")
@click.option("--keep", "keep_mb", type=click.FloatRange(min=0), default=256, show_default=True,
              metavar="MB", help="Million bytes of frames kept (in $TMPDIR) for w to save; "
                                 "beyond, w saves the first ones.")
@click.option("-B", "--buffer-size", "buffer_mb", type=click.IntRange(min=2),
              default=BUFFER_MB, show_default=True,
              help="Kernel capture buffer (ring) in MiB; it holds the frames while the "
                   "screen starts.")
def top(ifname: str, path: str | None, at_once: bool, delay: float, batch: bool,
        iterations: int | None, as_json: bool, expr: str | None, linger: float,
        keep_mb: float, buffer_mb: int) -> None:
    """Watch every vsock connection live: ends, state, bytes and rates each way, the
    receiver's free credit, stalls, the last op and the worst finding.

    Needs the privileges of 'vsockmon capture' (root); creates vsockmon0 if missing and
    removes it on exit, Ctrl-C and SIGTERM. Keys on screen: s/S sort (next column /
    reverse), / filter, p pause, Enter the selected connection's recent ladder and findings,
    w write what was captured so far to a pcap (never over an existing file), q quit.
    The frames are kept in a temporary pcap for w (in $TMPDIR, up to --keep).

    \b
    Examples:
      vsockmon top
      vsockmon top -Y 'port == 1024' -d 0.5
      vsockmon top -b -n 4 -d 2 --json
      vsockmon top -r capture.pcap
      vsockmon top -r capture.pcap --at-once -b --json
    """
    started = time.monotonic()
    batch = batch or as_json
    if at_once and not path:
        raise click.UsageError("--at-once needs -r FILE")
    keep = int(keep_mb * 1_000_000)
    try:
        if path:
            feed = ReplayFeed(path, pace=not at_once, spool_limit=keep).start()
            try:
                _show(feed, batch, as_json, iterations, delay, expr, linger, started)
            finally:
                feed.stop()
            return
        with live_capture(ifname, None, buffer_mb << 20) as (held, live):
            live_feed = LiveFeed(live, keep).start()
            origin = "created; removed on exit" if held.created else "existing"
            click.echo(f"listening on {live.ifname} ({origin}), {live.method}, "
                       f"{time.monotonic() - started:.2f} s after start", err=True)
            try:
                _show(live_feed, batch, as_json, iterations, delay, expr, linger, started)
            finally:
                live_feed.stop()
        if live_feed.error:
            raise click.ClickException(live_feed.error)
        if live_feed.reason in EXIT_SIGNAL:
            sys.exit(EXIT_SIGNAL[live_feed.reason])
    except (LiveCaptureError, LinkError) as e:
        raise click.ClickException(str(e)) from None
    except VsockmonError as e:  # a file that cannot be read, a filter that does not parse
        raise click.ClickException(str(e)) from None
    except Terminated as e:
        sys.exit(EXIT_SIGNAL.get(str(e), 143))


def _show(feed: Feed, batch: bool, as_json: bool, iterations: int | None, delay: float,
          expr: str | None, linger: float, started: float) -> None:
    """Import the model (the capture is running meanwhile), then run the screen or batch."""
    from vsockmon.top.model import TopModel

    model = TopModel(linger_s=linger)
    model.set_filter(expr)
    if batch:
        if feed.live:
            click.echo(f"top: ready {time.monotonic() - started:.2f} s after start", err=True)
        _batch(feed, model, as_json, iterations, delay)
        return
    from vsockmon.top.view import TopApp

    ready = time.monotonic() - started
    TopApp(feed, model, delay, ready_s=ready).run()


def _batch(feed: Feed, model: TopModel, as_json: bool, iterations: int | None,
           delay: float) -> None:
    """Print a snapshot every ``delay`` seconds, ``iterations`` times (or until stopped)."""
    from vsockmon.top.model import text_table

    done = 0
    until = time.monotonic()
    while iterations is None or done < iterations:
        # on a fixed schedule, like top: the time a snapshot takes does not add up
        until = max(until + delay, time.monotonic())
        while not feed.finished and time.monotonic() < until:
            model.feed(feed.take())
            time.sleep(min(FEED_EVERY_S, max(until - time.monotonic(), 0)))
        if feed.live and feed.finished:
            return  # stopped by a signal (or the link went away): no half snapshot
        model.feed(feed.take())
        snap = model.snapshot(feed.now_ns(), feed.drops)
        try:
            if as_json:
                click.echo(json.dumps(snap.to_dict(), ensure_ascii=False))
            else:
                click.echo("\n".join(text_table(snap)) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            sys.stderr.close()
            return
        done += 1
        if feed.finished:
            return
