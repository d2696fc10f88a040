"""The soak's invariants: what must hold once a step has settled, and what the step must leave."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from container import Container
from systemd_vm import UNIT_FAILURE, VM

SETTLE: Final = 90.0
"""Seconds a step may take to settle: a crash's restart (RestartSec=2) and a boot under load."""
FD_SLACK: Final = 16
"""Descriptors a vmhost may hold beyond its first settled count (clients still closing)."""


_UNEXPECTED: Final = "Traceback (most recent call last)"
"""In vmhost's own records only when an exception escaped where none was expected."""


ENDS: Final = frozenset(
    {"ctl-stop", "sys-stop", "guest-poweroff", "ctl-force-stop", "guest-console-poweroff"}
)
"""The operations that end a VM (when it was up)."""


class Violation(AssertionError):
    """An invariant did not hold: the run stops, with the evidence of the VMs it names."""

    def __init__(self, message: str, vms: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.vms = vms


@dataclass(frozen=True)
class Outcome:
    """What a step must leave: the model's new state, and what the journal and disk must show."""

    state: str
    restarted: int = 0
    records: tuple[str, ...] = ()
    clean: bool = False
    watch_end: str = ""
    main_pid: str = ""
    console: str = ""
    unit_failed: bool = False


_EXPECTED: Final = {
    # state: (service ActiveState, socket ActiveState, status exit code, list state, socket file)
    "up": ("active", "active", 0, "running", True),
    "down": ("inactive", "inactive", 3, "stopped", False),
    "asleep": ("inactive", "active", 3, "stopped", True),
}


class Checks:
    """Each check counts itself in ``counts`` when it passes."""

    def __init__(self, ct: Container, venv: Path, vms: list[VM], counts: Counter[str]) -> None:
        self.ct, self.venv, self.counts = ct, venv, counts
        self.vms = {vm.name: vm for vm in vms}
        self.fd_baseline: dict[str, int] = {}
        self.last: dict[str, Any] = {}
        self.answered = 0
        """Status connections the pollers had answered."""

    def probe(self) -> dict[str, Any]:
        argv = ("/usr/bin/python3", "/run/soak/probe.py", "probe", str(self.venv), *self.vms)
        seen: dict[str, Any] = json.loads(self.ct.run(*argv, timeout=120).stdout)
        return seen

    def settled(self, model: dict[str, tuple[str, int]]) -> None:
        """Wait until systemctl, vmhostctl status and list, the socket, NRestarts and the QEMUs
        all agree with the model for every VM; then the descriptor counts."""
        deadline = time.monotonic() + SETTLE
        while True:
            seen = self.probe()
            wrong = {n: w for n, (s, r) in model.items() if (w := _disagrees(seen, n, s, r))}
            if not wrong:
                break
            if time.monotonic() > deadline:
                raise Violation(f"not settled after {SETTLE} s: {wrong}", tuple(wrong))
            time.sleep(0.5)
        self.last = seen
        self.counts["agree"] += len(model)
        self.counts["qemu-owned"] += len(seen["qemus"])
        for name, (state, _) in model.items():
            vm = seen["vms"][name]
            if state != "up":
                continue
            key = f"{name}/{vm['service']['InvocationID']}"
            base = self.fd_baseline.setdefault(key, vm["fds"])
            if vm["fds"] > base + FD_SLACK:
                raise Violation(
                    f"{name}: vmhost holds {vm['fds']} descriptors, {base} at first", (name,)
                )
            self.counts["fds"] += 1
        failed = self.ct.run(
            "systemctl", "list-units", "--failed", "--plain", "--no-legend", "vmhost@*"
        ).stdout.strip()
        if failed:
            raise Violation(f"units left failed: {failed}")
        self.counts["no-failed-unit"] += 1

    def after(self, vm: VM, op: str, outcome: Outcome, since: float) -> None:
        """The step's own traces: journal records, the disk, the PID, the socket of a down VM."""
        records = self.ct.journal(f"--since=@{since:.6f}", f"VMHOST_VM={vm.name}")
        ids = {r.get("MESSAGE_ID") for r in records}
        if noise := [m for r in records if _UNEXPECTED in (m := str(r.get("MESSAGE")))]:
            raise Violation(f"vmhost logged an unexpected exception: {noise[0]}")
        self.counts["no-traceback"] += 1
        if missing := [i for i in outcome.records if i not in ids]:
            raise Violation(f"no journal record {missing} for {op}")
        self.counts["journal"] += len(outcome.records)
        if outcome.console:
            deadline = time.monotonic() + SETTLE
            while not any(outcome.console in str(r.get("MESSAGE")) for r in records):
                if time.monotonic() > deadline:
                    raise Violation(f"the console never said {outcome.console!r}")
                time.sleep(0.5)
                records = self.ct.journal(f"--since=@{since:.6f}", f"VMHOST_VM={vm.name}")
            self.counts["console"] += 1
        systemd = self.ct.journal(f"--since=@{since:.6f}", f"MESSAGE_ID={UNIT_FAILURE}", "_PID=1")
        failures = {r.get("UNIT") for r in systemd if str(r.get("UNIT", "")).startswith("vmhost@")}
        explained = {vm.unit} if outcome.restarted else set()
        if failures - explained or (outcome.unit_failed and vm.unit not in failures):
            raise Violation(f"unit failures {failures}, explained by {op}: {explained}")
        self.counts["failures-explained"] += 1
        if outcome.main_pid:
            now = self.last["vms"][vm.name]["service"]["MainPID"]
            if now != outcome.main_pid:
                raise Violation(f"{op} changed vmhost's PID {outcome.main_pid} -> {now}")
            self.counts["same-pid"] += 1
        if outcome.clean:
            dump = self.ct.run("dumpe2fs", "-h", vm.disk).stdout
            if "needs_recovery" in dump:
                raise Violation(f"{op} left the guest's disk needing recovery")
            if vm.token not in vm.marker():
                raise Violation(f"{op}: the marker {vm.token} is not on the disk")
            self.counts["disk-clean"] += 1
        if outcome.state == "down":
            ask = ("/usr/bin/python3", "/run/e2e/ask.py", vm.socket, '{"method":"status"}')
            answer = self.ct.run(*ask, check=False)
            if answer.returncode == 0 or "FileNotFoundError" not in answer.stderr:
                raise Violation(f"the socket of a down VM answered: {answer}")
            self.counts["down-socket-silent"] += 1

    def poller(self, vm: VM, op: str, tally: dict[str, Any]) -> None:
        """Accepted connections get answers: all of them while a VM lives on (restart, reload,
        a crash's Restart=); when it ends, all but those made after vmhost's last accept
        (README), at most one per client; after a SIGKILL, those vmhost held when it died."""
        lost = tally["unanswered"]
        ending = op in ENDS
        allowed = 4 if ending or op == "vmhost-kill" else 0
        if lost > allowed or (tally["skipped"] and op != "vmhost-kill") or not tally["answered"]:
            raise Violation(f"{op}: status clients {tally}")
        if not ending and tally["refused"]:
            raise Violation(f"{op}: a connect was refused while the VM lived on: {tally}")
        self.counts["clients-answered"] += 1
        self.answered += tally["answered"]

    def watch_running(self, vm: VM) -> None:
        """A new watch's first line is the state the others agree on."""
        deadline = time.monotonic() + 30
        while not (lines := self._watch_lines(vm)):
            if time.monotonic() > deadline:
                raise Violation("a new watch said nothing in 30 s")
            time.sleep(0.2)
        if lines[-1].get("state") != "running":
            raise Violation(f"watch says {lines[-1]} while the VM is up")
        self.counts["watch"] += 1

    def watch_ended(self, vm: VM, end: str) -> None:
        """A watch's last line says how the VM it watched ended."""
        lines = self._watch_lines(vm)
        last = lines[-1] if lines else {}
        if last.get("state") != end and last.get("message") != end:
            raise Violation(f"the watch ended on {last}, not {end!r}")
        self.counts["watch"] += 1

    def _watch_lines(self, vm: VM) -> list[dict[str, Any]]:
        out = self.ct.run("cat", f"/run/soak/{vm.name}.watch", check=False).stdout
        return [json.loads(line) for line in out.splitlines() if line.endswith("}")]

    def evidence(self, vm: VM) -> str:
        unit = self.ct.run("journalctl", "--no-pager", "-n", "80", "-u", vm.unit, "-u",
                           vm.socket_unit, check=False).stdout  # fmt: skip
        console = self.ct.run("journalctl", "--no-pager", "-n", "30", "-o", "cat",
                              f"VMHOST_VM={vm.name}", "SYSLOG_IDENTIFIER=vmhost-console",
                              check=False).stdout  # fmt: skip
        return f"--- journal of {vm.unit}:\n{unit}\n--- console of {vm.name}:\n{console}"


def _disagrees(seen: dict[str, Any], name: str, state: str, restarts: int) -> str:
    vm = seen["vms"][name]
    service, socket_, rc, listed, file = _EXPECTED[state]
    got = (
        vm["service"].get("ActiveState"),
        vm["socket"].get("ActiveState"),
        vm["status"][0],
        vm["list"],
        vm["socket_file"],
    )
    if got != (service, socket_, rc, listed, file):
        return f"want {state} {(service, socket_, rc, listed, file)}, got {got} {vm['status']}"
    if state == "up" and restarts >= 0 and vm["service"].get("NRestarts") != str(restarts):
        return f"NRestarts {vm['service'].get('NRestarts')}, want {restarts}"
    qemus = [q for q in seen["qemus"] if q["unit"] == f"vmhost@{name}.service"]
    if len(qemus) != (state == "up"):
        return f"QEMUs {qemus} for a VM that is {state}"
    if stray := [q for q in seen["qemus"] if not q["unit"]]:
        return f"QEMUs outside any vmhost unit: {stray}"
    return ""
