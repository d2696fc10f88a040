"""``vmhostctl migrate`` and ``vmhostctl receive``: one live migration, run from the source.

``migrate NAME --to HOST`` runs ``vmhostctl receive NAME`` on HOST through a remote shell
(ssh, as libvirt's ``qemu+ssh``): that starts ``vmhost@NAME`` there, through its unit, as
the migration's target, and prints where its QEMU listens.  Then the source's vmhost is
asked to send the guest there; its ``watch`` tells the progress and the end.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Final

from . import config as vmconfig
from . import marks, paths
from .client import Client
from .errors import ClientError, NotListeningError, UsageError, VmhostError
from .vm.migration import tcp_uri

REMOTE_SHELL: Final = "ssh -o BatchMode=yes"
RECEIVE_TIMEOUT: Final = 60.0
"""How long the target may take to listen (its QEMU starts): the remote step's bound."""
_POLL: Final = 0.1


def add_parsers(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    migrate = commands.add_parser(
        "migrate", parents=[common], help="move the running VM to HOST without stopping it"
    )
    migrate.add_argument("name", nargs="?", help="VM name (instance of vmhost@NAME)")
    target = migrate.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", metavar="HOST", help="the target host, reached by --remote-shell")
    target.add_argument("--uri", help="a target already listening: tcp:HOST:PORT")
    migrate.add_argument(
        "--remote-shell",
        default=os.environ.get("VMHOST_REMOTE_SHELL", REMOTE_SHELL),
        help=f"runs vmhostctl on HOST (default: $VMHOST_REMOTE_SHELL or {REMOTE_SHELL!r})",
    )
    receive = commands.add_parser(
        "receive",
        parents=[common],
        help="start vmhost@NAME here as a migration's target; print where it listens",
    )
    receive.add_argument("name", nargs="?", help="VM name (instance of vmhost@NAME)")
    receive.add_argument("--host", help="this host's name or address, as the source reaches it")


def migrate(label: str, args: argparse.Namespace, client: Client) -> int:
    """Exit 0 once the guest runs at the target, 1 if it runs on here."""
    name = args.name or label
    state = client.status().vm_state
    if state not in ("running", "paused"):  # before a target is started for nothing
        raise VmhostError(f"{name} is {state}: only a running or paused VM migrates")
    uri = args.uri or _remote_receive(name, args.to, args.remote_shell)
    changes = client.watch()
    next(changes)  # subscribed before the migration starts: no change is missed
    try:
        client.migrate(uri)
    except ClientError:
        if args.to:  # the target waits for nothing: it would give up only at its timeout
            _remote(args.remote_shell, args.to, ["systemctl", "stop", f"vmhost@{name}.service"])
        raise
    print(f"{name}: migrating to {uri}", flush=True)
    try:
        for change in changes:
            if change.event == "migration" and change.message:
                print(f"{name}: {change.message}", flush=True)
            if change.vm_state == "migrated":
                return 0
            if change.event == "migration" and change.vm_state not in ("migrating", ""):
                return 1  # failed: back to running here (the message said why)
    except ClientError:
        pass
    return 0 if _left(args.name, client) else 1


def receive(name: str, host: str | None) -> int:
    """Start the target through systemd and wait until its QEMU listens; print its URI."""
    config = vmconfig.load(paths.config_path(name))
    unit = f"vmhost@{name}.service"
    active = subprocess.run(["systemctl", "is-active", "--quiet", unit], check=False)
    if active.returncode == 0:
        raise UsageError(f"{unit} is already active here: a VM runs once")
    marks.request_incoming(paths.state_dir(name))
    subprocess.run(["systemctl", "reset-failed", unit], check=False, capture_output=True)
    subprocess.run(["systemctl", "start", "--no-block", unit], check=True)
    client = Client(paths.socket_path(name), detail=True)
    deadline = time.monotonic() + RECEIVE_TIMEOUT
    while time.monotonic() < deadline:
        try:
            state = client.status().vm_state
        except ClientError:  # not listening yet, or no more
            failed = subprocess.run(["systemctl", "is-failed", "--quiet", unit], check=False)
            if failed.returncode == 0:
                raise VmhostError(f"{unit} failed: see journalctl -u {unit}") from None
            state = ""
        if state == "incoming":
            address = config.migration.listen_address
            if ipaddress.ip_address(address).is_unspecified:
                address = host or os.uname().nodename
            print(_uri(address, config.migration.port))
            return 0
        if state and state != "starting":
            raise VmhostError(f"{unit} is {state}, not waiting for a guest")
        time.sleep(_POLL)
    raise VmhostError(f"{unit} did not listen within {RECEIVE_TIMEOUT:g} s")


def _uri(host: str, port: int) -> str:
    try:
        return tcp_uri(host, port)
    except ValueError:  # a name
        return f"tcp:{host}:{port}"


def _remote_receive(name: str, host: str, remote_shell: str) -> str:
    """``vmhostctl receive`` on ``host``: the URI its target listens on."""
    here = shutil.which(sys.argv[0]) or "vmhostctl"  # the same install on every host
    done = _remote(remote_shell, host, [here, "receive", name, "--host", host])
    lines = done.stdout.split()
    if done.returncode or not lines:
        why = done.stderr.strip() or f"exit status {done.returncode}"
        raise VmhostError(f"cannot start the target on {host}: {why}")
    return lines[-1]


def _remote(remote_shell: str, host: str, command: list[str]) -> subprocess.CompletedProcess[str]:
    argv = [*shlex.split(remote_shell), host, shlex.join(command)]
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def _left(name: str | None, client: Client) -> bool:
    """Whether the guest left: once the source's vmhost is gone (the watch may end before
    its last change is read), the note it left (with only a socket: that it is gone)."""
    deadline = time.monotonic() + RECEIVE_TIMEOUT
    while time.monotonic() < deadline:
        try:
            client.status()
        except NotListeningError:
            break
        except ClientError:
            pass
        time.sleep(_POLL)
    return name is None or marks.migrated(paths.state_dir(name)) is not None
