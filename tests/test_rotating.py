"""console.log's size rotation (vmhost/vm/rotating.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from vmhost.vm.rotating import RotatingFile


def test_rotates_by_size_and_keeps_its_files(tmp_path: Path) -> None:
    """Writes past the cap start a fresh console.log; at most ``files`` are kept, each under
    the cap, the newest bytes in console.log and the older in .1, .2 in that order."""
    out = RotatingFile(tmp_path / "console.log", max_bytes=10, files=3)
    for chunk in (b"aaaa", b"bbbb", b"cccc", b"dddd", b"eeee", b"ffff", b"gggg"):
        out.write(chunk)
    out.close()
    kept = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert kept == {
        "console.log": b"gggg",
        "console.log.1": b"eeeeffff",
        "console.log.2": b"ccccdddd",
    }


def test_appends_to_what_is_there_and_takes_a_chunk_over_the_cap(tmp_path: Path) -> None:
    """An existing console.log is appended to (a restart keeps the last boot's output); a
    chunk larger than the cap still lands whole, in a file of its own."""
    (tmp_path / "console.log").write_bytes(b"old\n")
    out = RotatingFile(tmp_path / "console.log", max_bytes=8, files=2)
    out.write(b"new\n")
    out.write(b"0123456789")
    out.close()
    assert (tmp_path / "console.log.1").read_bytes() == b"old\nnew\n"
    assert (tmp_path / "console.log").read_bytes() == b"0123456789"


def test_a_failing_disk_drops_output_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    """Writes that fail (ENOSPC) raise nothing: the console is read on; one warning."""
    out = RotatingFile(Path("/dev/full"), max_bytes=1 << 20, files=2)
    with caplog.at_level(logging.WARNING):
        out.write(b"lost\n")
        out.write(b"lost too\n")
    out.close()
    assert [r.getMessage() for r in caplog.records] == [
        "console output dropped: /dev/full: [Errno 28] No space left on device"
    ]
