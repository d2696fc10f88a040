"""The control socket's listening side: binding its path (a stale socket file is replaced,
a live server's is not) and the descriptor limit its connections need."""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket
import stat
from pathlib import Path
from typing import Final

from ..errors import AlreadyRunningError

log = logging.getLogger(__name__)

_FD_HEADROOM: Final = 256
"""Descriptors beside the control connections: QMP, console, agent, journal, log streams."""


def bind(path: Path, *, mode: int = 0o660) -> socket.socket:
    """A listening socket at ``path``; a stale socket file is replaced, a live server is not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(str(path))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            _remove_stale(path)
            sock.bind(str(path))
        os.chmod(path, mode)
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _remove_stale(path: Path) -> None:
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise AlreadyRunningError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise AlreadyRunningError(f"another vmhost is already serving {path}")


def raise_fd_limit(connections: int) -> None:
    """Let the connection cap, not EMFILE, decide who is served.

    systemd gives a service 1024 descriptors (soft) unless the unit says
    otherwise: a flood of idle connections then stops every accept, good
    clients included, instead of evicting the idlest.  Go raises its soft
    limit by itself; we raise it as far as the hard limit allows.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + _FD_HEADROOM
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
    if raised < wanted:
        log.warning("only %d file descriptors (hard limit) for %d connections", raised, connections)
