"""One VM's QEMU, supervised: composes the process, QMP, the stop chain, the console and
the agent, and makes every move of the VM's run-state (on QMP events, the process exit and
the stop chain only).  Nothing here blocks the event loop on QEMU."""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

from qemu.qmp import QMPError

from ..config import Config
from ..errors import (
    ControllerError,
    GuestNotReadyError,
    IncomingFailedError,
    VMCrashedError,
)
from . import argv as qemu_argv
from .console import read_console
from .handover import Reloadable
from .migrating import Migrating
from .migration import Migration, listen_uri
from .parts import EXIT_GRACE, StateListener
from .process import ExitCause, QemuProcess, classify
from .provisioning import AgentLink
from .qmp import QmpSession
from .readiness import Readiness
from .state import Change, Changes, RunState, VMState
from .stopchain import StopChain, budget, event_name, granted
from .tasks import Background

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

START_TIMEOUT: Final = 90.0
"""The start budget when none is given: systemd's default TimeoutStartSec."""
PROBE_INTERVAL: Final = 3.0  # the default; each probe costs ~0.2-0.7 ms of CPU
PROBE_TIMEOUT: Final = 2.0


class QemuController(Migrating, Reloadable):
    """Supervises one QEMU for one VM; the server's ``Controller``."""

    backend: Final = "qemu"

    def __init__(
        self,
        config: Config,
        *,
        name: str,
        state_dir: Path,
        on_state: StateListener | None = None,
        on_console: Callable[[bytes], None] | None = None,
        start_timeout: float = START_TIMEOUT,
        on_start_wait: Callable[[float], None] | None = None,
        probe_interval: float = PROBE_INTERVAL,
        incoming: bool = False,
    ) -> None:
        self.config = config
        self.name = name
        self.state_dir = state_dir
        self.on_state = on_state
        self.on_console = on_console
        self.start_timeout = start_timeout
        """How long QEMU may take to greet on QMP (a big preallocated guest takes long)."""
        self.on_start_wait = on_start_wait
        """Told the seconds left while QEMU builds its machine (for EXTEND_TIMEOUT_USEC)."""
        self.probe_interval = probe_interval  # between hang probes; see :meth:`probe_now`
        self.incoming = incoming
        """A live migration's target: the guest comes from the source (:meth:`migrate`)."""
        self.changes = Changes()
        self._run = RunState()
        self._process = QemuProcess(self._exited)
        self._qmp = QmpSession(name, self._on_event)
        self.migration = Migration(self._qmp, config.migration)
        self._stop: StopChain | None = None
        self._ending: ExitCause | None = None
        self._ending_detail = ""
        self._tasks = Background()
        self._spawn = self._tasks.spawn
        self._console: IO[bytes] | None = None
        """The console pipe's read end (QEMU has the write end)."""
        self.console_input = self._process.console_input  # vmhostctl console types into it
        self.readiness = Readiness(config, self._spawn, self._ready, self.stop, budget(config))
        self._agent_socket = qemu_argv.agent_socket(state_dir) if config.agent.port else None
        self._agent = AgentLink(config.agent, self._agent_socket) if self._agent_socket else None
        if self._agent is not None:
            self._agent.on_done = self.readiness.provisioned

    # -- what the server reads ------------------------------------------------

    @property
    def state(self) -> VMState:
        return self._run.state

    @property
    def ssh_port(self) -> int:
        return self.config.network.ssh_port

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def ending(self) -> ExitCause | None:
        return self._ending

    @property
    def stop_timeout(self) -> float:
        """Seconds the running stop was given, after clamping to ``max_timeout_seconds``."""
        return self._stop.timeout if self._stop is not None else 0.0

    def stop_left(self) -> float:
        """Seconds the running stop chain may still take, its last steps included."""
        return self._stop.left() if self._stop is not None and not self._run.ended else 0.0

    @property
    def step(self) -> str:
        """The stop chain's step, else what booting waits for or took: a detail ``message``."""
        if self._run.ended or self._run.state is VMState.STOPPING:
            return self._stop.step if self._stop is not None and not self._run.ended else ""
        return self.readiness.note

    def status_text(self) -> str:
        """One line for ``STATUS=``: what the VM is doing right now."""
        state = self._run.state
        if state is VMState.BOOTING:
            return self.readiness.status_text()
        if state is VMState.STOPPING and self.step:
            assert self._stop is not None
            return self._stop.status_text()
        if self._ending is not None:
            return f"{state.value}: {self._ending.value}{self._ending_detail}"
        return f"{state.value} (QEMU pid {self.pid})" if self.pid else state.value

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Spawn QEMU held before its first instruction, check the slirp guard took effect,
        and let the guest run; returns once QEMU runs the guest."""
        try:
            env = qemu_argv.environment(
                os.environ,
                host_loopback=self.config.network.host_loopback,
                agent_socket=self._agent_socket,
            )
            sock = self._launch(env)
        except Exception as e:
            self._end(ExitCause.START_FAILED, f": {e}")
            if isinstance(e, ControllerError):
                raise
            raise ControllerError(f"cannot run {self.config.qemu.binary}: {e}") from e
        try:
            await self._qmp.connect(sock, budget=self.start_timeout, on_wait=self.on_start_wait)
            self._spawn(self._qmp.read_events())
            self._process.check_guard(self.config, env["LD_PRELOAD"])
            await self.console_input.connect(self._qmp)  # before the guest's first byte
            if self.incoming:
                await self.migration.listen(listen_uri(self.config.migration))
            elif "-S" not in self.config.qemu.extra_args:  # else the config holds it itself
                await self._qmp.execute("cont")
            status = await self._qmp.execute("query-status")
        except (QMPError, OSError, TimeoutError, ControllerError) as e:
            await self._fail_start(e)
            return
        if self.incoming:
            return self._await_guest()
        log.info("QEMU runs (pid %d)", self.pid)
        if self._run.state is VMState.STARTING:
            running = isinstance(status, dict) and status.get("status") != "paused"
            self._qmp.vcpus_stopped = not running
            note = self.readiness.started(self._process.started)
            self._move(self.readiness.live() if running else VMState.PAUSED, f"QEMU runs{note}")
        self._supervise(agent=True)

    def _launch(self, env: dict[str, str]) -> socket.socket:
        if self._agent is not None:
            self._agent.prepare()
        notify = self.readiness.guest_end()
        launch = self._process.launch
        sock, self._console = launch(self.config, self.name, env, notify, incoming=self.incoming)
        self._read_streams()
        return sock

    def _read_streams(self) -> None:
        assert self._console is not None
        self._spawn(self.readiness.listen())
        self._spawn(self._process.read_stderr())
        self._spawn(
            read_console(self._console, self.config.console, self.state_dir, self.on_console)
        )

    async def _fail_start(self, cause: BaseException) -> None:
        """QEMU did not come up: make sure it is gone; a stop asked meanwhile is no failure,
        and QEMU killed from outside is reported as such, not as a start failure."""
        if not self._process.reaped:
            if isinstance(cause, QMPError | OSError):  # QMP closed: QEMU is likely on its way out
                await self._run.end(within=EXIT_GRACE)
            self._process.kill(signal.SIGKILL)
        await self._run.end()
        if self._ending is ExitCause.REQUESTED:
            return
        if self._ending is not ExitCause.START_FAILED:
            await self.wait()
        await self._process.exiting(EXIT_GRACE)  # QEMU's last words, up to its stderr EOF
        detail = "; ".join(self._process.stderr_tail) or str(cause) or repr(cause)
        error = IncomingFailedError if self.incoming else ControllerError  # never restarted
        raise error(f"QEMU failed to start: {detail}") from cause

    async def wait(self) -> None:
        """Until QEMU is gone; raises if it did not end by power-off or request."""
        await self._run.end()
        if self._ending is ExitCause.INCOMING_FAILED:
            raise IncomingFailedError(f"{self._ending.value}{self._ending_detail}")
        if self._ending in (ExitCause.CRASHED, ExitCause.KILLED):
            raise VMCrashedError(f"{self._ending.value}{self._ending_detail}")
        if self._ending is ExitCause.START_FAILED:
            raise ControllerError(f"{self._ending.value}{self._ending_detail}")
        if self._ending is ExitCause.NOT_READY:
            raise GuestNotReadyError(f"{self._ending.value}{self._ending_detail}")

    def stop(self, timeout: float | None = None) -> Awaitable[None]:
        """Graceful stop with ONE deadline; a second call joins the first.

        ``timeout`` None is the config's ``[stop] timeout_seconds``; beyond
        ``[stop] max_timeout_seconds`` it is clamped (:attr:`stop_timeout` says
        what was granted).  The stop starts on the call, not when the result is
        awaited, so a ``status`` right after already says ``stopping``.
        """
        if self._stop is None and self._run.can_move(VMState.STOPPING):
            migrating = self._run.state is VMState.MIGRATING
            self.readiness.stop_waiting()
            self._stop = StopChain(
                granted(self.config.stop, timeout),
                qmp=self._qmp,
                process=self._process,
                agent=self._connected_agent,
                gone=self._run.end,
                announce=self._announce_step,
            )
            self._move(VMState.STOPPING, f"stop requested, {self._stop.timeout:g} s to finish")
            self._spawn(self._stop_after_migration() if migrating else self._stop.run())
        return self._run.end()

    def force_stop(self) -> Awaitable[None]:
        """Kill QEMU now (also in the middle of a graceful stop); awaitable until it is gone."""
        if self._run.can_move(VMState.STOPPING):
            self.readiness.stop_waiting()
            self._move(VMState.STOPPING, "force stop requested")
        self._process.kill(signal.SIGKILL)
        return self._run.end()

    async def close(self) -> None:
        """Release QMP and background tasks once QEMU is gone (or to abandon it)."""
        if not self._run.ended:
            self._process.kill(signal.SIGKILL)
            await self._run.end()
        await self._tasks.cancel()
        await self._disconnect()
        self._process.close()
        self.readiness.close()

    def probe_now(self) -> None:  # the kernel said QEMU stopped or went on: does it answer?
        self._qmp.probe_now.set()

    # -- watching QEMU --------------------------------------------------------

    def _supervise(self, *, agent: bool = False, reconnect_agent: bool = False) -> None:
        self._spawn(self._watch_qmp())
        self._spawn(self._qmp.probe(self.probe_interval, PROBE_TIMEOUT, self._probed))
        if agent and self._agent is not None:
            self._agent.start(reconnect=reconnect_agent)

    def _exited(self, code: int) -> None:
        """The pidfd says QEMU is gone: decide how, once QMP has said its last."""
        self._spawn(self._decide_ending(code))

    async def _decide_ending(self, code: int) -> None:
        """Classify only once QMP's stream is read to its end (its SHUTDOWN may still be
        unread), and always decide: an error here still ends the VM, as a crash."""
        cause, detail = ExitCause.CRASHED, f", exit code {code}"
        try:
            await self._qmp.read_to_end(EXIT_GRACE)
            state, failure = self._run.state, self.readiness.failure
            cause, detail = classify(
                code, state, self._process.signalled, self._qmp.shutdown_event, failure
            )
            if self.migration.left:
                cause, detail = ExitCause.MIGRATED, f" (downtime {self.migration.downtime_ms} ms)"
            elif cause is ExitCause.INCOMING_FAILED and self.migration.failure:
                detail = f": {self.migration.failure}"
        except Exception:
            log.exception("cannot tell how QEMU ended (exit code %d)", code)
        finally:
            self._end(cause, detail)
        self._spawn(self._disconnect())

    def _end(self, cause: ExitCause, detail: str) -> None:
        self._ending, self._ending_detail = cause, detail
        state = cause.state
        if not self._run.can_move(state):  # only a stop's own end: STOPPING -> STOPPED
            state = VMState.STOPPED if self._run.state is VMState.STOPPING else VMState.CRASHED
        self._move(state, f"{cause.value}{detail}")

    def _on_event(self, name: str, data: dict[str, Any]) -> None:
        state = self._run.state
        if name == "SHUTDOWN":
            log.info("QEMU shutdown: %s", data.get("reason"), extra={"QMP_EVENT": name})
        elif name == "STOP" and state in (VMState.RUNNING, VMState.BOOTING):
            self._move(VMState.PAUSED, "paused", name)
        elif name == "RESUME" and state is VMState.PAUSED:
            self._move(self.readiness.live(), "resumed", name)
        elif name == "RESET":
            log.info("guest reset (reboot); the VM keeps running", extra={"QMP_EVENT": name})
            if self.readiness.reset(state):
                self._move(VMState.BOOTING, f"guest reset; {self.readiness.note}", name)
            if self._agent is not None and state is not VMState.STOPPING:
                self._agent.reprovision()
        elif name == "MIGRATION":
            self.migration.event(data)
        elif name == "GUEST_PANICKED":
            log.error("guest kernel panic: %s", data, extra={"QMP_EVENT": name})
        elif name not in ("STOP", "RESUME"):
            log.debug("QMP event %s %s", name, data, extra={"QMP_EVENT": name})

    async def _watch_qmp(self) -> None:
        """QMP lost while QEMU lives leaves only signals to stop it; say so.

        During a stop a QMP close is expected: QEMU closes it on its way out,
        maybe long before it exits (flushing a big disk).  Otherwise QEMU is
        exiting if its stderr closes too (the kernel closes both at once).
        """
        await self._qmp.lost()
        if not await self._process.exiting(EXIT_GRACE) and self._run.can_move(VMState.UNRESPONSIVE):
            log.error("QMP connection to QEMU lost; only signals can stop it now")
            self._move(VMState.UNRESPONSIVE, "QMP connection lost")

    def _probed(self, answered: bool) -> None:
        """A hung QEMU answers nothing, not even an error: the probe times a cheap command."""
        state = self._run.state
        if not answered and state in (VMState.RUNNING, VMState.PAUSED, VMState.BOOTING):
            self._move(VMState.UNRESPONSIVE, f"QMP did not answer in {PROBE_TIMEOUT:g} s")
        elif answered and state is VMState.UNRESPONSIVE:
            live = VMState.PAUSED if self._qmp.vcpus_stopped else self.readiness.live()
            self._move(live, "QMP answers again")

    async def _disconnect(self) -> None:
        if self._agent is not None:
            await self._agent.close()
        await self._qmp.disconnect()

    # -- helpers --------------------------------------------------------------

    def _ready(self, message: str) -> None:
        """A ``guest-ready`` change (systemd's READY=1 is the service's, on ``first_ready``)."""
        if self._run.state is VMState.BOOTING:
            self._move(VMState.RUNNING, message, "guest-ready")
        else:  # paused or unresponsive meanwhile: it comes back as running
            self.changes.publish(Change(self._run.state, message, "guest-ready"))

    def _announce_step(self, step: str, message: str) -> None:
        log.info("%s", message, extra={"VMHOST_STATE": "stopping"})
        self.changes.publish(Change(VMState.STOPPING, message, event_name(step)))
