"""vmhost.activation, .notify, .journal and .logs on the host, with the host's real parts.

Activation through systemd-socket-activate, sd_notify into a real datagram
socket, the catalog compiled by journalctl.  The same code under a real
systemd and journald: the test_systemd_*.py modules.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import prerequisite_missing

from vmhost import activation, journal, notify
from vmhost.logs import format_entry

REPO = Path(__file__).resolve().parent.parent
CATALOG = REPO / "vmhost" / "vmhost.catalog"
SERVICE = REPO / "units" / "vmhost@.service"

# Runs under systemd-socket-activate; reports what listen_socket() made of the fds.
_ACTIVATED = textwrap.dedent(
    """
    import json, os, socket
    from vmhost.errors import ActivationError
    from vmhost.activation import listen_socket
    try:
        sock = listen_socket()
    except ActivationError as e:
        print(json.dumps({"error": str(e)}))
    else:
        print(json.dumps({
            "path": sock.getsockname(),
            "type": int(sock.type),
            "inheritable": sock.get_inheritable(),
            "env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
        }))
    """
)


def activate(*paths: Path, names: str = "", datagram: bool = False) -> dict[str, object]:
    """Run _ACTIVATED on sockets at ``paths``, passed as systemd would; a connect starts it."""
    if shutil.which("systemd-socket-activate") is None:
        prerequisite_missing("systemd-socket-activate is not installed (apt: systemd)")
    argv = ["systemd-socket-activate", *(f"--listen={p}" for p in paths)]
    if names:
        argv.append(f"--fdname={names}")
    if datagram:
        argv.append("--datagram")
    proc = subprocess.Popen(
        [*argv, sys.executable, "-c", _ACTIVATED], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    kind = socket.SOCK_DGRAM if datagram else socket.SOCK_STREAM
    deadline = time.monotonic() + 10
    with socket.socket(socket.AF_UNIX, kind) as trigger:
        while True:  # the path appears at bind(), before listen()
            try:
                trigger.connect(str(paths[0]))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        if datagram:
            trigger.send(b"wake")
        out, _ = proc.communicate(timeout=20)
    result: dict[str, object] = json.loads(out)
    return result


def test_listen_socket_prefers_the_one_named_control(tmp_path: Path) -> None:
    """Of two sockets the one named ``control`` is taken, non-inheritable; LISTEN_* are unset."""
    got = activate(tmp_path / "a.sock", tmp_path / "b.sock", names="other:control")
    assert got == {
        "path": str(tmp_path / "b.sock"),
        "type": socket.SOCK_STREAM,
        "inheritable": False,
        "env": [],
    }


def test_listen_socket_accepts_a_single_unnamed_socket(tmp_path: Path) -> None:
    """A lone activated socket is the control socket whatever its name."""
    got = activate(tmp_path / "only.sock")
    assert got["path"] == str(tmp_path / "only.sock")


def test_listen_socket_refuses_ambiguous_sockets(tmp_path: Path) -> None:
    """Two sockets and none named ``control``: a typed error that names what was passed."""
    got = activate(tmp_path / "a.sock", tmp_path / "b.sock", names="x:y")
    assert "expected one socket named 'control', got: x, y" in str(got["error"])


def test_listen_socket_refuses_a_datagram_socket(tmp_path: Path) -> None:
    """A datagram socket cannot serve the stream protocol: refused before anyone waits on it."""
    got = activate(tmp_path / "d.sock", names="control", datagram=True)
    assert "not a listening AF_UNIX stream socket" in str(got["error"])


def test_listen_socket_is_none_when_not_activated(monkeypatch: pytest.MonkeyPatch) -> None:
    """LISTEN_FDS meant for another process (LISTEN_PID) is not ours."""
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    assert activation.listen_socket() is None


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing where systemd's notify socket would be."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_notifier_sends_each_message(notify_socket: socket.socket) -> None:
    """Each call is one datagram with the assignments systemd expects."""
    n = notify.Notifier()
    n.ready("running (QEMU pid 7)")
    n.status("stopping: ACPI sent 4 s ago\nsecond line")
    n.stopping("stopping")
    n.watchdog()
    n.extend_timeout(2.5)
    n.mainpid(42)
    got = [notify_socket.recv(4096).decode() for _ in range(6)]
    assert got == [
        "READY=1\nSTATUS=running (QEMU pid 7)",
        "STATUS=stopping: ACPI sent 4 s ago second line",
        "STOPPING=1\nSTATUS=stopping",
        "WATCHDOG=1",
        "EXTEND_TIMEOUT_USEC=2500000",
        "MAINPID=42",
    ]


def test_notifier_is_silent_outside_systemd(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Created without NOTIFY_SOCKET, a Notifier sends nothing."""
    monkeypatch.delenv("NOTIFY_SOCKET")
    n = notify.Notifier()
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.getsockname())
    n.ready("running")
    notify_socket.settimeout(0.2)
    with pytest.raises(TimeoutError):
        notify_socket.recv(4096)


def test_notifier_failure_is_logged_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A notify socket that went away must not take the VM down with it."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    notify.Notifier().status("running")
    assert "sd_notify STATUS failed" in caplog.text


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("20000000", None, 10.0),
        ("20000000", "self", 10.0),
        ("20000000", "other", None),
        ("0", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    """Half of WATCHDOG_USEC, only for the process WATCHDOG_PID names (or any if unset)."""
    for key, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            own = os.getpid()
            monkeypatch.setenv(key, {"self": str(own), "other": str(own + 1)}.get(value, value))
    assert notify.watchdog_interval() == expected


_LOG_PROBE = textwrap.dedent(
    """
    import logging, os
    from vmhost import journal
    if os.environ.pop("MATCH_STDERR", ""):
        st = os.fstat(2)
        os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    journal.setup_logging("vm1")
    print(type(logging.getLogger().handlers[0]).__name__)
    logging.getLogger("x").info("hello %s", "there")
    """
)


@pytest.mark.parametrize(
    ("env", "handler"),
    [
        ({}, "StreamHandler"),
        ({"JOURNAL_STREAM": "1:2"}, "StreamHandler"),
        ({"MATCH_STDERR": "1"}, "JournalHandler"),
    ],
)
def test_setup_logging_picks_the_journal_only_when_stderr_is_it(
    tmp_path: Path, env: dict[str, str], handler: str
) -> None:
    """JOURNAL_STREAM must name our own stderr; an inherited, stale one means plain stderr."""
    stderr = tmp_path / "stderr"
    with stderr.open("w") as err:
        proc = subprocess.run(
            [sys.executable, "-c", _LOG_PROBE],
            env={k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"} | env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            check=True,
            cwd=REPO,
        )
    assert proc.stdout.strip() == handler
    if handler == "StreamHandler":
        assert re.search(r"vmhost\[vm1\] INFO hello there$", stderr.read_text(), re.M)


def test_log_event_carries_message_id_and_fields(caplog: pytest.LogCaptureFixture) -> None:
    """Lifecycle records carry their MESSAGE_ID and caller fields; a crash is an error."""
    with caplog.at_level(logging.INFO):
        journal.log_event(journal.Event.CRASHED, "VM x crashed", VMHOST_STATE="crashed")
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    fields = record.__dict__
    assert fields["MESSAGE_ID"] == "9c198aa67b8549218780195849241649"
    assert fields["VMHOST_STATE"] == "crashed"
    assert fields["VMHOST_EVENT"] == "crashed"


def test_every_event_is_in_the_catalog() -> None:
    """The catalog documents exactly the events' MESSAGE_IDs, each once."""
    ids = re.findall(r"^-- ([0-9a-f]{32})$", CATALOG.read_text(), re.M)
    assert sorted(ids) == sorted(e.message_id for e in journal.Event)


def test_catalog_compiles(tmp_path: Path) -> None:
    """journalctl accepts the catalog and finds every entry (with its VM placeholder)."""
    if shutil.which("journalctl") is None:
        prerequisite_missing("journalctl is not installed")
    catalog_dir = tmp_path / "usr/lib/systemd/catalog"
    catalog_dir.mkdir(parents=True)
    shutil.copy(CATALOG, catalog_dir)
    subprocess.run(["journalctl", f"--root={tmp_path}", "--update-catalog"], check=True)
    listed = subprocess.run(
        ["journalctl", f"--root={tmp_path}", "--list-catalog"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for event in journal.Event:
        assert re.search(rf"^{event.message_id} vmhost: VM @VMHOST_VM@ ", listed, re.M), event


def test_service_exposure_is_at_most_2() -> None:
    """systemd-analyze rates the unit's sandbox at 2.0 or better (the live figure: e2e test)."""
    if shutil.which("systemd-analyze") is None:
        prerequisite_missing("systemd-analyze is not installed")
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=20", "--no-pager", SERVICE],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-500:] + proc.stderr


def test_format_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Timestamp in local time with milliseconds, identifier, message; repeated fields joined."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        usec = 1_700_000_000_123_456
        assert (
            format_entry({"SYSLOG_IDENTIFIER": "vmhost-console", "MESSAGE": "READY"}, usec)
            == "2023-11-14T22:13:20.123+00:00 vmhost-console: READY"
        )
        assert format_entry({"_COMM": "qemu", "MESSAGE": ["a", "b"]}, usec).endswith(" qemu: a b")
    finally:
        monkeypatch.undo()
        time.tzset()
