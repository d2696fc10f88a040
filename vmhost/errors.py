"""One error tree for everything vmhost raises, so callers can catch ``VmhostError``."""

from __future__ import annotations


class VmhostError(Exception):
    """Base of every error vmhost raises on purpose."""


class ConfigError(VmhostError):
    """The VM's config cannot be used; the message names the file and the field."""


class ClientError(VmhostError):
    """A control-socket call failed before an answer came back (connect, timeout, EOF)."""


class NotListeningError(ClientError):
    """Nothing listens on the control socket (no socket file, or refused): vmhost is not running."""


class ServerError(ClientError):
    """The server answered ``ok:false``; the message is the server's own text."""


class AlreadyRunningError(VmhostError):
    """Another vmhost already serves this socket; starting a second one would steal it."""


class UsageError(VmhostError):
    """The command line asks for something that cannot work (a too long socket path, no NAME)."""


class ActivationError(VmhostError):
    """systemd passed descriptors that cannot be the control socket: serving would hang clients."""


class JournalError(VmhostError):
    """The journal cannot be opened or filtered (no journal here, or no permission)."""


class ControllerError(VmhostError):
    """The VM could not be started or controlled."""


class TransitionError(ControllerError):
    """The VM was asked to move between two states it cannot move between (a bug)."""


class VMCrashedError(ControllerError):
    """QEMU ended without a requested stop or a guest power-off (crash, outside kill)."""


class GuestNotReadyError(ControllerError):
    """The guest did not get ready (``[boot] ready``) in time and was stopped."""


class MigrationError(ControllerError):
    """A live migration failed, was cancelled or timed out; on the source the guest runs on."""


class IncomingFailedError(MigrationError):
    """The guest never arrived at this migration target, which gave up (nothing ran here)."""


class AgentError(ControllerError):
    """The guest agent was unreachable, too slow, or refused; the cause is chained."""


class MachinedError(VmhostError):
    """systemd-machined cannot register the VM under its name (another machine has it)."""


class ReloadRefusedError(VmhostError):
    """vmhost cannot re-execute itself right now (a stop runs, QEMU is not ready); it goes on."""


class InternalError(VmhostError):
    """A bug in vmhost itself: a re-executed vmhost may do better (see :mod:`vmhost.reload`)."""


class PlantedFault(InternalError):
    """The internal error ``$VMHOST_TEST_FAULT`` plants (tests only); nothing else raises it."""


class TooManyWatchersError(VmhostError):
    """Every watcher slot of the VM is taken; the control socket answers ``too many watchers``."""
