"""console.log, rotated by size: the stdlib's ``RotatingFileHandler`` scheme (``console.log``,
``console.log.1`` ... older), without importing :mod:`logging.handlers`, which brings
:mod:`pickle` along: 0.4 MiB in each of a host's hundred vmhosts, for one size check."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class RotatingFile:
    """Appends bytes; a write that would take the file past ``max_bytes`` goes to a fresh
    one, the older ones shifted up, at most ``files`` kept.  A write that fails (a full
    disk) is dropped, said once until writes succeed again, and raises nothing: the console
    is read on (the handler printed a traceback for each)."""

    def __init__(self, path: Path, max_bytes: int, files: int) -> None:
        self.path, self.max_bytes, self.files = path, max_bytes, files
        self._file = self._open()
        self._failing = False

    def write(self, data: bytes) -> None:
        try:
            if self._file.tell() and self._file.tell() + len(data) > self.max_bytes:
                self._rotate()
            self._file.write(data)
        except OSError as e:
            if not self._failing:
                log.warning("console output dropped: %s: %s", self.path, e)
            self._failing = True
        else:
            self._failing = False

    def close(self) -> None:
        self._file.close()

    def _rotate(self) -> None:
        """Renamed while still open: if no fresh file can be made, writes go on to the old
        one (now ``.1``) and the next write tries again."""
        for i in range(self.files - 1, 0, -1):  # the oldest is overwritten
            if (newer := self._name(i - 1)).exists():
                os.replace(newer, self._name(i))
        fresh = self._open()
        self._file.close()
        self._file = fresh

    def _open(self) -> io.FileIO:
        """Unbuffered: each chunk is one write(2), as the handler's flush made it; and
        nothing is held back for a close to fail on."""
        return io.FileIO(self.path, "ab")

    def _name(self, age: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{age}") if age else self.path
