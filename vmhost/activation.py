"""Socket activation: the control socket systemd passes in (``LISTEN_FDS``), checked."""

from __future__ import annotations

import os
import socket
from typing import Final

from systemd import daemon

from .errors import ActivationError

CONTROL_FD_NAME: Final = "control"


def listen_socket() -> socket.socket | None:
    """The control socket systemd activated us with, or None when started by hand.

    The LISTEN_* variables are unset so QEMU never believes it was activated,
    and the descriptor is made non-inheritable so QEMU never holds the socket
    (a restart must find it free of stray listeners).
    """
    fds = daemon.listen_fds_with_names(unset_environment=False)
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        # Through os.environ: libsystemd's unsetenv() would leave Python's copy stale.
        os.environ.pop(key, None)
    if not fds:
        return None
    named = [fd for fd, name in fds.items() if name == CONTROL_FD_NAME]
    if len(named) == 1:
        fd = named[0]
    elif not named and len(fds) == 1:
        (fd,) = fds
    else:
        names = ", ".join(sorted(fds.values()))
        raise ActivationError(f"expected one socket named {CONTROL_FD_NAME!r}, got: {names}")
    if not daemon.is_socket_unix(fd, socket.SOCK_STREAM, listening=1):
        raise ActivationError(
            f"activated fd {fd} ({fds[fd]}) is not a listening AF_UNIX stream socket"
        )
    os.set_inheritable(fd, False)
    return socket.socket(fileno=fd)
