#!/bin/sh
# /init of the tiny test guest: busybox sh as PID 1, so this script is the whole userland.
# The host only learns the guest state from the serial console ("TINYGUEST ..." lines; a shell
# answers there too), the data disk (/marker, /rebooted, /agent), the TCP listeners on ports 22
# and 1024, and the sd_notify-style lines (STATUS=, READY=1) it writes to the virtio-serial
# port org.vmhost.notify.0 when QEMU has one.

export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
set -f  # /proc/cmdline words are split below, never globbed

say() { echo "TINYGUEST $*"; }

# Polls until "$@" succeeds; TCG boots are slow and probing is asynchronous.
wait_for() {
	tries=400
	until "$@"; do
		tries=$((tries - 1))
		[ "$tries" -gt 0 ] || return 1
		sleep 0.05
	done
}

# busybox nc listens on :: when IPv6 is up, else on 0.0.0.0; state 0A is LISTEN.
listening() {
	port=$(printf '%04X' "$1")
	grep -q ":$port [0-9A-F]*:0000 0A" /proc/net/tcp6 /proc/net/tcp 2>/dev/null
}

# An IPv6 probe waits for the address QEMU's router advertisement gives (fec0::/64), past its
# duplicate address detection.  Shell builtins only: a fork per try is slow under TCG.
ip6_global() {
	while read -r _ _ _ scope flags dev; do
		[ "$dev" = eth0 ] && [ "$scope" != 20 ] && [ $((0x$flags & 0x40)) = 0 ] && return 0
	done </proc/net/if_inet6
	return 1
}

# acpid opens the event devices after it starts: a powerdown before that is lost.
acpid_ready() { ls -l "/proc/$acpid_pid/fd" 2>/dev/null | grep -q /dev/input/event; }

# sd_notify's form on the port org.vmhost.notify.0 (/dev/vportNpM), one KEY=VALUE a line, if
# QEMU gave the guest that port; builtins only, as above.
notify() {
	set +f
	for port in /sys/class/virtio-ports/*; do
		[ -e "$port/name" ] && read -r name <"$port/name" || continue
		[ "$name" = org.vmhost.notify.0 ] || continue
		printf '%s\n' "$@" >"/dev/${port##*/}"
		break
	done
	set -f
}

# Never let PID 1 exit (that panics the kernel): report and idle instead.
fail() {
	say "FAILED: $*"
	while :; do sleep 3600 & wait $!; done
}

. /etc/tinyguest/config
for module in $MODULES; do
	insmod "$module" || say "insmod $module failed"
done

token=
autopoweroff=0
autopoweroff_delay=1
reboot_once=0
probe=
flood=0
busy=0
never_ready=0
reboot_ready=0
for arg in $(cat /proc/cmdline); do
	case $arg in
	guest.token=*) token=${arg#*=} ;;
	guest.autopoweroff=*) autopoweroff=${arg#*=} ;;
	guest.autopoweroff_delay=*) autopoweroff_delay=${arg#*=} ;;
	guest.reboot_once=*) reboot_once=${arg#*=} ;;
	guest.probe=*) probe=${arg#*=} ;;
	guest.flood=*) flood=${arg#*=} ;;
	guest.busy=*) busy=${arg#*=} ;;
	guest.never_ready=*) never_ready=${arg#*=} ;;
	guest.reboot_ready=*) reboot_ready=${arg#*=} ;;
	esac
done

notify "STATUS=tinyguest: mounting /dev/vda"
wait_for test -b /dev/vda || fail "no /dev/vda"
mount -t ext4 /dev/vda /mnt || fail "cannot mount /dev/vda"
echo "$token" >>/mnt/marker
sync

if [ "$reboot_once" = 1 ] && [ ! -e /mnt/rebooted ]; then
	: >/mnt/rebooted
	sync
	umount /mnt
	say REBOOTING
	reboot -f
fi

notify "STATUS=tinyguest: starting the network and listeners"
wait_for test -e /sys/class/net/eth0 || fail "no eth0"
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2

nc -ll -p 22 -e /etc/tinyguest/ssh &
mkdir -p /run/agent
(umask 077 && exec nc -ll -p 1024 -e awk -f /etc/tinyguest/agent.awk) &

if [ "$ACPI" = 1 ]; then
	acpid -f -c /etc/acpi -l /dev/null &
	acpid_pid=$!
	wait_for acpid_ready || fail "acpid holds no event device"
fi
wait_for listening 22 || fail "port 22 not listening"
wait_for listening 1024 || fail "port 1024 not listening"

# The SMBIOS UUID QEMU was given (-uuid), as the guest sees it.
read -r product_uuid </sys/class/dmi/id/product_uuid && say "UUID $product_uuid"

# The agent reports "ready" from here on, like the console line below.
: >/run/tinyguest-ready
say READY
# guest.never_ready=1: says what it does, never that it is ready (the host's timeout path).
# guest.reboot_ready=SECONDS: that long after it is ready, reboots once (and says READY=1 again).
if [ "$never_ready" = 1 ]; then
	notify "STATUS=tinyguest: up, but never ready"
else
	notify "STATUS=tinyguest: up" "READY=1"
fi
if [ "$reboot_ready" -gt 0 ] && [ ! -e /mnt/rebooted-ready ]; then
	: >/mnt/rebooted-ready
	sync
	(
		sleep "$reboot_ready"
		umount /mnt
		say REBOOTING
		reboot -f
	) &
fi

# A shell on the serial console for `vmhostctl console`, started again when it exits.  Its
# prompt and echo share the console with the lines above, which are always whole lines.
export PS1='tinyguest# '
(while :; do setsid -c sh -i </dev/ttyS0 >/dev/ttyS0 2>&1; sleep 1; done) &

# guest.probe=HOST:PORT,...: connect to each once and report what it answered, so host tests
# see what this guest can reach ("TINYGUEST PROBE 10.0.2.2:2222 SSH-2.0-..." or "... FAILED").
case $probe in *::*) wait_for ip6_global || say "no IPv6 address" ;; esac
for target in $(echo "$probe" | tr , ' '); do
	answer=$(nc -w 3 "${target%:*}" "${target##*:}" </dev/null 2>/dev/null | head -n 1)
	say "PROBE $target ${answer:-FAILED}"
done

# guest.busy=SECONDS: as busy as the flood below but silent (a baseline for it), then
# guest.flood=SECONDS: a guest printing as fast as it can; each says when it stopped.
if [ "$busy" -gt 0 ]; then
	timeout "$busy" yes "TINYGUEST BUSY" >/dev/null
	say "BUSY DONE"
fi
if [ "$flood" -gt 0 ]; then
	timeout "$flood" yes "TINYGUEST FLOOD the guest owns its console but not the host's disk or journal"
	say "FLOOD DONE"
fi

if [ "$autopoweroff" = 1 ]; then
	sleep "$autopoweroff_delay"
	/etc/tinyguest/poweroff
fi
while :; do sleep 3600 & wait $!; done
