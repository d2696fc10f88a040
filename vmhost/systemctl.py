"""Asking systemd about the vmhost units (``systemctl show``), for clients that must not
start a VM by connecting to its socket."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Collection
from typing import Final

from systemd import daemon

_log = logging.getLogger(__name__)

UNIT_STATES: Final = {
    "inactive": "stopped",
    "failed": "failed",
    "activating": "starting",
    "deactivating": "stopping",
}
"""What systemd's ActiveState of a service that is not running says about its VM."""


def vm_state(unit_state: str) -> str:
    """The VM's state word for a service's ActiveState (from :func:`waiting_for_a_connect`)."""
    return UNIT_STATES.get(unit_state, unit_state or "unknown")


def waiting_for_a_connect(names: Collection[str]) -> dict[str, str]:
    """VMs whose socket unit listens while their service is not active, with the service's
    ActiveState (inactive, failed, activating, deactivating).

    A connect to such a socket starts the VM (socket activation), so whoever
    only looks must not connect.  Empty when systemd does not run this host.
    """
    if not names or not daemon.booted():
        return {}
    units = [f"vmhost@{name}.{kind}" for name in names for kind in ("socket", "service")]
    try:
        shown = subprocess.run(
            ["systemctl", "show", "--property=Id,ActiveState", "--", *units],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        _log.warning("cannot ask systemd about the vmhost units: %s", exc)
        return {}
    state = {}
    for block in shown.split("\n\n"):
        fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        state[fields.get("Id", "")] = fields.get("ActiveState", "")
    return {
        name: state.get(f"vmhost@{name}.service", "")
        for name in names
        if state.get(f"vmhost@{name}.socket") == "active"
        and state.get(f"vmhost@{name}.service") != "active"
    }
