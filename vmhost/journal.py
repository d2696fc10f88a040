"""vmhost's own records in the journal: logging set-up, the fields, the lifecycle message ids.

Outside systemd (no ``JOURNAL_STREAM``) records go to stderr as plain lines.
"""

from __future__ import annotations

import enum
import logging
import os
from typing import Final
from uuid import UUID

from systemd import journal

IDENTIFIER: Final = "vmhost"
CONSOLE_IDENTIFIER: Final = "vmhost-console"
FIELD_VM: Final = "VMHOST_VM"

_log = logging.getLogger(__name__)


def journal_connected() -> bool:
    """True when our stderr is systemd's journal stream: structured records will be kept."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def setup_logging(vm: str, *, verbose: bool = False) -> None:
    """Route stdlib logging to the journal (with ``VMHOST_VM`` on every record) or to stderr.

    UPPERCASE keys of a record's ``extra`` become journal fields; plain
    stderr shows only the message, since a terminal has no use for them.
    """
    handler: logging.Handler
    if journal_connected():
        handler = journal.JournalHandler(SYSLOG_IDENTIFIER=IDENTIFIER, **{FIELD_VM: vm})
        handler.setFormatter(logging.Formatter("%(message)s"))  # PRIORITY, LOGGER are fields
    else:
        handler = logging.StreamHandler()
        name = vm.replace("%", "%%")
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {IDENTIFIER}[{name}] %(levelname)s %(message)s")
        )
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True
    )


class Event(enum.Enum):
    """Lifecycle milestones; each MESSAGE_ID is stable forever and explained in vmhost.catalog."""

    STARTED = UUID("c77f83d174654e369c2e9c9bbc544fa4")
    READY = UUID("d4620c77114c42878a274b246acd8679")
    STOPPING = UUID("5ea2ab4299c342268596f2477f20f744")
    STOPPED = UUID("4c6c9d30aaca4352ac575b71538a6bec")
    CRASHED = UUID("9c198aa67b8549218780195849241649")
    FAILED = UUID("6bfc1a302fd04df0824f5a49c15d5ef4")
    RELOADED = UUID("18b5b2c0dc2f4c81a1d5a170be84f393")
    MIGRATED = UUID("e127d58daed64c23b9477ba59e66cde8")

    @property
    def message_id(self) -> str:
        return self.value.hex


_ERROR_EVENTS: Final = frozenset({Event.CRASHED, Event.FAILED})


def log_event(event: Event, message: str, **fields: str) -> None:
    """Log a lifecycle milestone so ``journalctl MESSAGE_ID=...`` finds it across versions."""
    level = logging.ERROR if event in _ERROR_EVENTS else logging.INFO
    _log.log(
        level,
        message,
        extra={"MESSAGE_ID": event.message_id, "VMHOST_EVENT": event.name.lower(), **fields},
    )
