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
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import msgspec

from . import __version__
from .errors import VmhostError

_COMMANDS = ("list", "status", "info", "stop", "force-stop", "logs", "is-alive")


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
        "stop": "stop gracefully (agent, ACPI, then force)",
        "force-stop": "kill the VM now",
        "logs": "show the VM's journal (vmhost and guest console)",
        "is-alive": "exit 0 if the vmhost process answers",
    }
    for command in _COMMANDS:
        aliases = ["force_stop"] if command == "force-stop" else []
        p = sub.add_parser(command, parents=[common], help=helps[command], aliases=aliases)
        if command != "list":
            p.add_argument("name", nargs="?", help="VM name (instance of vmhost@NAME)")
        if command == "stop":
            p.add_argument("--timeout", type=int, default=0, help="seconds (default 30)")
        if command == "logs":
            p.add_argument("-f", "--follow", action="store_true")
            p.add_argument("-n", "--lines", type=int, default=10)
    return parser


def _ctl(args: argparse.Namespace) -> int:
    from .client import Client, socket_path

    json_out: bool = getattr(args, "json", False)
    sock: Path | None = getattr(args, "socket", None)
    if args.command == "list":
        if sock is not None:
            raise SystemExit("vmhostctl list: no --socket; $VMHOST_RUN_DIR moves the sockets")
        return _list(json_out)
    if args.command == "logs" and sock is None:
        return _local_logs(_name(args), args.lines, args.follow)
    if sock is None:
        sock = socket_path(_name(args))
    client = Client(sock, detail=True)
    if args.command == "is-alive":
        return 0 if client.is_alive() else 1
    if args.command == "logs":
        shown = 0
        for line in client.logs(args.lines, follow=args.follow):
            print(line, flush=True)
            shown += 1
        if not shown and args.lines > 0:
            print(f"vmhostctl: no journal records (asked {sock})", file=sys.stderr)
        return 0
    if args.command == "stop":
        response = client.stop(args.timeout)
    elif args.command in ("force-stop", "force_stop"):
        response = client.force_stop()
    elif args.command == "info":
        response = client.info()
    else:
        response = client.status()
    if json_out:
        sys.stdout.buffer.write(msgspec.json.encode(response) + b"\n")
    else:
        label = args.name or str(sock)
        print(f"{label}: {response.vm_state or response.state}")
        if response.pid:
            print(f"  pid: {response.pid}")
        if response.ssh_port:
            print(f"  ssh: 127.0.0.1:{response.ssh_port}")
        if response.backend:
            print(f"  backend: {response.backend}")
    return 0


def _list(json_out: bool) -> int:
    import asyncio

    from .client import run_dir
    from .config import config_dir
    from .inventory import survey, table

    rows = asyncio.run(survey(config_dir(), run_dir()))
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
        raise SystemExit(f"vmhostctl {args.command}: give a VM NAME or --socket PATH")
    return str(args.name)


def _local_logs(name: str, lines: int, follow: bool) -> int:
    """Read the journal here rather than through the server: works when the VM is down too.

    No record at all and neither a config nor a socket: a VM this host does not
    know (a typo, most likely), which fails rather than print nothing.
    """
    import asyncio

    from .client import socket_path
    from .config import config_dir, path_for
    from .logs import entries

    async def show(limit: int, *, follow: bool = False, echo: bool = True) -> int:
        shown = 0
        async for line in entries(name, lines=limit, follow=follow):
            if echo:
                print(line, flush=True)
            shown += 1
        return shown

    config, sock = path_for(name, config_dir()), socket_path(name)
    if not (config.exists() or sock.exists()) and not asyncio.run(show(1, echo=False)):
        print(
            f"vmhostctl: no VM {name}: no {config}, no {sock} and {_no_records(name)}",
            file=sys.stderr,
        )
        return 1
    if not asyncio.run(show(lines, follow=follow)) and lines > 0:
        print(f"vmhostctl: {_no_records(name)}", file=sys.stderr)
    return 0


def _no_records(name: str) -> str:
    """Says where the records were looked for, and why there may be none."""
    import grp

    from .systemd import FIELD_VM

    dirs = [d for d in ("/var/log/journal", "/run/log/journal") if os.path.isdir(d)]
    where = f"the local journal ({', '.join(dirs) or 'none on this host'})"
    text = f"no journal records with {FIELD_VM}={name} in {where}"
    text += "; vmhost logs there under systemd only (started by hand: to its stderr)"
    groups = set()
    for gid in os.getgroups():
        with contextlib.suppress(KeyError):
            groups.add(grp.getgrgid(gid).gr_name)
    if os.geteuid() != 0 and not groups & {"adm", "systemd-journal"}:
        text += "; outside the adm and systemd-journal groups you see only your own records"
    return text


def vmhost_main(argv: Sequence[str] | None = None) -> NoReturn:
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
    serve.add_argument("--pid-file", type=Path, help="written while serving, removed on exit")
    serve.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)

    from .service import Options, run

    code = run(
        Options(
            name=args.name,
            config=args.config,
            socket=args.socket,
            state_dir=args.state_dir,
            pid_file=args.pid_file,
            verbose=args.verbose,
        )
    )
    # The VM is gone: skip the interpreter's teardown, ~50 ms that only free memory
    # and that a `force_stop` or `systemctl stop` would otherwise wait for.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
