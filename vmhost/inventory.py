"""Every VM this host knows, for ``vmhostctl list``: its config, its control socket, its answer.

A VM is known by a config (:func:`vmhost.paths.config_path`) or a control socket
(:func:`vmhost.paths.socket_path`).  The sockets are asked at once, each with a
short deadline, so one hung VM costs that deadline and never stalls the list.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Final

import msgspec

from . import marks, paths, systemctl
from .client import AsyncClient
from .config import check_name
from .errors import ClientError, ConfigError, ServerError

ASK_TIMEOUT: Final = 1.0
"""A vmhost answers from its cache in well under a millisecond; a busy host gets plenty more."""


class Row(msgspec.Struct):
    """One VM; ``None`` where it is not known (no answer, or not running)."""

    name: str
    state: str
    pid: int | None = None
    ssh_port: int | None = None
    uptime_seconds: int | None = None
    error: str | None = None


def _names(config_dir: Path, run_dir: Path) -> list[str]:
    found = {p.stem for p in config_dir.glob("*.toml")}
    found |= {p.parent.name for p in run_dir.glob(f"*/{paths.SOCKET_NAME}")}
    return sorted(name for name in found if _valid(name))


def _valid(name: str) -> bool:
    try:
        check_name(name)
    except ConfigError:
        return False
    return True


async def survey(timeout: float = ASK_TIMEOUT) -> list[Row]:
    """A row per known VM, sorted by name.

    A socket that systemd would answer by starting the VM is not asked: its
    state is the service's, from systemd.
    """
    run_dir = paths.run_dir()
    known = _names(paths.config_dir(), run_dir)
    waiting = systemctl.waiting_for_a_connect(known)
    asked = [name for name in known if name not in waiting]
    rows = await asyncio.gather(*(_ask(n, paths.socket_path(n, run_dir), timeout) for n in asked))
    by_name = {row.name: row for row in rows}
    for name, unit_state in waiting.items():
        by_name[name] = Row(name, systemctl.vm_state(unit_state))
    return [by_name[name] for name in known]


async def _ask(name: str, path: Path, timeout: float) -> Row:
    client = AsyncClient(path, dial_timeout=timeout, deadline=timeout, detail=True)
    try:
        answer = await client.info()
    except ServerError as e:
        return Row(name, "unknown", error=str(e))
    except ClientError as e:
        if isinstance(e.__cause__, FileNotFoundError | ConnectionRefusedError):
            # no socket, or nobody listening on it: down here, or gone by live migration
            return Row(name, "migrated" if marks.migrated(paths.state_dir(name)) else "stopped")
        if isinstance(e.__cause__, TimeoutError):
            return Row(name, "unresponsive", error=str(e))  # someone holds it, does not answer
        return Row(name, "unknown", error=str(e))
    pid = answer.pid or None
    return Row(
        name,
        answer.vm_state or answer.state,
        pid=pid,
        ssh_port=answer.ssh_port or None,
        uptime_seconds=_uptime(pid) if pid else None,
    )


def _uptime(pid: int) -> int | None:
    """Seconds since process ``pid`` (the VM's QEMU) started, from /proc; None if not visible."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        # Field 22, counted after the parenthesised command name (which may hold spaces).
        started = int(stat.rpartition(")")[2].split()[19]) / os.sysconf("SC_CLK_TCK")
        since_boot = float(Path("/proc/uptime").read_text().split()[0])
        return max(0, round(since_boot - started))
    return None


def table(rows: list[Row]) -> str:
    """The rows for people: aligned columns, ``-`` where a value is not known."""
    lines: list[tuple[str, ...]] = [("NAME", "STATE", "PID", "SSH", "UPTIME")]
    for row in rows:
        uptime = None if row.uptime_seconds is None else duration(row.uptime_seconds)
        cells = (row.pid, row.ssh_port, uptime)
        lines.append((row.name, row.state, *("-" if c is None else str(c) for c in cells)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def duration(seconds: int) -> str:
    """``3d04h``, ``2h05m``, ``7m03s``, ``42s``: the two largest units."""
    minutes, secs = divmod(seconds, 60)
    hours, mins = divmod(minutes, 60)
    days, hrs = divmod(hours, 24)
    if days:
        return f"{days}d{hrs:02d}h"
    if hours:
        return f"{hours}h{mins:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
