"""The VM in ``machinectl``: registering it with systemd-machined over D-Bus.

vmhost registers itself, not QEMU, as the machine's leader, so what machined
sends the leader reaches the supervisor: ``machinectl poweroff`` (SIGRTMIN+4)
runs the graceful stop chain, ``machinectl reboot`` (SIGINT) a reboot (see
vmhost.service).  machined takes the unit from the leader's cgroup
(``vmhost@NAME.service``), which ``machinectl terminate`` stops and whose end
drops the registration.  A re-exec keeps the PID and so the registration.

Registration is a courtesy to the operator: whatever goes wrong (not a
systemd service, no system bus, machined masked or refusing) costs one
warning, never the VM's start.  jeepney is imported only here, when a
registration is attempted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import TYPE_CHECKING, Any, Final
from uuid import UUID, uuid5

from .config import Config, MachineConfig
from .errors import MachinedError

if TYPE_CHECKING:
    from jeepney.io.asyncio import DBusRouter

log = logging.getLogger(__name__)

POWEROFF: Final = signal.SIGRTMIN + 4
"""What ``machinectl poweroff`` sends the leader (systemd's own "power off" signal)."""
REBOOT: Final = signal.SIGINT
"""What ``machinectl reboot`` sends the leader (ctrl-alt-del for systemd as PID 1)."""
TIMEOUT: Final = 5.0
"""The whole registration (connect, authenticate, every call); it runs while QEMU starts."""
SERVICE: Final = "vmhost"
CLASS: Final = "vm"
NAMESPACE: Final = UUID("0b6c7a4e-5d0f-4c3e-9a55-3f1b8e2d6c71")
"""uuid5 namespace of the name-derived UUIDs: never change it, guests would see new ones."""

_BUS: Final = "org.freedesktop.machine1"
_PATH: Final = "/org/freedesktop/machine1"
_MANAGER: Final = "org.freedesktop.machine1.Manager"
_MACHINE: Final = "org.freedesktop.machine1.Machine"
_PROPERTIES: Final = "org.freedesktop.DBus.Properties"
_EXISTS: Final = "org.freedesktop.machine1.MachineExists"
_NO_MACHINE_FOR_PID: Final = "org.freedesktop.machine1.NoMachineForPID"


def machine_uuid(machine: MachineConfig, name: str) -> UUID:
    """``machine.uuid``, else one derived from the name alone: the same on every host, so a
    VM keeps its identity when its config moves (failover, migration), and nothing to store."""
    return machine.uuid or uuid5(NAMESPACE, name)


def is_service() -> bool:
    """Whether systemd started this process as a service's main process.

    Only then may it register: machined takes whatever unit holds the leader
    for the VM's (from a shell, a login session's), and ``machinectl
    terminate`` would stop that.
    """
    return "INVOCATION_ID" in os.environ and os.getppid() == 1


async def register(name: str, config: Config) -> bool:
    """Make this process the leader of machine ``name``; whether it now is.

    Never raises (but CancelledError): a failure is one warning.
    """
    if not config.systemd.register_machine:
        return False
    if not is_service():
        log.warning("not registered with systemd-machined: not run as a systemd service")
        return False
    try:
        async with asyncio.timeout(TIMEOUT):
            done = await _register(name, machine_uuid(config.machine, name), os.getpid())
    except TimeoutError:
        log.warning("not registered with systemd-machined: no answer within %g s", TIMEOUT)
    except OSError as e:
        log.warning("not registered with systemd-machined: no system bus: %s", e)
    except Exception as e:  # a registration must never stop a VM from starting
        log.warning("not registered with systemd-machined: %s", _reason(e))
    else:
        log.info("machine %s %s with systemd-machined (leader PID %d)", name, done, os.getpid())
        return True
    return False


async def _register(name: str, uuid: UUID, pid: int) -> str:
    from jeepney.io.asyncio import open_dbus_router
    from jeepney.wrappers import DBusErrorResponse

    async with open_dbus_router("SYSTEM") as router:
        machine = (name, uuid.bytes, SERVICE, CLASS, pid, "")
        try:
            await _call(router, _PATH, _MANAGER, "RegisterMachine", "sayssus", *machine)
            return "registered"
        except DBusErrorResponse as e:
            if e.name != _EXISTS:
                raise
        # Ours if machined finds it from this PID: by leader (a re-exec), or by unit (a
        # previous vmhost of this unit, dead before the unit stopped: a restart).
        try:
            (path,) = await _call(router, _PATH, _MANAGER, "GetMachineByPID", "u", pid)
        except DBusErrorResponse as e:
            if e.name != _NO_MACHINE_FOR_PID:
                raise
            raise MachinedError(f"the name {name!r} is another machine's") from None
        (found,) = await _call(router, path, _PROPERTIES, "GetAll", "s", _MACHINE)
        props = {key: value for key, (_, value) in found.items()}
        if props.get("Name") != name:
            raise MachinedError(f"the name {name!r} is another machine's")
        if props.get("Leader") == pid:
            return "kept"
        await _call(router, _PATH, _MANAGER, "UnregisterMachine", "s", name)
        await _call(router, _PATH, _MANAGER, "RegisterMachine", "sayssus", *machine)
        return f"registered again (in place of PID {props.get('Leader')}, gone)"


async def _call(
    router: DBusRouter, path: str, interface: str, method: str, signature: str, *body: Any
) -> tuple[Any, ...]:
    from jeepney import DBusAddress, new_method_call
    from jeepney.wrappers import unwrap_msg

    address = DBusAddress(path, bus_name=_BUS, interface=interface)
    reply = await router.send_and_get_reply(new_method_call(address, method, signature, body))
    values: tuple[Any, ...] = unwrap_msg(reply)
    return values


def _reason(error: Exception) -> str:
    """machined's own words for a D-Bus error (``[name] ('text',)`` otherwise)."""
    name, data = getattr(error, "name", None), getattr(error, "data", None)
    if isinstance(name, str) and isinstance(data, tuple) and data and isinstance(data[0], str):
        return f"{data[0]} ({name})"
    return str(error) or repr(error)
