"""The PID file, and the lock on it that makes one ``vmhost serve`` per VM.

The lock (``flock``) is taken before the control socket is bound and held
until vmhost exits, across a reload's exec too (the descriptor is handed
over): a second ``vmhost serve`` for the same VM fails at once (exit 5), and
can never take the first one's socket for a stale one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from .errors import AlreadyRunningError


class PidFile:
    """A locked PID file holding our PID; :meth:`remove` at the end."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def lock(cls, path: Path) -> PidFile:
        """Create (or reuse) and lock ``path``, then write our PID into it.

        Another vmhost holding it raises :class:`AlreadyRunningError`.  A file
        replaced between our open and our lock (its holder removed it on exit) is
        opened again, so two vmhosts never hold locks on two different files.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise AlreadyRunningError(f"another vmhost holds {path}") from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def remove(self) -> None:
        """Unlink, then unlock: a vmhost that opened it meanwhile finds it gone, makes another."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self.fd)
