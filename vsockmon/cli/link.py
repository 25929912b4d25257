"""``vsockmon link up|down|status``: the vsockmon tap link by hand."""

from __future__ import annotations

import json

import click

from vsockmon.live.link import (
    DEFAULT_LINK,
    LinkError,
    clear_marker,
    create_link,
    delete_link,
    get_link,
    link_status,
    read_marker,
    set_up,
)

_NAME = click.option("-i", "--interface", "name", default=DEFAULT_LINK, show_default=True,
                     help="Link name.")


@click.group()
def link() -> None:
    """Create, remove or inspect the vsockmon link (needs CAP_NET_ADMIN: run as root).

    `vsockmon capture` creates and removes the link itself; use these to keep one around
    for other tools (tcpdump -i vsockmon0, wireshark) or to clean up after a killed run.

    \b
    Examples:
      vsockmon link up && tcpdump -i vsockmon0 -w t.pcap
      vsockmon link status
      vsockmon link down
    """


@link.command()
@_NAME
def up(name: str) -> None:
    """Create the link (loading the vsockmon module if needed) and bring it up. It stays
    until `vsockmon link down`."""
    state = get_link(name)
    if state is None:
        state = create_link(name)
        click.echo(f"{name}: created and up (index {state.index})")
    elif not state.is_vsockmon:
        raise LinkError(f"{name} exists but is not a vsockmon link (type {state.ifi_type})")
    else:
        if not state.up:
            set_up(state, True)
        note = ""
        marker = read_marker(name)
        if marker is not None and not marker.running:
            clear_marker(name)  # adopted: from now on a deliberate, persistent link
            note = f"; was left behind by pid {marker.pid}, now kept"
        click.echo(f"{name}: up (it already existed{note})")


@link.command()
@_NAME
def down(name: str) -> None:
    """Remove the link (only a vsockmon one)."""
    removed = delete_link(name)
    click.echo(f"{name}: removed" if removed else f"{name}: absent, nothing to do")


@link.command()
@_NAME
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def status(name: str, as_json: bool) -> None:
    """Whether the link exists, is up, and who created it — including a link left behind by
    a capture that was killed (exit status 2 then)."""
    st = link_status(name)
    click.echo(json.dumps(st.as_dict()) if as_json else st.describe())
    if st.as_dict()["left_behind"]:
        raise SystemExit(2)
