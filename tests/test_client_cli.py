"""Client (sync and async) and vmhostctl against a live server on a real socket."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path

import pytest
from conftest import FakeController

import vmhost
from vmhost import AsyncClient, Client, ClientError, ServerError, VMState
from vmhost.cli import vmhostctl_main
from vmhost.control.server import Server
from vmhost.errors import ConfigError
from vmhost.paths import socket_path
from vmhost.vm.state import Change


async def ctl(*argv: str) -> int:
    return await asyncio.to_thread(vmhostctl_main, list(argv))


async def test_json_status(
    server: Server, sock_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vmhostctl --json --socket S status` prints the server's answer as JSON."""
    assert await ctl("--json", "--socket", str(sock_path), "status") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and out["state"] == "running" and out["vm_state"] == "running"


async def test_json_info_names_the_running_version(
    server: Server, sock_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vmhostctl info --json` carries the serving vmhost's version in the detail fields."""
    assert await ctl("info", "--json", "--socket", str(sock_path)) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["backend"], out["version"]) == ("qemu", vmhost.__version__)


async def test_human_info_with_options_after_command(
    server: Server, sock_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Options may follow the command, like systemctl; output is for people."""
    assert await ctl("info", "--socket", str(sock_path)) == 0
    out = capsys.readouterr().out
    assert "running" in out and "127.0.0.1:2222" in out and "qemu" in out


async def test_stop_timeout_and_force_stop(
    server: Server, sock_path: Path, controller: FakeController
) -> None:
    """`stop --timeout 10` and `force-stop` reach the controller."""
    assert await ctl("stop", "--socket", str(sock_path), "--timeout", "10", "--no-block") == 0
    assert await ctl("force-stop", "--socket", str(sock_path)) == 0
    await asyncio.sleep(0.05)
    assert controller.stops == [10] and controller.force_stops == 1


async def test_stop_waits_until_gone_showing_the_steps(
    server: Server, sock_path: Path, controller: FakeController, capsys: pytest.CaptureFixture[str]
) -> None:
    """`stop NAME` shows each step of the stop chain as the watch tells it, and returns once
    nothing listens."""
    stop = asyncio.create_task(ctl("stop", "web", "--socket", str(sock_path)))
    async with asyncio.timeout(5):
        while not controller.stops:
            await asyncio.sleep(0.01)
    changes = [
        Change(VMState.STOPPING, "stop requested, 30 s to finish"),
        Change(VMState.STOPPING, "stop: ACPI power-down (30.0 s for it)", "acpi-power-down"),
        Change(VMState.STOPPING, "stop: QMP quit (1.0 s for it)", "qmp-quit"),
        Change(VMState.STOPPED, "stop requested"),
    ]
    for change in changes:
        controller.changes.publish(change)
    controller.state = VMState.STOPPED
    await asyncio.sleep(0.3)
    assert not stop.done()  # vmhost still serves
    await server.close()  # vmhost exits: the socket goes
    assert await asyncio.wait_for(stop, 5) == 0
    assert capsys.readouterr().out.splitlines() == [
        "web: stopping (stop timeout 20 s)",
        "web: stopping (stop requested, 30 s to finish)",
        "web: stopping (stop: ACPI power-down (30.0 s for it))",
        "web: stopping (stop: QMP quit (1.0 s for it))",
        "web: stopped (stop requested)",
    ]


async def test_a_vm_that_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Configured but not listening: `status` says stopped, exit 3, `stop` has nothing to do;
    unknown: exit 4 and a word on stderr; `is-alive` exits 1 for both."""
    monkeypatch.setenv("CONFIGURATION_DIRECTORY", str(tmp_path))
    (tmp_path / "web.toml").write_text("")
    none = str(tmp_path / "none.sock")
    assert await ctl("status", "web", "--socket", none) == 3
    assert await ctl("stop", "web", "--socket", none) == 0
    assert capsys.readouterr().out == "web: stopped\nweb: stopped\n"
    assert await ctl("status", "other", "--socket", none) == 4
    assert await ctl("stop", "other", "--socket", none) == 4
    assert "no VM other here: no " in capsys.readouterr().err
    assert await ctl("is-alive", "web", "--socket", none) == 1
    assert await ctl("is-alive", "other", "--socket", none) == 1


async def test_status_of_an_ended_vm_exits_3(
    server: Server, sock_path: Path, controller: FakeController, capsys: pytest.CaptureFixture[str]
) -> None:
    """vmhost still answering, QEMU gone: not running, as `systemctl status` says of it."""
    controller.state = VMState.STOPPED
    assert await ctl("status", "--socket", str(sock_path)) == 3
    assert capsys.readouterr().out.startswith(f"{sock_path}: stopped\n")


@pytest.mark.skipif(Path("/run/systemd/system").exists(), reason="PID 1 is systemd here")
async def test_start_without_systemd_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert await ctl("start", "web") == 1
    assert "PID 1 is not systemd" in capsys.readouterr().err


async def test_unreachable_socket_fails_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No server: non-zero exit and the reason on stderr."""
    assert await ctl("status", "--socket", str(tmp_path / "none.sock")) == 1
    assert "No such file or directory" in capsys.readouterr().err
    assert await ctl("is-alive", "--socket", str(tmp_path / "none.sock")) == 1


def test_name_resolves_to_run_dir() -> None:
    """NAME means /run/vmhost/NAME/vmhost.sock; names that escape the directory are refused."""
    assert socket_path("web") == Path("/run/vmhost/web/vmhost.sock")
    for bad in ("../etc", "a/b", "", ".."):
        with pytest.raises(ConfigError):
            socket_path(bad)


async def test_async_client_surface(server: Server, sock_path: Path) -> None:
    """AsyncClient has the Go client's methods."""
    client = AsyncClient(sock_path)
    assert (await client.status()).state == "running"
    info = await client.info()
    assert (info.ssh_port, info.backend) == (2222, "qemu")
    assert (await client.stop(5)).state == "stopping"
    assert await client.is_alive()


async def test_sync_client_surface(server: Server, sock_path: Path) -> None:
    """Client has the Go client's methods, blocking."""
    client = Client(sock_path)
    assert (await asyncio.to_thread(client.status)).state == "running"
    assert (await asyncio.to_thread(client.force_stop)).state == "stopping"
    assert await asyncio.to_thread(client.is_alive)


async def test_ok_false_raises_with_server_text(
    server: Server, sock_path: Path, controller: FakeController
) -> None:
    """An ok:false answer raises ServerError carrying the server's text."""
    from vmhost.control.wire import Request

    with pytest.raises(ServerError, match="unknown method: reboot"):
        await AsyncClient(sock_path).call(Request(method="reboot"))


def test_deadline_on_a_silent_server(tmp_path: Path) -> None:
    """A server that never answers costs the deadline, then a ClientError."""
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen()
        start = time.monotonic()
        with pytest.raises(ClientError):
            Client(path, deadline=0.5).status()
        assert 0.4 < time.monotonic() - start < 2
        assert not Client(path, deadline=0.2).is_alive()


def test_logs_of_an_unknown_vm_fail(
    host_dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """No config, no socket, no journal record: exit 1, saying where it looked."""
    name = f"nosuch-{os.urandom(4).hex()}"
    assert vmhostctl_main(["logs", name]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"no VM {name}: no {host_dirs[0] / name}.toml, no {host_dirs[1] / name}/" in err
    assert f"no journal records with VMHOST_VM={name} in the local journal" in err


def test_logs_without_records_say_so(
    host_dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A VM with a config but no journal record (never run by systemd): exit 0, a note on stderr."""
    name = f"quiet-{os.urandom(4).hex()}"
    (host_dirs[0] / f"{name}.toml").write_text("")
    assert vmhostctl_main(["logs", name]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"vmhostctl: no journal records with VMHOST_VM={name} in ")
    assert vmhostctl_main(["logs", name, "-n", "0"]) == 0  # none asked for: nothing to say
    assert capsys.readouterr() == ("", "")
