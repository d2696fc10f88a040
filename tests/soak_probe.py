"""Run inside the soak's container by /usr/bin/python3 (stdlib only): what the soak sees and does
from within, one process per call so that a step costs one ``nsenter``.

    probe VENV NAME...            every VM's state as systemd, vmhostctl, QEMU and /proc see it
    poll SOCKET THREADS STOPFILE  Go-style status clients until STOPFILE exists; their tally
    client SOCKET METHOD HOLD     a watch or logs -f client that reads slowly, then vanishes
    agent NAME                    the guest agent's shutdown, sent as vmhost's agent link does
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

PROPS = "ActiveState,SubState,Result,NRestarts,MainPID,InvocationID,ExecMainStatus"


def _show(units: list[str]) -> list[dict[str, str]]:
    out = subprocess.run(
        ["systemctl", "show", f"--property={PROPS}", *units],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    shown: list[dict[str, str]] = []
    for block in out.split("\n\n"):
        shown.append(dict(line.split("=", 1) for line in block.splitlines() if "=" in line))
    return shown


def _qemus() -> list[dict[str, Any]]:
    """Every QEMU of the container, with the unit whose cgroup holds it."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            exe = os.readlink(entry / "exe")
            cgroup = (entry / "cgroup").read_text()
        except OSError:
            continue
        if "qemu-system" in os.path.basename(exe):
            unit = next((p for p in cgroup.replace("/", "\n").split() if "vmhost@" in p), "")
            found.append({"pid": int(entry.name), "unit": unit})
    return found


def _fds(pid: str) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def _last_watch(name: str) -> list[dict[str, Any]]:
    try:
        lines = Path(f"/run/soak/{name}.watch").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines[-3:] if line.endswith("}")]


def probe(venv: str, names: list[str]) -> dict[str, Any]:
    units = [u for n in names for u in (f"vmhost@{n}.service", f"vmhost@{n}.socket")]
    shown = _show(units)
    ctl = f"{venv}/bin/vmhostctl"
    statuses = {
        n: subprocess.Popen([ctl, "status", n], stdout=subprocess.PIPE, text=True) for n in names
    }
    listed = subprocess.run([ctl, "list", "--json"], capture_output=True, text=True)
    rows = {row["name"]: row for row in json.loads(listed.stdout or "[]")}
    vms = {}
    for i, name in enumerate(names):
        service, sock = shown[2 * i], shown[2 * i + 1]
        status = statuses[name]
        out = status.communicate()[0]
        vms[name] = {
            "service": service,
            "socket": sock,
            "status": [status.returncode, out.strip()],
            "list": rows.get(name, {}).get("state", "missing"),
            "fds": _fds(service.get("MainPID", "0")) if service.get("MainPID", "0") != "0" else 0,
            "socket_file": os.path.exists(f"/run/vmhost/{name}/vmhost.sock"),
            "watch": _last_watch(name),
        }
    return {"vms": vms, "qemus": _qemus(), "list_rc": listed.returncode}


def poll(path: str, threads: int, stop_file: str) -> dict[str, Any]:
    """Each thread: connect, ask status, read the line; until STOPFILE exists (then 3 more)."""
    outcomes: list[tuple[float, float, bool]] = []
    refused = 0
    lock = threading.Lock()

    def client() -> None:
        nonlocal refused
        after = 0
        while after < 3:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(30)
                start = time.monotonic()
                try:
                    s.connect(path)
                except OSError:
                    with lock:
                        refused += 1
                    time.sleep(0.05)
                    after += os.path.exists(stop_file)
                    continue
                connected = time.monotonic()
                try:
                    s.sendall(b'{"method":"status"}\n')
                    line = s.makefile("rb").readline()
                except OSError:
                    line = b""
            with lock:
                outcomes.append((start, connected, line.endswith(b"\n")))
            after += os.path.exists(stop_file)
            time.sleep(0.02)

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    answered = [start for start, _, ok in outcomes if ok]
    last = max(answered, default=0.0)
    lost = [at for _, at, ok in outcomes if not ok]
    return {
        "accepted": len(outcomes),
        "answered": len(answered),
        "unanswered": len(lost),
        "skipped": sum(at < last for at in lost),  # queued before one that was answered
        "refused": refused,
    }


def client(path: str, method: str, hold: float) -> dict[str, Any]:
    """Subscribe, read a line (or none: a reader that never reads), sleep, then vanish with RST."""
    request = (
        {"method": method, "follow": True, "lines": 5} if method == "logs" else {"method": method}
    )
    with socket.socket(socket.AF_UNIX) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow reader's small window
        s.settimeout(10)
        s.connect(path)
        s.sendall(json.dumps(request).encode() + b"\n")
        first = s.recv(256) if hold < 1 else b""
        time.sleep(hold)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return {"method": method, "first": first.decode(errors="replace")[:80]}


def agent(name: str) -> dict[str, Any]:
    """Ask the guest to power off through the agent's socket (QEMU forwards it to the guest)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        s.connect(f"/var/lib/vmhost/{name}/agent.sock")
        s.sendall(b'{"type":"shutdown","payload":{}}\n')
        return {"reply": s.makefile().readline().strip()}


def main() -> None:
    command, args = sys.argv[1], sys.argv[2:]
    if command == "probe":
        result = probe(args[0], args[1:])
    elif command == "poll":
        result = poll(args[0], int(args[1]), args[2])
    elif command == "client":
        result = client(args[0], args[1], float(args[2]))
    else:
        result = agent(args[0])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
