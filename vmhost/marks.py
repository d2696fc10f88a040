"""Files in a VM's state directory that carry a live migration across processes: the
request to receive the guest (``vmhostctl receive`` to the target's next vmhost) and the
note that the guest left (the source's vmhost to ``vmhostctl status``)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Final

INCOMING: Final = "incoming"
MIGRATED: Final = "migrated"
REQUEST_SECONDS: Final = 60.0
"""How long a request to receive waits for the vmhost it is meant for: a stale one must
not turn a later ordinary start into a wait for a guest nobody sends."""


def request_incoming(state_dir: Path) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / INCOMING).write_text(f"{time.time() + REQUEST_SECONDS:.0f}\n")


def take_incoming(state_dir: Path) -> bool:
    """Whether this start is to receive a guest; the request is used up either way."""
    path = state_dir / INCOMING
    try:
        until = float(path.read_text())
    except (OSError, ValueError):
        return False
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
    return time.time() <= until


def note_migrated(state_dir: Path, where: str) -> None:
    (state_dir / MIGRATED).write_text(f"{where}\n")


def migrated(state_dir: Path) -> str | None:
    """Where the guest went, if it left this host by live migration (and was not started
    here again since)."""
    try:
        return (state_dir / MIGRATED).read_text().strip()
    except OSError:
        return None


def forget_migrated(state_dir: Path) -> None:
    with contextlib.suppress(OSError):
        (state_dir / MIGRATED).unlink()
