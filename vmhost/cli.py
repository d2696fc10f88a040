"""The ``vmhost`` (service) and ``vmhostctl`` (client) commands.

``vmhostctl`` puts the command first, like systemctl; ``--socket`` and
``--json`` are accepted before or after it.  Imports stay lazy so a status
call does not pay for the service's modules.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final, NoReturn

import msgspec

from . import __version__, terminal
from .errors import ClientError, NotListeningError, UsageError, VmhostError

if TYPE_CHECKING:
    from .client import Client
    from .control.wire import Response

_COMMANDS = ("list", "status", "info", "stop", "force-stop", "start", "logs", "events", "is-alive")
EXIT_NOT_RUNNING: Final = 3
"""As ``systemctl status`` (LSB): the VM is configured but not running."""
EXIT_UNKNOWN: Final = 4
"""As ``systemctl status`` (LSB): no VM of that name here."""
_ENDED: Final = ("stopped", "error")
_STOP_POLL: Final = 0.1


def vmhostctl_main(argv: Sequence[str] | None = None) -> int:
    args = _ctl_parser().parse_args(argv)
    try:
        return _ctl(args)
    except VmhostError as e:
        print(f"vmhostctl: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _ctl_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", type=Path, default=argparse.SUPPRESS, help="socket path")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog="vmhostctl", parents=[common], description="Control one vmhost-supervised VM."
    )
    parser.add_argument("--version", action="version", version=f"vmhostctl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "list": "show every VM of this host: state, QEMU pid, SSH port, uptime",
        "status": "show the VM's state",
        "info": "show state, SSH port and backend",
        "stop": "stop gracefully (agent, ACPI, then force) and wait until the VM is gone",
        "start": "start vmhost@NAME.service and wait until the guest is ready ([boot] ready)",
        "force-stop": "kill the VM now",
        "logs": "show the VM's journal (vmhost and guest console)",
        "events": "show the VM's state, then each change as it happens, until the VM ends",
        "is-alive": "exit 0 if the vmhost process answers",
    }
    for command in _COMMANDS:
        aliases = ["force_stop"] if command == "force-stop" else []
        p = sub.add_parser(command, parents=[common], help=helps[command], aliases=aliases)
        if command != "list":
            p.add_argument("name", nargs="?", help="VM name (instance of vmhost@NAME)")
        if command == "stop":
            p.add_argument(
                "--timeout", type=int, default=0, help="seconds (default: [stop] timeout_seconds)"
            )
            p.add_argument(
                "--no-block", action="store_true", help="only ask; do not wait until it is gone"
            )
        if command == "logs":
            p.add_argument("-f", "--follow", action="store_true")
            p.add_argument("-n", "--lines", type=int, default=10)
    terminal.add_parser(sub, common)
    from . import migratectl

    migratectl.add_parsers(sub, common)
    return parser


def _ctl(args: argparse.Namespace) -> int:
    from .client import Client
    from .paths import socket_path

    json_out: bool = getattr(args, "json", False)
    sock: Path | None = getattr(args, "socket", None)
    if args.command == "list":
        if sock is not None:
            raise UsageError("list: no --socket; $VMHOST_RUN_DIR moves the sockets")
        return _list(json_out)
    if args.command == "logs" and sock is None:
        from .logs import show_here  # cysystemd only for logs

        return show_here(_name(args), args.lines, args.follow)
    if args.command == "start":
        return _start(_name(args))
    if args.command == "receive":
        from .migratectl import receive

        return receive(_name(args), args.host)
    if sock is None:
        sock = socket_path(_name(args))
        if args.command in ("status", "stop") and (asleep := _asleep(args.name)) is not None:
            return _waiting(args.name, args.command, asleep, json_out)
    client = Client(sock, detail=True)
    label = args.name or str(sock)
    if args.command == "is-alive":
        return 0 if client.is_alive() else 1
    if args.command == "console":
        return terminal.console(sock, label, args)
    if args.command == "migrate":
        from .migratectl import migrate

        return migrate(label, args, client)
    if args.command == "logs":
        shown = 0
        for line in client.logs(args.lines, follow=args.follow):
            print(line, flush=True)
            shown += 1
        if not shown and args.lines > 0:
            print(f"vmhostctl: no journal records (asked {sock})", file=sys.stderr)
        return 0
    if args.command == "events":
        for change in client.watch():
            _show_change(change, json_out)
        return 0
    changes = None
    try:
        if args.command == "stop":
            if not args.no_block:
                changes = client.watch()
                next(changes)  # subscribed before the stop asks: no step is missed
            response = client.stop(args.timeout)
        elif args.command in ("force-stop", "force_stop"):
            response = client.force_stop()
        elif args.command == "info":
            response = client.info()
        else:
            response = client.status()
    except NotListeningError:
        if args.command not in ("status", "stop") or not args.name:
            raise
        return _down(args.name, args.command, json_out)
    _show(label, response, json_out)
    if changes is not None:
        return _wait_gone(client, label, changes, quiet=json_out)
    return EXIT_NOT_RUNNING if args.command == "status" and response.state in _ENDED else 0


def _show(label: str, response: Response, json_out: bool) -> None:
    if json_out:
        sys.stdout.buffer.write(msgspec.json.encode(response) + b"\n")
        return
    print(_state_line(label, response))
    if response.pid:
        print(f"  pid: {response.pid}")
    if response.ssh_port:
        print(f"  ssh: 127.0.0.1:{response.ssh_port}")
    if response.backend:
        print(f"  backend: {response.backend}")
    if response.version:
        print(f"  vmhost: {response.version}")


def _state_line(label: str, response: Response) -> str:
    line = f"{label}: {response.vm_state or response.state}"
    return f"{line} ({response.message})" if response.message else line  # the stop chain's step


def _down(name: str, command: str, json_out: bool) -> int:
    """Nothing listens for NAME: stopped if it is configured here, else unknown."""
    from .control.wire import Response
    from .marks import migrated
    from .paths import state_dir

    if not _known(name):
        return EXIT_UNKNOWN
    where = migrated(state_dir(name))
    down = Response(ok=True, state="stopped", vm_state="migrated" if where else "")
    _show(name, down, json_out)
    return EXIT_NOT_RUNNING if command == "status" else 0


def _asleep(name: str) -> str | None:
    """The VM's state when systemd would start it at our connect (its socket listens, its
    service does not run), as ``vmhostctl list`` tells; ``None`` otherwise."""
    from . import systemctl

    waiting = systemctl.waiting_for_a_connect([name])
    return systemctl.vm_state(waiting[name]) if name in waiting else None


def _waiting(name: str, command: str, state: str, json_out: bool) -> int:
    """Only the socket listens: a connect would boot the VM, so nothing connects.  ``status``
    says what systemd says; ``stop`` has nothing to stop (the socket stays, as it was)."""
    from .control.wire import Response

    _show(name, Response(ok=True, state=state), json_out)
    return EXIT_NOT_RUNNING if command == "status" and state in ("stopped", "failed") else 0


def _known(name: str) -> bool:
    """Whether VM NAME is configured here; says on stderr when it is not."""
    from .paths import config_path

    path = config_path(name)
    if not path.exists():
        print(f"vmhostctl: no VM {name} here: no {path}", file=sys.stderr)
    return path.exists()


def _wait_gone(client: Client, label: str, changes: Iterator[Response], *, quiet: bool) -> int:
    """Each step of the stop chain as the watch tells it, then until nothing listens any
    more: vmhost has exited and, under systemd, the socket went down with it."""
    import time

    ended = False
    with contextlib.suppress(ClientError):  # cut short (vmhost killed from outside): poll on
        for change in changes:
            ended = change.state in _ENDED
            if not quiet:
                print(_state_line(label, change), flush=True)
    while True:
        try:
            response = client.status()
        except NotListeningError:
            break
        except ClientError:  # closed or reset unanswered while vmhost exits: not gone yet
            response = None
        if response is not None:
            if ended and response.state not in _ENDED:
                raise ClientError(f"{label} was started again while stopping")
            ended = response.state in _ENDED
        time.sleep(_STOP_POLL)
    if not quiet and not ended:
        print(f"{label}: stopped")
    return 0


def _start(name: str) -> int:
    """``systemctl start vmhost@NAME.service``, as machinectl starts systemd-nspawn@: the job
    ends at READY=1, once the guest is ready (``[boot] ready``: by default once QEMU runs it);
    the status line then says how long the guest took."""
    import subprocess

    from .client import Client
    from .paths import socket_path

    if not Path("/run/systemd/system").exists():
        print(
            f"vmhostctl start: PID 1 is not systemd here; run `vmhost serve {name}` instead",
            file=sys.stderr,
        )
        return 1
    if not _known(name):
        return EXIT_UNKNOWN
    if subprocess.run(["systemctl", "start", f"vmhost@{name}.service"], check=False).returncode:
        return 1  # systemctl said why
    print(_state_line(name, Client(socket_path(name), detail=True).status()))
    return 0


def _show_change(change: Response, json_out: bool) -> None:
    """One line per change: the wire object, or the time it came, state, event and text."""
    if json_out:
        sys.stdout.buffer.write(msgspec.json.encode(change) + b"\n")
        sys.stdout.buffer.flush()
        return
    import datetime

    now = datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")
    words = [now, change.vm_state or change.state or "-"]
    if change.event:
        words.append(f"[{change.event}]")
    if change.message:
        words.append(change.message)
    print(" ".join(words), flush=True)


def _list(json_out: bool) -> int:
    import asyncio

    from .inventory import survey, table

    rows = asyncio.run(survey())
    if json_out:
        sys.stdout.buffer.write(msgspec.json.encode(rows) + b"\n")
        return 0
    print(table(rows))
    for row in rows:
        if row.error:
            print(f"vmhostctl: {row.name}: {row.error}", file=sys.stderr)
    return 0


def _name(args: argparse.Namespace) -> str:
    if not args.name:
        raise UsageError(f"{args.command}: give a VM NAME or --socket PATH")
    return str(args.name)


def _check_config(name: str, path: Path | None) -> int:
    """Load the config as ``serve`` would, files included (disks, kernel, QEMU), without
    starting anything: the cluster agent's validate-all, an admin's check before a start."""
    from . import config, paths
    from .errors import ConfigError

    try:
        path = path or paths.config_path(name)
        config.load(path)
    except ConfigError as e:
        print(f"vmhost check-config: {e}", file=sys.stderr)
        return os.EX_CONFIG  # as serve exits on the same config
    print(f"{name}: {path}: ok")
    return 0


def _vmhost_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vmhost", description="Supervise one QEMU VM.")
    parser.add_argument("--version", action="version", version=f"vmhost {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="boot and supervise VM NAME, serving its control socket")
    serve.add_argument("name")
    serve.add_argument("--config", type=Path, help="default: /etc/vmhost/NAME.toml")
    serve.add_argument(
        "--socket", type=Path, help="default: activated socket, else /run/vmhost/NAME/vmhost.sock"
    )
    serve.add_argument(
        "--state-dir", type=Path, help="default: $STATE_DIRECTORY, else /var/lib/vmhost/NAME"
    )
    serve.add_argument(
        "--pid-file",
        type=Path,
        help="locked (one vmhost per VM) and written while serving, removed on exit",
    )
    serve.add_argument("-v", "--verbose", action="store_true")
    check = sub.add_parser(
        "check-config", help="check VM NAME's config as serve loads it: exit 0, or 78 and why"
    )
    check.add_argument("name")
    check.add_argument("--config", type=Path, help="default: /etc/vmhost/NAME.toml")
    return parser.parse_args(argv)


def vmhost_main(argv: Sequence[str] | None = None) -> NoReturn:
    from .lean import without_unused

    with without_unused():  # first: argparse imports shutil
        args = _vmhost_args(argv)
        if args.command == "check-config":
            sys.exit(_check_config(args.name, args.config))
        from .service import Options, run

    code = run(Options(**{field: getattr(args, field) for field in Options._fields}))
    # The VM is gone: skip the interpreter's teardown, ~50 ms that only free memory
    # and that a `force_stop` or `systemctl stop` would otherwise wait for.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
