"""One QEMU process: spawn, supervise through QMP and a pidfd, stop without losing data.

State changes come from three sources only: QMP events, the process exit
(a pidfd turning readable, so there is no PID-reuse race and no polling) and
the stop chain.  ``status`` reads the cached state; nothing here blocks the
event loop on QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import fcntl
import logging
import logging.handlers
import os
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final, cast

import msgspec
from qemu.qmp import QMPClient, QMPError, Runstate

from . import qemu
from .config import Config
from .errors import ControllerError, ReloadRefusedError, VMCrashedError
from .vm.state import Change, Changes, VMState

if TYPE_CHECKING:
    from .guest import Agent

log = logging.getLogger(__name__)

StateListener = Callable[[VMState, str, str], None]
"""``(state, message, qmp_event)``: told of every state change, in order."""

QMP_TIMEOUT: Final = 5.0
PROBE_INTERVAL: Final = 3.0  # the probe is most of an idle vmhost's CPU
PROBE_TIMEOUT: Final = 2.0
ACPI_REPEAT: Final = 3.0
_LAST_STEPS: Final = 1.0  # each of quit / SIGTERM after the deadline
_EXIT_GRACE: Final = 1.0
"""A wide guard: how long QEMU's pipes may take to report its exit after QMP did."""
QUIESCE_TIMEOUT: Final = 1.0
"""For QEMU's streams to reach a line boundary before a handover."""
_PR_SET_PDEATHSIG: Final = 1
_CONSOLE_CHUNK: Final = 16384  # < the smallest rotation size: a file never outgrows its cap
_CONSOLE_GATHER: Final = 0.05
"""The console's reading pauses this long after a short read, so QEMU's one-byte writes
gather in the pipe (64 KiB: QEMU only waits beyond ~1.3 MB/s) rather than wake the loop
each: at most 20 wakeups a second however the guest prints."""


class Ending(enum.Enum):
    """Why QEMU ended; decides the final state and the service's exit code."""

    POWEROFF = "guest powered off"
    REQUESTED = "stop requested"
    CRASHED = "QEMU crashed"
    KILLED = "QEMU killed from outside"
    START_FAILED = "QEMU failed to start"


class QemuController:
    """Supervises one QEMU for one VM; the server's :class:`~vmhost.server.Controller`."""

    backend: Final = "qemu"

    def __init__(
        self,
        config: Config,
        *,
        name: str,
        state_dir: Path,
        on_state: StateListener | None = None,
        on_console: Callable[[bytes], None] | None = None,
    ) -> None:
        self.config = config
        self.name = name
        self.state_dir = state_dir
        self.on_state = on_state
        self.on_console = on_console
        self.changes = Changes()
        self._state = VMState.STARTING
        self._before_hang = VMState.RUNNING
        self._proc: subprocess.Popen[bytes] | _Adopted | None = None
        self._pidfd = -1
        self._qmp = QMPClient(name)
        self._agent: Agent | None = None
        self._provisioning: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._exited = asyncio.Event()
        self._ending: Ending | None = None
        self._ending_detail = ""
        self._shutdown_event: dict[str, Any] | None = None
        self._stop_chain: asyncio.Task[None] | None = None
        self._stop_requested = False
        self._step = ""
        self._step_since = 0.0
        self._deadline = 0.0
        self._stop_timeout = 0.0
        self._stderr_tail: deque[str] = deque(maxlen=5)
        self._stderr_closed = asyncio.Event()
        self._signalled = False
        self._vcpus_stopped = False
        self._streams: list[tuple[asyncio.ReadTransport, asyncio.StreamReader]] = []
        """QEMU's streams read through transports (QMP, stderr): paused at a handover."""
        self._qmp_sock: socket.socket | None = None
        self._console: IO[bytes] | None = None
        """The console pipe's read end (QEMU has the write end)."""
        self.console_input = -1
        """The console input pipe's write end (QEMU reads the other); -1 when there is none."""
        self._agent_socket = qemu.agent_socket(state_dir) if config.agent.port else None

    # -- what the server reads ------------------------------------------------

    @property
    def state(self) -> VMState:
        return self._state

    @property
    def ssh_port(self) -> int:
        return self.config.network.ssh_port

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc is not None else 0

    @property
    def ending(self) -> Ending | None:
        return self._ending

    @property
    def stop_timeout(self) -> float:
        """Seconds the running stop was given, after clamping to ``max_timeout_seconds``."""
        return self._stop_timeout

    def stop_left(self) -> float:
        """Seconds the running stop chain may still take, its last steps included."""
        if not self._deadline or self._exited.is_set():
            return 0.0
        return max(self._deadline - time.monotonic(), 0.0) + 2 * _LAST_STEPS

    @property
    def step(self) -> str:
        """The stop chain's step running now ("" outside a stop), for ``status`` with detail."""
        return self._step

    def status_text(self) -> str:
        """One line for ``STATUS=``: what the VM is doing right now."""
        if self._state is VMState.STOPPING and self._step:
            ago = time.monotonic() - self._step_since
            left = max(self._deadline - time.monotonic(), 0.0)
            return f"stopping: {self._step} {ago:.0f} s ago, {left:.0f} s left"
        if self._ending is not None:
            return f"{self._state.value}: {self._ending.value}{self._ending_detail}"
        return f"{self._state.value} (QEMU pid {self.pid})" if self.pid else self._state.value

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Spawn QEMU and connect QMP; returns once QEMU runs the guest."""
        qmp_parent, qmp_child = socket.socketpair()
        console_read, console_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._console = os.fdopen(console_read, "rb", buffering=0)
        input_read, self.console_input = _input_pipe()
        try:
            argv = qemu.argv(
                self.config,
                name=self.name,
                qmp_fd=qmp_child.fileno(),
                console_fd=console_write,
                console_input_fd=input_read,
                kvm=qemu.accel_is_kvm(self.config),
            )
            log.info("starting QEMU: %s", " ".join(argv), extra={"VMHOST_STATE": "starting"})
            if self._agent_socket is not None:
                self._agent_socket.unlink(missing_ok=True)  # a previous run's: QEMU binds it anew
                log.warning(
                    "agent.port %d is not used: the agent is reached through %s, which only "
                    "vmhost may open (no TCP forward that other users or guests could reach)",
                    self.config.agent.port,
                    self._agent_socket,
                )
            # Popen, not asyncio's: we watch the child through a pidfd, and fork+exec is quick.
            self._proc = subprocess.Popen(  # noqa: ASYNC220
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(qmp_child.fileno(), console_write, input_read),
                env=qemu.environment(
                    os.environ,
                    host_loopback=self.config.network.host_loopback,
                    agent_socket=self._agent_socket,
                ),
                preexec_fn=_die_with_parent,
                # Its own process group: Ctrl-C on a foreground `vmhost serve` must reach
                # vmhost only (QEMU quits on SIGINT without asking the guest: a dirty disk).
                process_group=0,
            )
        except OSError as e:
            qmp_parent.close()
            self._console.close()
            self._close_input()
            self._end(Ending.START_FAILED, f": {e}")
            raise ControllerError(f"cannot run {self.config.qemu.binary}: {e}") from e
        finally:
            qmp_child.close()
            os.close(console_write)
            os.close(input_read)
        self._watch_exit()
        assert self._proc.stderr is not None
        self._spawn(self._read_stderr(self._proc.stderr.fileno()))
        self._spawn(self._read_console(self._console))
        try:
            status = await self._connect_qmp(qmp_parent)
        except (QMPError, OSError, TimeoutError) as e:
            await self._fail_start(e)
            return
        await self._console_takes_input(console_write, input_read)
        log.info("QEMU runs (pid %d): %s", self.pid, argv[argv.index("-machine") + 1])
        if self._state is VMState.STARTING:
            running = isinstance(status, dict) and status.get("status") != "paused"
            self._vcpus_stopped = not running
            self._set_state(VMState.RUNNING if running else VMState.PAUSED, "QEMU runs")
        self._spawn(self._watch_qmp())
        self._spawn(self._probe())
        if self.config.agent.port:
            self._provisioning = self._spawn(self._provision())

    async def _connect_qmp(self, sock: socket.socket) -> object:
        """Connect QMP and start reading its events; returns ``query-status``."""
        self._qmp_sock = sock
        async with asyncio.timeout(QMP_TIMEOUT):
            await self._qmp.connect(sock)
            # qemu.qmp has no public handle on its stream; a handover pauses it.
            assert self._qmp._writer is not None and self._qmp._reader is not None
            self._streams.append((_read_side(self._qmp._writer), self._qmp._reader))
            self._spawn(self._read_events())
            return await self._qmp.execute("query-status")

    async def _console_takes_input(self, console_fd: int, input_fd: int) -> None:
        """Give the serial console its input pipe (QEMU's numbers for both); without it the
        console is still read, only nobody can type to it."""
        try:
            async with asyncio.timeout(QMP_TIMEOUT):
                await self._qmp.execute(
                    "chardev-change", qemu.console_with_input(console_fd, input_fd)
                )
        except (QMPError, OSError, TimeoutError) as e:
            log.warning("the serial console takes no input: %s", e)
            self._close_input()

    async def _fail_start(self, cause: BaseException) -> None:
        """QEMU did not come up: make sure it is gone; a stop asked meanwhile is no failure,
        and QEMU killed from outside is reported as such, not as a start failure."""
        if not self._exited.is_set():
            if not isinstance(cause, TimeoutError):  # QMP closed: QEMU is likely on its way out
                await self._wait_exit(_EXIT_GRACE)
            self._kill(signal.SIGKILL)
            await self._exited.wait()
        if self._stop_requested:
            return
        if self._ending is not Ending.START_FAILED:
            await self.wait()
        with contextlib.suppress(TimeoutError):  # QEMU's last words, up to its stderr EOF
            async with asyncio.timeout(_EXIT_GRACE):
                await self._stderr_closed.wait()
        detail = "; ".join(self._stderr_tail) or repr(cause)
        raise ControllerError(f"QEMU failed to start: {detail}") from cause

    async def wait(self) -> None:
        """Until QEMU is gone; raises if it did not end by power-off or request."""
        await self._exited.wait()
        if self._ending in (Ending.CRASHED, Ending.KILLED):
            raise VMCrashedError(f"{self._ending.value}{self._ending_detail}")
        if self._ending is Ending.START_FAILED:
            raise ControllerError(f"{self._ending.value}{self._ending_detail}")

    def stop(self, timeout: float | None = None) -> Awaitable[None]:
        """Graceful stop with ONE deadline; a second call joins the first.

        The stop starts on the call, not when the result is awaited, so a
        ``status`` right after the ``stop`` answer already says ``stopping``.
        ``None`` is ``[stop] timeout_seconds``; beyond ``[stop] max_timeout_seconds`` it is clamped
        (:attr:`stop_timeout` says what was granted).  The result is awaited
        until QEMU is gone.
        """
        if not self._exited.is_set() and self._stop_chain is None:
            if timeout is None:
                timeout = self.config.stop.timeout_seconds
            limit = self.config.stop.max_timeout_seconds
            if timeout > limit:
                log.warning("stop timeout %g s clamped to max_timeout_seconds %d", timeout, limit)
                timeout = limit
            self._stop_requested = True
            self._stop_timeout = timeout
            self._deadline = time.monotonic() + timeout
            self._set_state(VMState.STOPPING, f"stop requested, {timeout:g} s to finish")
            self._stop_chain = self._spawn(self._run_stop_chain())
        return self._gone()

    def force_stop(self) -> Awaitable[None]:
        """Kill QEMU now (also in the middle of a graceful stop); awaitable until it is gone."""
        if not self._exited.is_set():
            self._stop_requested = True
            if self._state is not VMState.STOPPING:
                self._set_state(VMState.STOPPING, "force stop requested")
            self._kill(signal.SIGKILL)
        return self._gone()

    async def _gone(self) -> None:
        await self._exited.wait()

    async def close(self) -> None:
        """Release QMP and background tasks once QEMU is gone (or to abandon it)."""
        if not self._exited.is_set():
            self._kill(signal.SIGKILL)
            await self._exited.wait()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._disconnect()
        if self._proc is not None and self._proc.stderr is not None:
            self._proc.stderr.close()
        self._close_input()

    def _close_input(self) -> None:
        if self.console_input >= 0:
            os.close(self.console_input)
            self.console_input = -1

    # -- reload: handing QEMU over to a re-executed vmhost ---------------------

    def handover_refusal(self) -> str:
        """Why QEMU cannot be handed over right now; empty when it can."""
        if self._exited.is_set():
            return "QEMU is gone"
        if self._stop_requested:
            return "a stop is running (it goes on)"
        if self._state not in (VMState.RUNNING, VMState.PAUSED):
            return f"the VM is {self._state.value}"
        return ""

    async def handover(self) -> Handover:
        """Pause QEMU's streams at a line boundary and describe what a new vmhost takes over.

        What was read is consumed here first (QMP events included); the rest
        stays in the kernel for the next reader.  The caller execs next without
        yielding to the loop, or calls :meth:`resume` if it cannot.
        """
        if refusal := self.handover_refusal():
            raise ReloadRefusedError(refusal)
        try:
            async with asyncio.timeout(QUIESCE_TIMEOUT):
                for transport, reader in self._streams:
                    if not transport.is_closing():
                        await _quiesce(transport, reader)
                while not self._qmp.events.empty():  # noqa: ASYNC110 - a queue has no such event
                    await asyncio.sleep(0)  # _read_events takes what the reader queued
        except TimeoutError:
            self.resume()
            raise ReloadRefusedError("QEMU's output did not pause at a line boundary") from None
        if refusal := self.handover_refusal():  # a stop may have come in meanwhile
            self.resume()
            raise ReloadRefusedError(refusal)
        assert self._proc is not None and self._proc.stderr is not None
        assert self._qmp_sock is not None and self._console is not None
        return Handover(
            pid=self._proc.pid,
            qmp_fd=self._qmp_sock.fileno(),
            console_fd=self._console.fileno(),
            stderr_fd=self._proc.stderr.fileno(),
            state=self._state,
            before_hang=self._before_hang,
            shutdown_event=self._shutdown_event,
            stderr_tail=list(self._stderr_tail),
            agent=self._agent is not None,
            console_input_fd=self.console_input,
        )

    def resume(self) -> None:
        """Read QEMU's streams again: the handover did not happen."""
        for transport, _ in self._streams:
            if not transport.is_closing():
                transport.resume_reading()

    async def adopt(self, handed: Handover) -> None:
        """Take over the QEMU a previous vmhost of this PID handed over (instead of :meth:`start`).

        The state is the handed-over one from the first moment, so clients
        queued meanwhile never see ``starting``; QMP is attached to the
        established session (no greeting, no negotiation) and asked
        ``query-status`` to prove QEMU answers.
        """
        self._state, self._before_hang = handed.state, handed.before_hang
        self.changes.publish(Change(handed.state, "taken over by the reloaded vmhost"))
        self._shutdown_event = handed.shutdown_event
        self._stderr_tail.extend(handed.stderr_tail)
        self._proc = _Adopted(handed.pid, os.fdopen(handed.stderr_fd, "rb", buffering=0))
        self._watch_exit()
        self._spawn(self._read_stderr(handed.stderr_fd))
        self._console = os.fdopen(handed.console_fd, "rb", buffering=0)
        self.console_input = handed.console_input_fd
        self._spawn(self._read_console(self._console))
        self._qmp.await_greeting = self._qmp.negotiate = False
        try:
            status = await self._connect_qmp(socket.socket(fileno=handed.qmp_fd))
        except (QMPError, OSError, TimeoutError) as e:
            if not self._exited.is_set():  # else wait() tells how it ended
                raise ControllerError(f"cannot take over QEMU (pid {handed.pid}): {e!r}") from e
            return
        paused = isinstance(status, dict) and status.get("status") == "paused"
        if paused != (self._state is VMState.PAUSED) and self._state is not VMState.UNRESPONSIVE:
            self._set_state(VMState.PAUSED if paused else VMState.RUNNING, "QMP query-status")
        self._spawn(self._watch_qmp())
        self._spawn(self._probe())
        if self.config.agent.port:
            self._spawn(self._reconnect_agent() if handed.agent else self._provision())

    async def _reconnect_agent(self) -> None:
        """The guest was provisioned before the reload: connect again, provision nothing."""
        from .guest import Agent

        deadline = asyncio.get_running_loop().time() + QMP_TIMEOUT
        try:
            self._agent = await Agent.connect(str(self._agent_socket), deadline=deadline)
        except ControllerError as e:
            log.warning("guest agent unavailable after the reload, stop will use ACPI: %s", e)

    # -- the stop chain -------------------------------------------------------

    async def _run_stop_chain(self) -> None:
        qmp = self._qmp.runstate is Runstate.RUNNING
        quit_step = "QMP quit"
        if qmp and self._vcpus_stopped and await self._paused_on_io_error():
            quit_step += " (paused on a disk I/O error: the guest cannot shut down)"
        else:
            if self._agent is not None:
                await self._step_until("guest agent shutdown", self._agent_shutdown, share=0.5)
            if qmp:
                await self._step_until("ACPI power-down", self._powerdown)
        if qmp:
            await self._step_until(quit_step, self._qmp_command("quit"), extra=_LAST_STEPS)
        await self._step_until("SIGTERM", self._signal(signal.SIGTERM), extra=_LAST_STEPS)
        await self._step_until("SIGKILL", self._signal(signal.SIGKILL), extra=60.0)

    async def _step_until(
        self,
        step: str,
        action: Callable[[], Coroutine[Any, Any, None]],
        *,
        share: float = 1.0,
        extra: float = 0.0,
    ) -> None:
        """Run one step, then give QEMU until its slice of the deadline to be gone."""
        if self._exited.is_set():
            return
        now = time.monotonic()
        left = max(self._deadline - now, 0.0)
        budget = left * share + extra
        self._step, self._step_since = step, now
        message = f"stop: {step} ({budget:.1f} s for it)"
        log.info("%s", message, extra={"VMHOST_STATE": "stopping"})
        self.changes.publish(Change(VMState.STOPPING, message, _event_name(step)))
        try:
            async with asyncio.timeout(budget):
                await action()
                await self._exited.wait()
        except TimeoutError:
            pass
        except (QMPError, OSError, ControllerError) as e:
            log.warning("stop: %s failed, next step: %s", step, e)

    async def _paused_on_io_error(self) -> bool:
        """Stopped vCPUs see neither agent nor power button: resume a paused VM first,
        unless a disk error paused it (a full host disk): it would only pause again."""
        try:
            async with asyncio.timeout(QMP_TIMEOUT):
                status = await self._qmp.execute("query-status")
                assert isinstance(status, dict)
                if status.get("running", True):
                    return False
                if status.get("status") == "io-error":
                    log.warning("stop: the VM is paused on a disk I/O error; telling QEMU to quit")
                    return True
                log.info("stop: resuming the VM (%s) so the guest can shut down", status["status"])
                await self._qmp.execute("cont")
        except (QMPError, OSError, TimeoutError) as e:
            log.warning("stop: cannot resume the paused VM: %s", e)
        return False

    async def _agent_shutdown(self) -> None:
        assert self._agent is not None
        await self._agent.shutdown("vmhost stop")

    async def _powerdown(self) -> None:
        """Press the power button again now and then: a guest still booting misses the first."""
        while not self._exited.is_set():
            async with asyncio.timeout(QMP_TIMEOUT):
                await self._qmp.execute("system_powerdown")
            await self._wait_exit(ACPI_REPEAT)

    async def _wait_exit(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._exited.wait()

    def _qmp_command(self, command: str) -> Callable[[], Coroutine[Any, Any, None]]:
        async def run() -> None:
            async with asyncio.timeout(QMP_TIMEOUT):
                await self._qmp.execute(command)

        return run

    def _signal(self, sig: signal.Signals) -> Callable[[], Coroutine[Any, Any, None]]:
        async def run() -> None:
            self._kill(sig)

        return run

    def _kill(self, sig: signal.Signals) -> None:
        if self._pidfd >= 0 and not self._exited.is_set():
            self._signalled = True
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)

    # -- watching QEMU --------------------------------------------------------

    def _watch_exit(self) -> None:
        assert self._proc is not None
        self._pidfd = os.pidfd_open(self._proc.pid)
        asyncio.get_running_loop().add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        assert self._proc is not None
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        code = self._proc.wait()
        ending, detail = self._classify(code)
        self._end(ending, detail)
        if self._qmp.runstate is not Runstate.CONNECTING:  # a connect in progress fails alone
            self._spawn(self._disconnect())

    def _classify(self, code: int) -> tuple[Ending, str]:
        shutdown = self._shutdown_event or {}
        how = f" by {signal.Signals(-code).name}" if code < 0 else f", exit status {code}"
        if self._state is VMState.STARTING and (code >= 0 or self._signalled):
            return Ending.START_FAILED, how
        if self._stop_requested:
            return Ending.REQUESTED, how if code else ""
        if code == 0 and shutdown.get("guest"):
            return Ending.POWEROFF, ""
        if code < 0 or shutdown.get("reason") in ("host-signal", "host-qmp-quit"):
            return Ending.KILLED, how
        return Ending.CRASHED, how

    def _end(self, ending: Ending, detail: str) -> None:
        self._ending, self._ending_detail = ending, detail
        state = {
            Ending.POWEROFF: VMState.STOPPED,
            Ending.REQUESTED: VMState.STOPPED,
            Ending.CRASHED: VMState.CRASHED,
            Ending.KILLED: VMState.CRASHED,
            Ending.START_FAILED: VMState.ERROR,
        }[self._ending]
        self._exited.set()
        self._set_state(state, f"{self._ending.value}{self._ending_detail}")

    async def _read_events(self) -> None:
        async for event in self._qmp.events:
            name = str(event["event"])
            data: dict[str, Any] = dict(event.get("data") or {})  # type: ignore[call-overload]
            if name == "SHUTDOWN":
                self._shutdown_event = data
                log.info("QEMU shutdown: %s", data.get("reason"), extra={"QMP_EVENT": name})
            elif name in ("STOP", "RESUME"):
                self._vcpus_stopped = name == "STOP"
                if name == "STOP" and self._state is VMState.RUNNING:
                    self._set_state(VMState.PAUSED, "paused", name)
                elif name == "RESUME" and self._state is VMState.PAUSED:
                    self._set_state(VMState.RUNNING, "resumed", name)
            elif name == "RESET":
                log.info("guest reset (reboot); the VM keeps running", extra={"QMP_EVENT": name})
                if self.config.agent.port and not self._stop_requested:
                    self._reprovision()
            elif name == "GUEST_PANICKED":
                log.error("guest kernel panic: %s", data, extra={"QMP_EVENT": name})
            else:
                log.debug("QMP event %s %s", name, data, extra={"QMP_EVENT": name})

    async def _watch_qmp(self) -> None:
        """QMP lost while QEMU lives leaves only signals to stop it; say so.

        During a stop a QMP close is expected: QEMU closes it on its way out,
        maybe long before it exits (flushing a big disk).  Otherwise QEMU is
        exiting if its stderr closes too (the kernel closes both at once).
        """
        while await self._qmp.runstate_changed() is not Runstate.DISCONNECTING:
            pass
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_EXIT_GRACE):
                await self._stderr_closed.wait()
        if (
            not self._exited.is_set()
            and not self._stderr_closed.is_set()
            and not self._stop_requested
        ):
            log.error("QMP connection to QEMU lost; only signals can stop it now")
            self._set_state(VMState.UNRESPONSIVE, "QMP connection lost")

    async def _probe(self) -> None:
        """A hung QEMU answers nothing, not even an error: time a cheap command."""
        while not self._exited.is_set() and self._qmp.runstate is Runstate.RUNNING:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                async with asyncio.timeout(PROBE_TIMEOUT):
                    await self._qmp.execute("query-status")
            except TimeoutError:
                if self._state in (VMState.RUNNING, VMState.PAUSED):
                    self._before_hang = self._state
                    self._set_state(
                        VMState.UNRESPONSIVE, f"QMP did not answer in {PROBE_TIMEOUT:g} s"
                    )
                continue
            except QMPError:
                return
            if self._state is VMState.UNRESPONSIVE:
                self._set_state(self._before_hang, "QMP answers again")

    async def _read_stderr(self, fd: int) -> None:
        transport, reader = await _reader_for(fd)
        self._streams.append((transport, reader))
        while line := await reader.readline():
            text = line.decode(errors="replace").rstrip()
            self._stderr_tail.append(text)
            log.warning("qemu: %s", text)
        self._stderr_closed.set()

    async def _read_console(self, pipe: IO[bytes]) -> None:
        """Serial output goes to console.log as is (rotated by size: the guest decides how
        much it prints, so the host caps what it keeps), and to ``on_console``.

        Read straight from the pipe, not through a transport, which would read
        each byte as it comes: what is read is handled before the next await, so
        a handover needs no quiescing here and the rest stays in the pipe.
        """
        console = self.config.console
        # The stdlib's size rotation; latin-1 is one char per byte both ways, so the guest's
        # bytes land unchanged and the handler's lengths are byte counts.
        out = logging.handlers.RotatingFileHandler(
            self.state_dir / "console.log",
            maxBytes=console.file_kib * 1024,
            backupCount=console.files - 1,
            encoding="latin-1",
        )
        out.terminator = ""
        with contextlib.closing(pipe), contextlib.closing(out):  # also when cancelled
            while True:
                await _readable(pipe.fileno())
                chunk = pipe.read(_CONSOLE_CHUNK)
                if chunk is None:  # woken for nothing
                    continue
                if not chunk:
                    return
                out.emit(_console_record(chunk.decode("latin-1")))
                if self.on_console is not None:
                    self.on_console(chunk)
                if len(chunk) < _CONSOLE_CHUNK:
                    await asyncio.sleep(_CONSOLE_GATHER)  # the next bytes gather in the pipe

    def _reprovision(self) -> None:
        """A rebooted guest forgot its keys, secrets and mounts, and its agent connection."""
        if self._provisioning is not None:
            self._provisioning.cancel()
        if self._agent is not None:
            self._agent.close()
            self._agent = None
        self._provisioning = self._spawn(self._provision())

    async def _provision(self) -> None:
        """Connect the guest agent and provision the guest; failure only means no agent."""
        from .guest import provision  # most VMs have no agent: keep it off the start path

        try:
            self._agent = await provision(self.config.agent, address=str(self._agent_socket))
        except ControllerError as e:
            log.warning("guest agent unavailable, stop will use ACPI: %s", e)
            return
        log.info("guest agent connected and provisioned")

    async def _disconnect(self) -> None:
        if self._agent is not None:
            self._agent.close()
        if self._qmp.runstate is not Runstate.IDLE:  # a failed connect is already idle
            with contextlib.suppress(QMPError, OSError, EOFError):
                await self._qmp.disconnect()

    # -- helpers --------------------------------------------------------------

    def _set_state(self, state: VMState, message: str, qmp_event: str = "") -> None:
        self._state = state
        if state is not VMState.STOPPING:
            self._step = ""
        if self.on_state is not None:
            self.on_state(state, message, qmp_event)
        self.changes.publish(Change(state, message, qmp_event))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("internal task failed: %r", exc, exc_info=exc)


def _console_record(text: str) -> logging.LogRecord:
    return logging.LogRecord("console", logging.INFO, "", 0, text, None, None)


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():  # a loop may call it again before the waiter runs
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def _reader_for(fd: int) -> tuple[asyncio.ReadTransport, asyncio.StreamReader]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    pipe = os.fdopen(fd, "rb", buffering=0, closefd=False)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    return transport, reader


class Handover(msgspec.Struct, frozen=True, kw_only=True):
    """A running QEMU as one vmhost hands it to the next (the descriptors are inherited)."""

    pid: int
    qmp_fd: int
    console_fd: int
    stderr_fd: int
    state: VMState
    before_hang: VMState = VMState.RUNNING
    shutdown_event: dict[str, Any] | None = None
    stderr_tail: list[str] = []
    agent: bool = False
    """The guest agent was provisioned: the next vmhost reconnects without provisioning again."""
    console_input_fd: int = -1
    """The console input pipe's write end; -1 when there is none (an older vmhost's QEMU)."""

    @property
    def fds(self) -> tuple[int, ...]:
        extra = (self.console_input_fd,) if self.console_input_fd >= 0 else ()
        return (self.qmp_fd, self.console_fd, self.stderr_fd, *extra)


class _Adopted:
    """A QEMU inherited across a re-exec: still our child, but not a Popen of this process."""

    def __init__(self, pid: int, stderr: IO[bytes]) -> None:
        self.pid = pid
        self.stderr: IO[bytes] | None = stderr

    def wait(self) -> int:
        return os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])


def _input_pipe() -> tuple[int, int]:
    """The console's input pipe, one page (a guest that reads no input holds 4 KiB of it,
    not 64 KiB of stale keys); vmhost writes without blocking, QEMU reads as it can."""
    read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 4096)
    return read, write


def _read_side(writer: asyncio.StreamWriter) -> asyncio.ReadTransport:
    """A socket stream's transport reads too; it is typed as the writer's only."""
    return cast(asyncio.ReadTransport, writer.transport)


async def _quiesce(transport: asyncio.ReadTransport, reader: asyncio.StreamReader) -> None:
    """Stop reading from the kernel once what was read ends on a line boundary and is consumed.

    A half-read line is read to its end first: QMP messages must not be cut
    between two vmhosts.  asyncio shows no public view of a reader's buffer.
    """
    buffer: bytearray = reader._buffer  # type: ignore[attr-defined]
    transport.pause_reading()
    while buffer:
        if b"\n" in buffer:
            await asyncio.sleep(0)  # the reader's task takes its lines
        else:
            transport.resume_reading()
            await asyncio.sleep(0.001)
            transport.pause_reading()


def _event_name(step: str) -> str:
    """A stop step as a watcher's ``event``: its name without the note, one word
    (``QMP quit (paused on a disk I/O error: ...)`` is ``qmp-quit``)."""
    return step.partition(" (")[0].lower().replace(" ", "-")


def _die_with_parent() -> None:
    """In the child: if vmhost dies, QEMU gets SIGTERM (a clean exit), not an orphan's life."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
