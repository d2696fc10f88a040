"""This VM's journal records (vmhost's and its guest console's) for ``vmhostctl logs``.

Reading is cysystemd's job (its asyncio reader); systemd-python only writes.
Records are selected by ``_SYSTEMD_UNIT``, a field journald sets from the
sender's cgroup, so no local user can forge one with ``logger`` or
``systemd-cat``; ``VMHOST_VM`` (a field anyone can write) then keeps vmhost's
own structured records of that unit and leaves out anything else it printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import sys
import traceback
from collections.abc import AsyncGenerator, Mapping
from datetime import UTC, datetime

from cysystemd.async_reader import AsyncJournalReader
from cysystemd.reader import JournalEntry, JournalOpenMode, Rule

from .errors import JournalError
from .journal import FIELD_VM
from .paths import config_path, socket_path


def format_entry(fields: Mapping[str, object], realtime_usec: int) -> str:
    """One line per record, like ``journalctl -o short-iso`` without the host name."""
    when = datetime.fromtimestamp(realtime_usec / 1_000_000, UTC).astimezone()
    ident = _text(fields.get("SYSLOG_IDENTIFIER", fields.get("_COMM", "?")))
    return f"{when.isoformat(timespec='milliseconds')} {ident}: {_text(fields.get('MESSAGE', ''))}"


def _text(value: object) -> str:
    # A field sent twice arrives as a list; show every copy rather than guess.
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


def _format(entry: JournalEntry) -> str:
    return format_entry(entry.data, entry.get_realtime_usec())


async def entries(vm: str, *, lines: int = 10, follow: bool = False) -> AsyncGenerator[str, None]:
    """The last ``lines`` records of ``vmhost@vm.service`` with ``VMHOST_VM=vm``, oldest first;
    then new ones if ``follow``.

    Formatted here so the CLI and the control socket show the same lines.
    """
    reader = AsyncJournalReader()  # type: ignore[no-untyped-call]
    try:
        await _open(reader, vm, follow)
        newest = await _newest(reader)
        shown: list[JournalEntry] = []
        if newest is not None:
            shown.append(newest)
            while len(shown) < lines and (entry := await reader.previous()) is not None:
                shown.append(entry)
        for entry in reversed(shown[:lines]):
            yield _format(entry)
        if not follow:
            return

        if len(shown) > 1:
            await reader.skip_next(len(shown) - 1)  # back on the newest, already shown
        while True:
            while (entry := await reader.next()) is not None:
                yield _format(entry)
            await reader.wait()
    except BaseException as exc:
        # cysystemd closes a reader's descriptors only when the reader is freed, and a task
        # cancelled mid-read that nobody awaits (a log stream whose client left) keeps its
        # traceback, whose frames hold the reader: let them go now, not at a collection.
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        del reader


async def _open(reader: AsyncJournalReader, vm: str, follow: bool) -> None:
    try:
        await reader.open(JournalOpenMode.LOCAL_ONLY)
        if follow:
            # Watch from now on (as journalctl does): appends made while we read the tail wake us.
            _ = reader.fd
        unit = Rule("_SYSTEMD_UNIT", f"vmhost@{vm}.service")
        await reader.add_filter(unit & Rule(FIELD_VM, vm))
    except (OSError, SystemError) as exc:
        raise JournalError(f"cannot read the journal: {exc}") from exc


async def _newest(reader: AsyncJournalReader) -> JournalEntry | None:
    """Position on the newest matching record and return it; None (at the head) when there is none.

    Not just seek_tail + previous: the libsystemd 253 that cysystemd's wheels
    bundle steps one record too far back from the tail, so walk forward to
    the true end, and retry from the head when that first step found nothing.
    """
    await reader.seek_tail()
    newest = await reader.previous()
    if newest is None:
        await reader.seek_head()
        newest = await reader.next()
    if newest is not None:
        while (later := await reader.next()) is not None:
            newest = later
    return newest


def show_here(name: str, lines: int, follow: bool) -> int:
    """``vmhostctl logs``: the journal read here rather than through the server, so it works
    when the VM is down too.

    No record at all and neither a config nor a socket: a VM this host does not
    know (a typo, most likely), which fails rather than print nothing.
    """

    async def show(limit: int, *, follow: bool = False, echo: bool = True) -> int:
        shown = 0
        async for line in entries(name, lines=limit, follow=follow):
            if echo:
                print(line, flush=True)
            shown += 1
        return shown

    config, sock = config_path(name), socket_path(name)
    if not (config.exists() or sock.exists()) and not asyncio.run(show(1, echo=False)):
        print(
            f"vmhostctl: no VM {name}: no {config}, no {sock} and {_no_records(name)}",
            file=sys.stderr,
        )
        return 1
    if not asyncio.run(show(lines, follow=follow)) and lines > 0:
        print(f"vmhostctl: {_no_records(name)}", file=sys.stderr)
    return 0


def _no_records(name: str) -> str:
    """Says where the records were looked for, and why there may be none."""
    dirs = [d for d in ("/var/log/journal", "/run/log/journal") if os.path.isdir(d)]
    where = f"the local journal ({', '.join(dirs) or 'none on this host'})"
    text = f"no journal records with {FIELD_VM}={name} in {where}"
    text += "; vmhost logs there under systemd only (started by hand: to its stderr)"
    groups = set()
    for gid in os.getgroups():
        with contextlib.suppress(KeyError):
            groups.add(grp.getgrgid(gid).gr_name)
    if os.geteuid() != 0 and not groups & {"adm", "systemd-journal"}:
        text += "; outside the adm and systemd-journal groups you see only your own records"
    return text
