"""vmhostctl logs against a real journal, under a real systemd: records of the VM's own unit,
locally and over the control socket, followed, and the reader's edge cases."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from container import Container
from systemd_vm import READY_LINE, VM, ct, make_vm, venv, wait_for

__all__ = ["ct", "make_vm", "venv"]  # fixtures, used by name
pytestmark = pytest.mark.slow

# vmhost.logs.entries as the CLI uses it: prints each line, stops after COUNT lines.
_READ_LOGS = """
import asyncio, sys
from vmhost.logs import entries
name, lines = sys.argv[1], int(sys.argv[2])
follow, count = sys.argv[3] == "follow", int(sys.argv[4])
async def main():
    seen = 0
    async for line in entries(name, lines=lines, follow=follow):
        print(line.split(": ", 1)[1], flush=True)
        seen += 1
        if seen == count:
            return
asyncio.run(main())
"""


# Run as vmhost@NAME.service: sends NAME's messages, then waits until journald has them with the
# unit attributed (journald reads the sender's cgroup, so a sender gone too soon would lose it).
_SEND_LOGS = """
import sys, time
from systemd import journal
name = sys.argv[1]
messages = open(f"/run/e2e/{name}.messages").read().splitlines()
for m in messages:
    journal.send(m, VMHOST_VM=name)
reader = journal.Reader()
reader.add_match(_SYSTEMD_UNIT=f"vmhost@{name}.service", VMHOST_VM=name)
deadline = time.monotonic() + 20
seen = set()
while not set(messages) <= seen and time.monotonic() < deadline:
    reader.wait(0.2)
    seen |= {entry["MESSAGE"] for entry in reader}
"""


def watching(ct: Container, pid: str) -> bool:
    """Whether a journal reader has its inotify fd: every record from then on reaches it
    (vmhost.logs.entries takes it before reading the tail)."""
    family = f"{pid} $(cat /proc/{pid}/task/*/children)"  # it may run under timeout(1)
    find = f'for p in {family}; do find /proc/$p/fd -lname "anon_inode:inotify"; done'
    return bool(ct.run("sh", "-c", find, check=False).stdout.strip())


def test_logs_of_a_vm_without_records(make_vm: Callable[..., VM]) -> None:
    """With a real journal: an unknown VM fails; a configured one that never ran says so."""
    quiet = make_vm("logs-quiet")
    unknown = quiet.ctl("logs", "logs-nosuch", check=False)
    assert (unknown.returncode, unknown.stdout) == (1, ""), unknown
    assert "no VM logs-nosuch: no /etc/vmhost/logs-nosuch.toml" in unknown.stderr
    empty = quiet.ctl("logs", quiet.name, check=False)
    assert (empty.returncode, empty.stdout) == (0, ""), empty
    assert f"no journal records with VMHOST_VM={quiet.name} in the local journal (/" in empty.stderr


def test_logs_from_the_journal(make_vm: Callable[..., VM]) -> None:
    """vmhostctl logs: last N lines locally and over the control socket; -f sees new records."""
    vm = make_vm("logs")
    vm.ct.systemctl("start", vm.unit)
    vm.wait_console()

    line = re.compile(
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d (vmhost|vmhost-console): "
    )
    last3 = vm.ctl("logs", vm.name, "-n", "3").stdout.splitlines()
    assert len(last3) == 3 and all(line.match(x) for x in last3), last3
    local = vm.ctl("logs", vm.name, "-n", "500").stdout
    remote = vm.ctl("--socket", vm.socket, "logs", "-n", "500").stdout
    for out in (local, remote):
        assert f"vmhost-console: {READY_LINE}" in out
        assert f"vmhost: starting VM {vm.name}" in out

    ctl = f"{vm.venv}/bin/vmhostctl"
    follow = vm.ct.popen(
        "sh", "-c", 'echo $$; exec timeout 30 "$0" logs "$1" -f -n 0', ctl, vm.name
    )
    try:
        assert follow.stdout is not None
        pid = follow.stdout.readline().strip()
        wait_for("the follower watching the journal", lambda: watching(vm.ct, pid))
        vm.ctl("stop", vm.name)
        followed = []
        for text in follow.stdout:
            followed.append(text)
            if "stopped" in text:
                break
        assert any("stopping" in x for x in followed), followed
        vm.ct.run("kill", pid, check=False)
    finally:
        follow.wait(timeout=30)


def test_log_reader_edges(ct: Container, venv: Path) -> None:
    """entries(): no record, one record, the true last N (libsystemd 253 steps one too far)."""
    python = str(venv / "bin/python")
    ct.write("/run/e2e/read_logs.py", _READ_LOGS)
    ct.write("/run/e2e/send_logs.py", _SEND_LOGS)

    def send(name: str, *messages: str) -> None:
        # From inside vmhost@NAME.service: logs trust only records of the VM's own unit.
        ct.write(f"/run/e2e/{name}.messages", "\n".join(messages))
        ct.write(
            f"/etc/systemd/system/vmhost@{name}.service.d/send.conf",
            "[Service]\nType=oneshot\nRestart=no\nRestartForceExitStatus=\nExecStopPost=\nExecStart=\n"
            f"ExecStart={python} /run/e2e/send_logs.py %i\n",
        )
        ct.systemctl("daemon-reload")
        ct.systemctl("start", f"vmhost@{name}.service")
        ct.systemctl("stop", f"vmhost@{name}.socket")
        ct.run("journalctl", "--sync")

    def read(name: str, lines: int, count: int = 99) -> list[str]:
        out = ct.run(python, "/run/e2e/read_logs.py", name, str(lines), "tail", str(count))
        return out.stdout.splitlines()

    def follow(name: str, lines: int, count: int) -> subprocess.Popen[str]:
        reader = ct.popen(
            "sh", "-c", 'echo $$; exec "$0" "$@"', python, "/run/e2e/read_logs.py",
            name, str(lines), "follow", str(count),
        )  # fmt: skip
        assert reader.stdout is not None
        pid = reader.stdout.readline().strip()
        wait_for(f"the reader of {name} watching the journal", lambda: watching(ct, pid))
        return reader

    assert read("edge-none", 5) == []
    reader = follow("edge-none", 5, 2)
    send("edge-none", "first", "second")
    assert reader.communicate(timeout=20)[0].splitlines() == ["first", "second"]

    send("edge-one", "only")
    assert read("edge-one", 5) == ["only"]

    send("edge-three", "a", "b", "c")
    assert read("edge-three", 2) == ["b", "c"]
    assert read("edge-three", 0) == []
    reader = follow("edge-three", 1, 2)
    send("edge-three", "d")
    assert reader.communicate(timeout=20)[0].splitlines() == ["c", "d"]
    reader = follow("edge-three", 0, 1)
    send("edge-three", "e")
    assert reader.communicate(timeout=20)[0].splitlines() == ["e"]
