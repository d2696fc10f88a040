"""``vmhost serve NAME``: the service's main, a pipeline that reads top to bottom.

config → socket → controller.start() → READY=1 → serve until the VM ends → exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import logging
import os
import resource
import signal
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Final

from . import config as vmconfig
from . import reload, systemd
from .attach import Consoles
from .client import socket_path
from .controller import QemuController
from .errors import (
    ActivationError,
    AlreadyRunningError,
    ConfigError,
    ControllerError,
    UsageError,
    VMCrashedError,
    VmhostError,
)
from .server import Server, bind
from .vm.state import VMState

log = logging.getLogger(__name__)

EXIT_OK: Final = 0
"""The guest powered off, or a stop was asked for."""
EXIT_FAILURE: Final = 1
"""vmhost itself failed (a bug): systemd restarts it."""
EXIT_VM_CRASHED: Final = 3
"""QEMU crashed or was killed from outside: systemd restarts it."""
EXIT_START_FAILED: Final = 4
"""QEMU could not start (bad image, bad flags)."""
EXIT_ALREADY_RUNNING: Final = 5
"""Another vmhost serves this VM's socket; it is left alone."""
EXIT_ACTIVATION: Final = 6
"""systemd passed descriptors that cannot be the control socket: the socket unit is wrong."""
EXIT_USAGE: Final = 64
"""EX_USAGE: the command line cannot work (a socket path longer than AF_UNIX allows)."""
EXIT_INTERRUPTED: Final = 130
"""Ctrl-C before the stop chain could take it over (nothing ran yet that needs stopping)."""
EXIT_CONFIG: Final = 78
"""EX_CONFIG: the config is broken; restarting will not help (RestartPreventExitStatus)."""

STATE_ROOT: Final = Path("/var/lib/vmhost")
_STOP_MARGIN: Final = 5.0
_SUN_PATH_MAX: Final = 107
"""Bytes of an AF_UNIX path, without the terminating NUL."""
_FD_HEADROOM: Final = 256
"""Descriptors beside the control connections: QMP, console, agent, journal, log streams."""

_EVENTS: Final = {
    VMState.STOPPING: systemd.Event.STOPPING,
    VMState.STOPPED: systemd.Event.STOPPED,
    VMState.CRASHED: systemd.Event.CRASHED,
}


@dataclasses.dataclass(frozen=True)
class Options:
    name: str
    config: Path | None = None
    socket: Path | None = None
    state_dir: Path | None = None
    pid_file: Path | None = None
    verbose: bool = False


def run(options: Options) -> int:
    """Run one VM's service to its end; the return value is the process exit code."""
    systemd.setup_logging(options.name, verbose=options.verbose)
    if not options.verbose:
        # qemu.qmp logs each failure with a traceback; vmhost reports them once, with the cause.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    notifier = systemd.Notifier()
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(_serve(options, notifier))
    except ConfigError as e:
        return _fail(notifier, EXIT_CONFIG, f"bad config: {e}")
    except AlreadyRunningError as e:
        return _fail(notifier, EXIT_ALREADY_RUNNING, str(e))
    except ActivationError as e:
        return _fail(notifier, EXIT_ACTIVATION, f"socket activation: {e}")
    except UsageError as e:
        return _fail(notifier, EXIT_USAGE, str(e))
    except KeyboardInterrupt:
        log.info("interrupted while starting")
        return EXIT_INTERRUPTED
    except VMCrashedError as e:
        return _fail(notifier, EXIT_VM_CRASHED, str(e), logged=True)
    except ControllerError as e:
        return _fail(notifier, EXIT_START_FAILED, str(e))
    except Exception as e:
        log.exception("vmhost failed")
        return _fail(notifier, EXIT_FAILURE, f"vmhost failed: {e!r}")


async def _serve(options: Options, notifier: systemd.Notifier) -> int:
    name = vmconfig.check_name(options.name)
    handover = reload.take()
    listen: socket.socket | None
    if handover is None:
        config = vmconfig.load(options.config or _config_path(name))
        listen = systemd.listen_socket()
        path = None if listen else options.socket or socket_path(name)
    else:
        config = handover.config
        listen = socket.socket(fileno=handover.listen_fd)
        path = Path(handover.socket_path) if handover.socket_path else None
    state_dir = _state_dir(options, name)
    if path is not None and len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise UsageError(f"socket path longer than {_SUN_PATH_MAX} bytes: {path}")
    pid_file = options.pid_file
    if pid_file is None and path is not None:
        pid_file = path.with_name("vmhost.pid")
    if listen is None:
        assert path is not None
        listen = bind(path)  # bound here, not by the Server: a re-exec hands the socket over

    consoles = Consoles(state_dir / "console.log", lambda: controller.console_input)
    journal = systemd.console_logger(name, config.console.journal_lines_per_second)

    def on_console(chunk: bytes) -> None:
        journal(chunk)
        consoles.publish(chunk)

    controller = QemuController(config, name=name, state_dir=state_dir, on_console=on_console)
    controller.on_state = functools.partial(_on_state, controller, notifier)
    stop = _Stopper(controller, notifier, config.stop.timeout_seconds)
    server = Server(
        controller,
        listen,
        pid_file=pid_file,
        logs=functools.partial(_logs, name),
        consoles=consoles,
    )
    reloader = reload.Reloader(
        server=server,
        controller=controller,
        notifier=notifier,
        socket_path=path,
        reexecs=handover.reexecs if handover else [],
    )
    fault = asyncio.Event()
    _raise_fd_limit(server.limits.max_connections)
    try:
        if handover is not None:
            # Clients wait in the backlog, and signals stay held, until QEMU is ours.
            try:
                await controller.adopt(handover.vm)
            except BaseException:
                await controller.close()
                raise
        async with server:
            try:
                _install_signals(stop, reloader, fault)
                if handover is None:
                    systemd.log_event(systemd.Event.STARTED, f"starting VM {name}")
                    await controller.start()
                if controller.state in (VMState.RUNNING, VMState.PAUSED):
                    gc.freeze()  # what start-up built lives forever: keep it out of collections
                    if handover is None:
                        notifier.ready(controller.status_text())
                        systemd.log_event(
                            systemd.Event.READY, f"VM {name} is {controller.state.value}"
                        )
                    else:
                        reloader.reloaded(handover)
                await _supervise(controller, notifier, fault)
            except Exception as e:
                if not isinstance(e, VmhostError):  # a bug: a new vmhost may do better
                    await reloader.recover(e)
                raise
            finally:
                await controller.close()
    finally:
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return EXIT_OK


async def _supervise(
    controller: QemuController, notifier: systemd.Notifier, fault: asyncio.Event
) -> None:
    """Until the VM ends; a failing heartbeat (a bug, or the planted test fault) ends it too."""
    heartbeat = asyncio.create_task(_heartbeat(controller, notifier, fault))
    ended = asyncio.create_task(controller.wait())
    try:
        done, _ = await asyncio.wait((heartbeat, ended), return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        heartbeat.cancel()
        ended.cancel()


class _Stopper:
    """SIGTERM/SIGINT run the graceful stop chain; a second SIGINT forces it."""

    def __init__(
        self, controller: QemuController, notifier: systemd.Notifier, timeout: float
    ) -> None:
        self.controller = controller
        self.notifier = notifier
        self.timeout = timeout
        self.task: asyncio.Task[None] | None = None

    def __call__(self, signum: signal.Signals) -> None:
        log.info("%s received", signum.name)
        if self.task is None:
            self.task = asyncio.ensure_future(self.controller.stop(self.timeout))
            _extend_stop_timeout(self.controller, self.notifier)  # the running chain's, if joined
        elif signum is signal.SIGINT:
            asyncio.ensure_future(self.controller.force_stop())  # noqa: RUF006 - ends the loop


def _install_signals(stop: _Stopper, reloader: reload.Reloader, fault: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop, signum)
    reload.install_signals(reloader, fault.set)


def _on_state(
    controller: QemuController,
    notifier: systemd.Notifier,
    state: VMState,
    message: str,
    qmp_event: str,
) -> None:
    """Every state change: STATUS= for systemctl status, one journal record."""
    text = controller.status_text()
    if state is VMState.STOPPING:
        notifier.stopping(text)  # systemd starts counting TimeoutStopSec= here
        _extend_stop_timeout(controller, notifier)
    else:
        notifier.status(text)
    fields = {"VMHOST_STATE": state.value}
    if qmp_event:
        fields["QMP_EVENT"] = qmp_event
    event = _EVENTS.get(state)
    if event is not None:
        systemd.log_event(event, f"VM {controller.name} {state.value}: {message}", **fields)
    else:
        log.info("VM %s %s: %s", controller.name, state.value, message, extra=fields)


def _extend_stop_timeout(controller: QemuController, notifier: systemd.Notifier) -> None:
    """Ask systemd for what the running stop chain may still take, whoever started it."""
    notifier.extend_timeout(controller.stop_left() + _STOP_MARGIN)


async def _heartbeat(
    controller: QemuController, notifier: systemd.Notifier, fault: asyncio.Event
) -> None:
    """WATCHDOG=1 from the event loop (so a stuck loop is caught), and STATUS= whenever its
    text moves on without a state change (the stop chain's steps and their clocks)."""
    interval = min(systemd.watchdog_interval() or 1.0, 1.0)
    last = ""
    while True:
        await asyncio.sleep(interval)
        if fault.is_set():
            raise reload.PlantedFault(f"planted by ${reload.FAULT_ENV} (SIGUSR2)")
        notifier.watchdog()
        text = controller.status_text()
        if text != last:
            notifier.status(text)
            last = text


def _logs(name: str, lines: int, follow: bool) -> AsyncIterator[str]:
    from .logs import entries  # cysystemd is loaded only when someone asks for logs

    return entries(name, lines=lines, follow=follow)


def _raise_fd_limit(connections: int) -> None:
    """Let the connection cap, not EMFILE, decide who is served.

    systemd gives a service 1024 descriptors (soft) unless the unit says
    otherwise: a flood of idle connections then stops every accept, good
    clients included, instead of evicting the idlest.  Go raises its soft
    limit by itself; we raise it as far as the hard limit allows.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + _FD_HEADROOM
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
    if raised < wanted:
        log.warning("only %d file descriptors (hard limit) for %d connections", raised, connections)


def _config_path(name: str) -> Path:
    return vmconfig.path_for(name, vmconfig.config_dir())


def _state_dir(options: Options, name: str) -> Path:
    directory = options.state_dir
    if directory is None:
        env = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        directory = Path(env) if env else STATE_ROOT / name
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _fail(notifier: systemd.Notifier, code: int, text: str, *, logged: bool = False) -> int:
    notifier.status(text)
    if not logged:
        systemd.log_event(systemd.Event.FAILED, text, VMHOST_EXIT=str(code))
    return code


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
