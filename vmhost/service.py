"""``vmhost serve NAME``: the service's main, a pipeline that reads top to bottom.

config → socket → controller.start() → READY=1 → serve until the VM ends → exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Final, NamedTuple, Protocol

from . import (
    activation,
    announce,
    journal,
    machined,
    marks,
    notify,
    paths,
    reload,
    stopsignals,
    supervise,
)
from . import config as vmconfig
from .config import Config
from .control.attach import Consoles
from .control.listen import bind
from .control.server import Server
from .errors import (
    ActivationError,
    AlreadyRunningError,
    ConfigError,
    ControllerError,
    GuestNotReadyError,
    IncomingFailedError,
    InternalError,
    UsageError,
    VMCrashedError,
    VmhostError,
)
from .pidfile import PidFile
from .vm.console import console_logger
from .vm.controller import QemuController
from .vm.process import ExitCause

try:
    import uvloop
except ImportError:  # the stdlib loop serves too, slower
    uvloop = None  # type: ignore[assignment]

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
EXIT_REBOOT: Final = 7
"""``machinectl reboot``: the guest is off; systemd starts it again (RestartForceExitStatus=)."""
EXIT_NOT_READY: Final = 8
"""The guest was not ready within ``[boot] ready_timeout_seconds``: stopped, not restarted."""
EXIT_MIGRATED: Final = 9
"""The guest left by live migration: a success, and it does not run here any more."""
EXIT_INCOMING_FAILED: Final = 10
"""A migration's target that never got the guest: not restarted (it would boot a second one)."""
EXIT_USAGE: Final = 64
"""EX_USAGE: the command line cannot work (a socket path longer than AF_UNIX allows)."""
EXIT_INTERRUPTED: Final = 130
"""Ctrl-C before the stop chain could take it over (nothing ran yet that needs stopping)."""
EXIT_CONFIG: Final = 78
"""EX_CONFIG: the config is broken; restarting will not help (RestartPreventExitStatus)."""

_SUN_PATH_MAX: Final = 107
"""Bytes of an AF_UNIX path, without the terminating NUL."""


class Options(NamedTuple):
    name: str
    config: Path | None = None
    socket: Path | None = None
    state_dir: Path | None = None
    pid_file: Path | None = None
    verbose: bool = False


def run(options: Options) -> int:
    """Run one VM's service to its end; the return value is the process exit code."""
    journal.setup_logging(options.name, verbose=options.verbose)
    if not options.verbose:
        # qemu.qmp logs each failure with a traceback; vmhost reports them once, with the cause.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    notifier = notify.Notifier()
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
    except GuestNotReadyError as e:
        return _fail(notifier, EXIT_NOT_READY, str(e))
    except IncomingFailedError as e:
        return _fail(notifier, EXIT_INCOMING_FAILED, str(e))
    except ControllerError as e:
        return _fail(notifier, EXIT_START_FAILED, str(e))
    except Exception as e:
        log.exception("vmhost failed")
        return _fail(notifier, EXIT_FAILURE, f"vmhost failed: {e!r}")


async def _serve(options: Options, notifier: notify.Notifier) -> int:
    """Boot or adopt -> serve until the VM ends -> EXIT_OK (failures raise, ``run`` maps them)."""
    name = vmconfig.check_name(options.name)
    handover = reload.take()
    origin: _Origin = _Adopt(handover) if handover else _Boot(options, name)
    path = origin.socket_path
    if path is not None and len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise UsageError(f"socket path longer than {_SUN_PATH_MAX} bytes: {path}")
    pid_file = _pid_file(options, path, handover)
    try:
        listen = origin.listen or bind(path)  # type: ignore[arg-type]  # one of the two is set
        return await _run(options, name, origin, listen, pid_file, notifier)
    finally:
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if pid_file is not None:
            pid_file.remove()


async def _run(
    options: Options,
    name: str,
    origin: _Origin,
    listen: socket.socket,
    pid_file: PidFile | None,
    notifier: notify.Notifier,
) -> int:
    """Serve until the VM ends; EXIT_OK, or EXIT_REBOOT for ``machinectl reboot``."""
    config = origin.config
    state_dir = _state_dir(options, name)
    consoles = Consoles(state_dir / "console.log", lambda: controller.console_input.fd)
    controller = QemuController(
        config,
        name=name,
        state_dir=state_dir,
        on_console=_tee(
            console_logger(name, config.console.journal_lines_per_second), consoles.publish
        ),
        start_timeout=config.qemu.start_timeout_seconds,
        on_start_wait=lambda left: notifier.extend_timeout(left + stopsignals.EXTEND_MARGIN),
        probe_interval=stopsignals.HANG_PROBE_EVERY,
        incoming=origin.incoming,
    )
    stopping = asyncio.Event()
    controller.on_state = functools.partial(supervise.on_state, controller, notifier, stopping)
    server = Server(controller, listen, logs=functools.partial(_logs, name), consoles=consoles)
    stop = stopsignals.Stopper(controller, notifier)
    reloader = reload.Reloader(
        server=server,
        controller=controller,
        notifier=notifier,
        socket_path=origin.socket_path,
        pid_file=pid_file,
        reexecs=origin.reexecs,
        stop_asked=lambda: stop.asked,
    )
    stop.reboots = config.systemd.register_machine and machined.is_service()
    fault = asyncio.Event()
    reload.hold_signals_in_workers()
    try:
        try:
            await origin.take_over(controller)  # clients wait in the backlog meanwhile
        except Exception as e:
            await _stop_before_exit(controller, e)
            raise
        async with server:
            try:
                stopsignals.install(stop, reloader, fault)
                machine = asyncio.ensure_future(machined.register(name, config))  # beside the start
                await origin.start(controller)
                await machine  # bounded, never raises: machinectl lists the VM once it is ready
                ready = functools.partial(origin.announce, controller, notifier, reloader)
                async with announce.when_ready(controller, notifier, ready):
                    await supervise.supervise(controller, notifier, fault, stopping)
            except Exception as e:
                if isinstance(e, InternalError) or not isinstance(e, VmhostError):
                    await reloader.recover(e)  # a bug: a new vmhost may do better
                await _stop_before_exit(controller, e)
                raise
    finally:
        await controller.close()
    if controller.ending is ExitCause.MIGRATED:
        marks.note_migrated(state_dir, controller.migration.target)
        return EXIT_MIGRATED
    return EXIT_REBOOT if stop.rebooting else EXIT_OK


class _Origin(Protocol):
    """Where the VM comes from: booted here, or handed over by the vmhost before an exec."""

    config: Config
    listen: socket.socket | None
    """The control socket already listening (systemd's, or handed over); else it is bound."""
    socket_path: Path | None
    """The socket's path when vmhost binds it itself (removed at the end)."""
    reexecs: list[float]
    incoming: bool
    """A live migration's target: the guest comes from the source."""

    async def take_over(self, controller: QemuController) -> None: ...

    async def start(self, controller: QemuController) -> None: ...

    def announce(
        self, controller: QemuController, notifier: notify.Notifier, reloader: reload.Reloader
    ) -> None: ...


class _Boot:
    """A fresh start: the config file, systemd's socket or one bound here, QEMU started."""

    def __init__(self, options: Options, name: str) -> None:
        self.name = name
        self.config = vmconfig.load(options.config or paths.config_path(name))
        self.listen = activation.listen_socket()
        self.socket_path = None if self.listen else options.socket or paths.socket_path(name)
        self.reexecs: list[float] = []
        state_dir = _state_dir(options, name)
        self.incoming = marks.take_incoming(state_dir)  # asked by `vmhostctl receive`
        marks.forget_migrated(state_dir)  # started here again

    async def take_over(self, controller: QemuController) -> None:
        """Nothing to take over."""

    async def start(self, controller: QemuController) -> None:
        how = " to receive it by live migration" if self.incoming else ""
        journal.log_event(journal.Event.STARTED, f"starting VM {self.name}{how}")
        await controller.start()

    def announce(
        self, controller: QemuController, notifier: notify.Notifier, reloader: reload.Reloader
    ) -> None:
        notifier.ready(controller.status_text())
        note = f": {controller.step}" if controller.step else ""  # how long the guest took
        journal.log_event(journal.Event.READY, f"VM {self.name} is {controller.state.value}{note}")


class _Adopt:
    """After a reload's exec: the previous vmhost's config, socket and running QEMU."""

    def __init__(self, handover: reload.Handover) -> None:
        self.handover = handover
        self.config = handover.config
        self.listen: socket.socket | None = socket.socket(fileno=handover.listen_fd)
        self.socket_path = Path(handover.socket_path) if handover.socket_path else None
        self.reexecs = handover.reexecs
        self.incoming = False

    async def take_over(self, controller: QemuController) -> None:
        """QEMU becomes ours before anyone is served; signals stay held until then."""
        await controller.adopt(self.handover.vm)

    async def start(self, controller: QemuController) -> None:
        """QEMU runs already."""

    def announce(
        self, controller: QemuController, notifier: notify.Notifier, reloader: reload.Reloader
    ) -> None:
        reloader.reloaded(self.handover)


async def _stop_before_exit(controller: QemuController, error: Exception) -> None:
    """vmhost fails for good (an error it cannot re-exec away, a failed take-over): the
    guest still gets the stop chain, bounded by ``[stop] timeout_seconds``, never a power cut.
    Its own failure is logged; the exit code stays vmhost's."""
    if controller.state.ended or not controller.pid:
        return
    log.error("vmhost fails (%r): stopping VM %s first", error, controller.name)
    try:
        await controller.stop()
    except Exception as e:  # the VM's end (even a crash) is not this exit's cause
        log.warning("VM %s after the stop: %s", controller.name, e)


def _tee(*sinks: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """The console's output to the journal and to the attached consoles alike."""

    def each(chunk: bytes) -> None:
        for sink in sinks:
            sink(chunk)

    return each


def _logs(name: str, lines: int, follow: bool) -> AsyncGenerator[str, None]:
    from .logs import entries  # cysystemd is loaded only when someone asks for logs

    return entries(name, lines=lines, follow=follow)


def _pid_file(
    options: Options, path: Path | None, handover: reload.Handover | None
) -> PidFile | None:
    """Locked before the socket is bound: a second vmhost for this VM exits 5, whatever the
    timing.  By default beside a socket bound by hand; under socket activation systemd
    already runs one service per VM."""
    if handover is not None:
        if handover.pid_file_fd < 0:
            return None
        return PidFile(Path(handover.pid_file), handover.pid_file_fd)
    where = options.pid_file or (paths.pid_file_beside(path) if path is not None else None)
    if where is None:
        return None
    try:
        return PidFile.lock(where)
    except AlreadyRunningError as e:
        if path is None:
            raise
        raise AlreadyRunningError(f"another vmhost is already serving {path} ({e})") from None


def _state_dir(options: Options, name: str) -> Path:
    directory = options.state_dir or paths.state_dir(name)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _fail(notifier: notify.Notifier, code: int, text: str, *, logged: bool = False) -> int:
    notifier.status(text)
    if not logged:
        journal.log_event(journal.Event.FAILED, text, VMHOST_EXIT=str(code))
    return code


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    if uvloop is None:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
