"""The control server with a controller stand-in: measures the server layer alone.

``python3 -m bench.standin SOCKET [--loop asyncio|uvloop] [--profile OUT] [--changes HZ]``
serves until SIGTERM (under cProfile with ``--profile``, stats dumped to OUT;
with ``--changes``, a change for watchers HZ times a second, the state kept).
The stand-in answers like a running VM and never touches QEMU, so a figure
measured against it is the server's own cost; ``vmhost serve`` itself is
measured by :class:`bench.targets.Service`.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import importlib
import itertools
import signal
from pathlib import Path
from typing import Any

from vmhost.vm.state import Change, Changes, VMState


def _server_module() -> Any:
    """The server of the revision on PYTHONPATH: ``--compare`` runs older ones, from before
    it moved into ``vmhost.control``."""
    try:
        return importlib.import_module("vmhost.control.server")
    except ModuleNotFoundError:
        return importlib.import_module("vmhost.server")


class StandIn:
    """A VM that is always running; stop requests are counted, not obeyed."""

    backend = "qemu"
    ssh_port = 2222
    pid = 4242
    step = ""
    stop_timeout = 0.0
    state = VMState.RUNNING

    def __init__(self) -> None:
        self.stops = 0
        self._ended = asyncio.Event()
        self.changes = Changes()
        self.changes.publish(Change(self.state))

    async def stop(self, timeout: float | None = None) -> None:
        self.stops += 1

    async def force_stop(self) -> None:
        self.stops += 1

    async def wait(self) -> None:
        await self._ended.wait()


async def serve(path: Path, changes_per_second: float = 0.0) -> None:
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    loop.add_signal_handler(signal.SIGINT, done.set)
    stand_in = StandIn()
    async with _server_module().Server(stand_in, path):
        ticker = (
            asyncio.create_task(_tick(stand_in, 1 / changes_per_second))
            if changes_per_second
            else None
        )
        print("serving", flush=True)
        await done.wait()
        if ticker is not None:
            ticker.cancel()


async def _tick(stand_in: StandIn, interval: float) -> None:
    """Changes that keep the state: watchers are told, status answers stay the same."""
    for n in itertools.count():
        await asyncio.sleep(interval)
        stand_in.changes.publish(Change(VMState.RUNNING, f"tick {n}", "TICK"))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python3 -m bench.standin")
    parser.add_argument("socket", type=Path)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--changes", type=float, default=0.0, help="changes per second")
    args = parser.parse_args()
    factory = None
    if args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    profile = cProfile.Profile() if args.profile else None
    with asyncio.Runner(loop_factory=factory) as runner:
        if profile is not None:
            profile.enable()
        runner.run(serve(args.socket, args.changes))
    if profile is not None:
        profile.disable()
        profile.dump_stats(args.profile)


if __name__ == "__main__":
    main()
