"""The locked PID file: one ``vmhost serve`` per VM, whatever the timing (issue 22 item 8)."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import VM
from fixtures import ENV, wait_for

from vmhost.client import Client
from vmhost.errors import AlreadyRunningError
from vmhost.pidfile import PidFile
from vmhost.service import EXIT_ALREADY_RUNNING


def test_lock_writes_the_pid_and_refuses_a_second(tmp_path: Path) -> None:
    """The holder's PID is in the file; a second lock fails; after remove it can be taken."""
    path = tmp_path / "run" / "vmhost.pid"
    held = PidFile.lock(path)
    assert path.read_text() == f"{os.getpid()}\n"
    with pytest.raises(AlreadyRunningError, match="another vmhost holds"):
        PidFile.lock(path)
    held.remove()
    assert not path.exists()
    PidFile.lock(path).remove()


def test_a_file_replaced_before_the_lock_is_opened_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opened, then removed by its holder before our lock: we lock the file that is there."""
    path = tmp_path / "vmhost.pid"
    real_open = os.open
    replaced: list[bool] = []

    def open_then_replace(*args: object, **kwargs: object) -> int:
        fd = real_open(*args, **kwargs)  # type: ignore[arg-type]
        if not replaced:  # the holder exits between our open and our flock
            replaced.append(True)
            path.unlink()
        return fd

    monkeypatch.setattr(os, "open", open_then_replace)
    held = PidFile.lock(path)
    assert os.path.samestat(os.fstat(held.fd), path.stat())
    held.remove()


def _serve(vm: VM) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "vmhost", "serve", "t", *vm.args()],
        env=ENV,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
def test_second_serve_in_the_first_ones_bind_window_exits_5(make_vm: Callable[..., VM]) -> None:
    """A vmhost between its lock and its listen (socket bound, not listening: it looks stale)
    is left alone: the second exits 5 and its socket stays."""
    vm = make_vm()
    with (
        open(vm.socket.with_name("vmhost.pid"), "w") as first,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound,
    ):
        fcntl.flock(first, fcntl.LOCK_EX)
        bound.bind(str(vm.socket))
        second = _serve(vm)
        try:
            _, err = second.communicate(timeout=30)
        finally:
            second.kill()
        assert second.returncode == EXIT_ALREADY_RUNNING, err.decode()
        assert b"another vmhost holds" in err
        assert vm.socket.exists()


@pytest.mark.slow
def test_two_serves_at_once_one_exits_5(make_vm: Callable[..., VM]) -> None:
    """Two `vmhost serve` for one VM started together, three times: one serves, one exits 5."""
    vm = make_vm()
    for _ in range(3):
        both = [_serve(vm), _serve(vm)]
        try:
            loser = _first_exit(both)[0]
            _, err = loser.communicate()
            assert loser.returncode == EXIT_ALREADY_RUNNING, err.decode()
            winner = both[1 - both.index(loser)]
            wait_for(lambda: Client(vm.socket).is_alive(), 30, "the winner serving")
            Client(vm.socket).force_stop()
            assert winner.wait(30) == 0
        finally:
            for proc in both:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()


def _first_exit(procs: list[subprocess.Popen[bytes]]) -> list[subprocess.Popen[bytes]]:
    """The process that exits first (the other boots its VM)."""
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done = [p for p in procs if p.poll() is not None]
        if done:
            return done
        time.sleep(0.02)
    raise AssertionError("neither vmhost exited")
