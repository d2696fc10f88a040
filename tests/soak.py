"""The fault soak (issue 29): N VMs under a real systemd, random operations and faults drawn from
a seeded generator, every invariant checked after every step.

The model is what each VM must be once the step has settled (up, down, or asleep: only its
socket listening), how many restarts systemd must have made, and what the step must leave in
the journal.  What the generator may draw depends only on the model, never on timing, so one
seed replays one sequence.  The first violation raises :class:`Violation` with the seed, the
step, and the journal and console of the VM involved.
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from container import Container, ContainerError
from soak_checks import ENDS, Checks, Outcome, Violation
from systemd_vm import VM, wait_for

from vmhost.journal import Event

PROBE: Final = Path(__file__).with_name("soak_probe.py")
STARTS_WINDOW: Final = 15
"""At most 5 starts of one VM per 15 steps: well below StartLimitBurst=10 in 60 s."""
POLLERS: Final = 4
PROBE_RUN: Final = ("/usr/bin/python3", "/run/soak/probe.py")


@dataclass
class Model:
    """What one VM must be once a step has settled."""

    state: str = "down"
    restarts: int = 0
    starts: list[int] = field(default_factory=list)


@dataclass
class Figures:
    ops: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    checks: Counter[str] = field(default_factory=Counter)
    steps: int = 0

    def report(self, violations: int = 0) -> str:
        return (
            f"steps {self.steps}; "
            f"operations {sum(self.ops.values())} {dict(sorted(self.ops.items()))}; "
            f"faults {sum(self.faults.values())} {dict(sorted(self.faults.items()))}; "
            f"checks {sum(self.checks.values())} {dict(sorted(self.checks.items()))}; "
            f"violations {violations}"
        )


FAULTS: Final = frozenset(
    {"qemu-kill", "qemu-rt", "reload-then-kill", "qemu-stop-cont", "vmhost-kill",
     "guest-poweroff", "guest-reboot", "guest-console-poweroff", "guest-console-reboot"}
)  # fmt: skip
_STARTING: Final = frozenset(
    {"ctl-start", "sys-start", "sys-restart", "wake", "guest-reboot", "qemu-kill", "qemu-rt",
     "vmhost-kill", "stop-then-restart", "reload-then-kill"}
)  # fmt: skip
_WHEN: Final[dict[str, frozenset[str]]] = {
    "ctl-stop": frozenset({"up", "down", "asleep"}),
    "ctl-start": frozenset({"up", "down", "asleep"}),
    "ctl-force-stop": frozenset({"up"}),
    "sys-start": frozenset({"up", "down", "asleep"}),
    "sys-stop": frozenset({"up", "down", "asleep"}),
    "sys-restart": frozenset({"up", "down", "asleep"}),
    "sys-reload": frozenset({"up"}),
    "sys-start-socket": frozenset({"up", "down", "asleep"}),
    "wake": frozenset({"asleep"}),
    "guest-poweroff": frozenset({"up"}),
    "guest-reboot": frozenset({"down"}),
    "qemu-kill": frozenset({"up"}),
    "qemu-rt": frozenset({"up"}),
    "qemu-stop-cont": frozenset({"up"}),
    "vmhost-kill": frozenset({"up"}),
    "stop-then-restart": frozenset({"up"}),
    "reload-then-kill": frozenset({"up"}),
    "clients": frozenset({"up"}),
    "status-burst": frozenset({"up", "down", "asleep"}),
}
CONSOLE_OPS: Final[dict[str, frozenset[str]]] = {
    "console-clients": frozenset({"up"}),
    "guest-console-poweroff": frozenset({"up"}),
    "guest-console-reboot": frozenset({"up"}),
}
"""Drawn only where ``vmhostctl console`` exists (its branch also gives the guest a shell on
its serial console)."""
_KEEPS: Final = frozenset(
    {"sys-restart", "sys-reload", "qemu-kill", "qemu-rt", "qemu-stop-cont", "vmhost-kill"}
)
_GRACEFUL: Final = (Event.STOPPING.message_id, Event.STOPPED.message_id)
_STARTED: Final = (Event.STARTED.message_id, Event.READY.message_id)


class Soak:
    """Drives the VMs of one container; ``run`` until a deadline or the first violation."""

    def __init__(self, ct: Container, venv: Path, vms: list[VM], seed: int) -> None:
        self.ct, self.venv, self.vms, self.seed = ct, venv, vms, seed
        self.rng = random.Random(seed)
        self.model = {vm.name: Model() for vm in vms}
        self.figures = Figures()
        self.checks = Checks(ct, venv, vms, self.figures.checks)
        self.watchers: dict[str, tuple[Any, str]] = {}
        console = ct.run(str(venv / "bin/vmhostctl"), "console", "--help", check=False)
        self.ops = _WHEN | (CONSOLE_OPS if console.returncode == 0 else {})
        ct.write("/run/soak/probe.py", PROBE.read_text())

    def run(self, minutes: float, log: Callable[[str], None] = print) -> Figures:
        console = "with" if "console-clients" in self.ops else "without (no vmhostctl console)"
        log(f"soak: seed {self.seed}, {len(self.vms)} VMs, {minutes} min, {console} console ops")
        deadline = time.monotonic() + minutes * 60
        for vm in self.vms:  # every VM up to begin with: the faults have something to hit
            self._checked(0, vm, "sys-start")
        while time.monotonic() < deadline:
            self.figures.steps += 1
            step = self.figures.steps
            vm = self.rng.choice(self.vms)
            model = self.model[vm.name]
            allowed = [op for op, states in self.ops.items() if model.state in states]
            if sum(s > step - STARTS_WINDOW for s in model.starts) >= 5:
                allowed = [op for op in allowed if op not in _STARTING]
            op = self.rng.choice(allowed)
            log(f"step {step}: {vm.name} ({model.state}) {op}")
            self._checked(step, vm, op)
        self._stop_watchers()
        log(f"soak: {self.figures.report()}; status connections answered {self.checks.answered}")
        return self.figures

    def _checked(self, step: int, vm: VM, op: str) -> None:
        try:
            self._step(step, vm, op)
        except (AssertionError, ContainerError) as e:  # a command failing is one too
            named = e.vms if isinstance(e, Violation) else ()
            involved = [vm] + [self.checks.vms[n] for n in named if n != vm.name]
            evidence = "\n".join(self.checks.evidence(v) for v in involved)
            raise Violation(
                f"seed {self.seed}, step {step} ({vm.name} {op}): {e}\n"
                f"{self.figures.report(violations=1)}\n{evidence}"
            ) from None

    def _step(self, step: int, vm: VM, op: str) -> None:
        model = self.model[vm.name]
        before = model.state
        since = time.time()
        poll = None
        if before == "up" and (op in ENDS or op in _KEEPS) and self.rng.random() < 0.5:
            poll = self._start_poller(vm)
        outcome = self._do(vm, op, model)
        (self.figures.faults if op in FAULTS else self.figures.ops)[op] += 1
        if outcome.state == "up" and op in _STARTING:
            model.starts.append(step)
        model.state = outcome.state
        if outcome.restarted:
            model.restarts += outcome.restarted
        elif outcome.state != "up" or op in _STARTING:
            model.restarts = -1  # a start by hand may reset NRestarts: learnt once settled
        self.checks.settled({name: (m.state, m.restarts) for name, m in self.model.items()})
        for name, m in self.model.items():
            if m.state == "up" and m.restarts < 0:
                m.restarts = int(self.checks.last["vms"][name]["service"]["NRestarts"])
        if poll is not None:
            self.checks.poller(vm, op, self._finish_poller(vm, poll))
        self.checks.after(vm, op, outcome, since)
        self._watch(vm, outcome)

    def _do(self, vm: VM, op: str, model: Model) -> Outcome:
        """Carry out OP; what the model must become, and what the journal must show."""
        up = model.state == "up"
        graceful = _GRACEFUL if up else ()
        sys = self.ct.systemctl
        if op == "ctl-stop":
            vm.ctl("stop", vm.name)
            return Outcome("asleep" if model.state == "asleep" else "down", records=graceful,
                           clean=up, watch_end="stopped" if up else "")  # fmt: skip
        if op == "ctl-start":
            vm.ctl("start", vm.name)
            return Outcome("up", records=() if up else _STARTED)
        if op == "ctl-force-stop":
            vm.ctl("force-stop", vm.name)
            return Outcome("down", records=(Event.STOPPED.message_id,), watch_end="stopped")
        if op == "sys-start":
            sys("start", vm.unit)
            return Outcome("up", records=() if up else _STARTED)
        if op == "sys-stop":
            sys("stop", vm.unit)  # not its socket: a listening socket (asleep) listens on
            asleep = "asleep" if model.state == "asleep" else "down"
            return Outcome(asleep, records=graceful, clean=up, watch_end="stopped" if up else "")
        if op == "sys-restart":
            sys("restart", vm.unit)
            return Outcome("up", records=graceful + _STARTED, watch_end="stopped" if up else "")
        if op == "sys-reload":
            pid = vm.show("MainPID")["MainPID"]
            sys("reload", vm.unit)
            return Outcome("up", records=(Event.RELOADED.message_id,), main_pid=pid,
                           watch_end="vmhost reloaded")  # fmt: skip
        if op == "sys-start-socket":
            sys("start", vm.socket_unit)
            return Outcome("up" if up else "asleep")
        if op == "wake":
            reply = json.loads(vm.ask('{"method":"status"}'))
            if reply != {"ok": True, "state": "running"}:
                raise Violation(f"the waking connect was answered {reply}")
            return Outcome("up", records=_STARTED)
        if op == "guest-poweroff":
            self._guest_ready(vm)  # the agent listens from READY on
            reply = self._probe("agent", vm.name)["reply"]
            if '"ok":true' not in reply:
                raise Violation(f"the agent answered shutdown with {reply!r}")
            return Outcome("down", records=(Event.STOPPED.message_id,), clean=True,
                           watch_end="stopped")  # fmt: skip
        if op == "guest-reboot":
            self.ct.run("debugfs", "-w", "-R", "rm /rebooted", vm.disk, check=False)
            sys("start", vm.unit)
            return Outcome("up", records=_STARTED, console="TINYGUEST REBOOTING")
        if op in ("qemu-kill", "qemu-rt"):
            signum = 9 if op == "qemu-kill" else signal.SIGRTMIN + self.rng.randint(0, 8)
            self.ct.run("kill", f"-{int(signum)}", str(vm.qemu_pid()))
            return Outcome("up", restarted=1, records=(Event.CRASHED.message_id, *_STARTED),
                           watch_end="error")  # fmt: skip
        if op == "qemu-stop-cont":
            pid = vm.show("MainPID")["MainPID"]
            qemu = str(vm.qemu_pid())
            self.ct.run("kill", "-STOP", qemu)
            time.sleep(self.rng.uniform(0.2, 5))
            self.ct.run("kill", "-CONT", qemu)
            return Outcome("up", main_pid=pid)
        if op == "vmhost-kill":
            self.ct.run("kill", "-KILL", vm.show("MainPID")["MainPID"])
            return Outcome("up", restarted=1, records=_STARTED, unit_failed=True)
        if op == "stop-then-restart":
            vm.ctl("stop", "--no-block", vm.name)
            sys("restart", vm.unit)
            return Outcome("up", records=graceful + _STARTED, watch_end="stopped")
        if op.startswith("guest-console-"):
            self._guest_ready(vm)  # the shell starts right after READY
            poweroff = op == "guest-console-poweroff"
            what = "/etc/tinyguest/poweroff" if poweroff else "cd /; sync; umount /mnt; reboot -f"
            pid = vm.show("MainPID")["MainPID"]
            for _ in range(4):  # keys typed before the shell sets up its terminal are flushed
                typed = time.time()
                self._console("--force", "-n", "0", vm=vm, typed=f"{what}\n", hold=2)
                effect = "QEMU shutdown: guest-shutdown" if poweroff else "guest reset (reboot)"
                if self._journal_says(vm, pid, typed, effect):
                    break
            else:
                raise Violation(f"the guest's shell never ran {what!r}")
            if poweroff:
                return Outcome("down", records=(Event.STOPPED.message_id,), clean=True,
                               watch_end="stopped")  # fmt: skip
            return Outcome("up", main_pid=pid)
        if op == "console-clients":
            for _ in range(self.rng.randint(1, 3)):
                hold = self.rng.uniform(0.2, 2)
                self._console("--read-only", "-n", str(self.rng.randint(0, 100)), vm=vm, hold=hold)
            return Outcome("up")
        if op == "reload-then-kill":
            sys("reload", "--no-block", vm.unit)
            self.ct.run("kill", "-KILL", str(vm.qemu_pid()))
            return Outcome("up", restarted=1, records=(Event.CRASHED.message_id, *_STARTED))
        if op == "clients":
            self._clients(vm)
            return Outcome("up")
        self._status_burst(vm, model.state)
        return Outcome(model.state)

    def _probe(self, *args: str) -> dict[str, Any]:
        out = self.ct.run("/usr/bin/python3", "/run/soak/probe.py", *args, timeout=120).stdout
        result: dict[str, Any] = json.loads(out)
        return result

    def _clients(self, vm: VM) -> None:
        """Watch and logs -f clients that read slowly or never, then vanish; some at once."""
        procs = []
        for _ in range(self.rng.randint(1, 6)):
            method = self.rng.choice(["watch", "logs"])
            hold = self.rng.choice([0.0, 0.3, 2.0])
            argv = (
                "/usr/bin/python3",
                "/run/soak/probe.py",
                "client",
                vm.socket,
                method,
                str(hold),
            )
            procs.append(self.ct.popen(*argv))
        # vmhostctl logs -f over the socket, killed without warning after a while.
        follow = f"{self.rng.uniform(0.3, 2):.2f}"
        self.ct.run("timeout", "-s", "KILL", follow, str(self.venv / "bin/vmhostctl"), "--socket",
                    vm.socket, "logs", "-f", "-n", "3", check=False)  # fmt: skip
        for p in procs:
            out, _ = p.communicate(timeout=60)
            if p.returncode != 0:
                raise Violation(f"a vanishing client failed: {out!r}")

    def _guest_ready(self, vm: VM) -> None:
        """The guest's last boot (since this vmhost's start, or its last reset) said READY."""
        pid = vm.show("MainPID")["MainPID"]

        def ready() -> bool:
            said = self.ct.run("journalctl", "--no-pager", "-o", "cat", f"_PID={pid}",
                               f"VMHOST_VM={vm.name}", "SYSLOG_IDENTIFIER=vmhost-console",
                               check=False).stdout  # fmt: skip
            boots = [x for x in said.splitlines() if "READY" in x or "Restarting system" in x]
            return bool(boots) and "TINYGUEST READY" in boots[-1]

        wait_for(f"{vm.name}'s guest ready", ready, timeout=90)

    def _journal_says(self, vm: VM, pid: str, since: float, text: str) -> bool:
        """Whether vmhost PID logs TEXT within 10 s of SINCE."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            said = self.ct.run(
                "journalctl",
                "--no-pager",
                "-o",
                "cat",
                f"--since=@{since:.6f}",
                f"_PID={pid}",
                f"VMHOST_VM={vm.name}",
                check=False,
            ).stdout
            if text in said:
                return True
            time.sleep(0.5)
        return False

    def _console(self, *args: str, vm: VM, typed: str = "", hold: float) -> None:
        """vmhostctl console with a pipe for stdin, killed without warning after HOLD s."""
        ctl = str(self.venv / "bin/vmhostctl")
        # A background job's stdin is /dev/null unless given one: the pipe goes through fd 3.
        script = 'exec 3<&0; "$0" console "$@" <&3 & sleep "$HOLD"; kill -KILL $! 2>/dev/null; wait'
        self.ct.run("env", f"HOLD={hold:.2f}", "sh", "-c", script, ctl, vm.name, *args,
                    input=typed, check=False)  # fmt: skip

    def _status_burst(self, vm: VM, state: str) -> None:
        """vmhostctl status polls (they never wake a VM); Go-style ones when the VM is up."""
        polls = self.rng.randint(5, 20)
        script = f'for i in $(seq {polls}); do "$0" status "$1" >/dev/null & done; wait'
        self.ct.run("sh", "-c", script, str(self.venv / "bin/vmhostctl"), vm.name, timeout=120)
        if state == "up":
            stop_file = f"/run/soak/{vm.name}.burst"
            self.ct.run("touch", stop_file)
            tally = self._probe("poll", vm.socket, str(POLLERS), stop_file)
            self.ct.run("rm", stop_file)
            self.checks.poller(vm, "status-burst", tally)

    def _start_poller(self, vm: VM) -> Any:
        stop_file = f"/run/soak/{vm.name}.done"
        self.ct.run("rm", "-f", stop_file)
        poller = self.ct.popen(
            "/usr/bin/python3", "/run/soak/probe.py", "poll", vm.socket, str(POLLERS), stop_file
        )
        time.sleep(0.3)
        return poller

    def _finish_poller(self, vm: VM, poller: Any) -> dict[str, Any]:
        self.ct.run("touch", f"/run/soak/{vm.name}.done")
        out, _ = poller.communicate(timeout=120)
        tally: dict[str, Any] = json.loads(out)
        return tally

    def _watch(self, vm: VM, outcome: Outcome) -> None:
        """One ``vmhostctl events`` per VM that is up; what the last one saw when it ended."""
        old = self.watchers.pop(vm.name, None)
        if old is not None and not outcome.watch_end and not outcome.restarted:
            if old[0].poll() is None:
                self.watchers[vm.name] = old
                return
            raise Violation("the watch ended while its VM lived on")
        if old is not None:
            old[0].wait(timeout=60)
            if outcome.watch_end:
                self.checks.watch_ended(vm, outcome.watch_end)
        if self.model[vm.name].state == "up":
            self.ct.run("rm", "-f", f"/run/soak/{vm.name}.watch")  # the last watch's lines
            ctl = str(self.venv / "bin/vmhostctl")
            watcher = self.ct.popen(
                "sh", "-c", 'echo $$; exec "$0" events "$1" --json >/run/soak/"$1".watch',
                ctl, vm.name,
            )  # fmt: skip
            assert watcher.stdout is not None
            self.watchers[vm.name] = (watcher, watcher.stdout.readline().strip())
            self.checks.watch_running(vm)

    def _stop_watchers(self) -> None:
        for watcher, pid in self.watchers.values():
            self.ct.run("kill", pid, check=False)
            watcher.wait(timeout=30)
