"""Build the tiny test guest: Debian cloud kernel, busybox initramfs, sparse ext4 data disk.

vmhost has to be proven against a real guest (ACPI power button, hostfwd, agent, reboot,
READY=1 on the notify port),
built from Debian packages alone in a few seconds and cached per kernel package version.
Stdlib only, so it runs under any Python 3.11 on the host and from pytest alike.

    python3 tests/guest/build.py OUTDIR [--ignore-acpi]    # prints the paths as JSON
"""

import argparse
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
DISK_SIZE = 16 * 1024 * 1024
# Roots of the module closure; their dependencies are read from each module's .modinfo.
BASE_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "virtio_console")
ACPI_MODULES = ("button", "evdev")  # power button as an input device, /dev/input/event*

HERE = Path(__file__).resolve().parent
GUEST_FILES = ("init.sh", "agent.awk", "poweroff.sh", "ssh.sh")
STAMP = "stamp.json"
OUTPUTS = ("vmlinuz", "initrd.img", "initrd-noacpi.img", "disk.img")


class GuestBuildError(RuntimeError):
    """The guest image could not be built (missing tool, package or kernel module)."""


@dataclass(frozen=True)
class GuestImage:
    """What QEMU boots: -kernel, -initrd, and the pristine data disk (copy it: fresh_disk)."""

    kernel: Path
    initrd: Path
    disk: Path


@dataclass(frozen=True)
class Package:
    name: str
    version: str


def build(outdir: Path, *, ignore_acpi: bool = False) -> GuestImage:
    """Build into outdir, or reuse the build there if it is for the current packages.

    Both initrd variants are built at once so either flavour is a cache hit afterwards.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    outdir = outdir.resolve()
    image = GuestImage(
        kernel=outdir / "vmlinuz",
        initrd=outdir / ("initrd-noacpi.img" if ignore_acpi else "initrd.img"),
        disk=outdir / "disk.img",
    )
    kernel, busybox = _resolve_packages()
    key = {
        "kernel": [kernel.name, kernel.version],
        "busybox": [busybox.name, busybox.version],
        "recipe": _recipe_hash(),
    }
    with _locked(outdir / ".lock"):
        current = _read_stamp(outdir / STAMP) == key
        if not current or not all((outdir / name).exists() for name in OUTPUTS):
            (outdir / STAMP).unlink(missing_ok=True)
            for stale in outdir.glob(".build-*"):  # left by a killed builder; we hold the lock
                shutil.rmtree(stale)
            _build(outdir, kernel, busybox)
            _atomic_write(outdir / STAMP, json.dumps(key).encode())
    return image


def fresh_disk(image: GuestImage, dest: Path) -> Path:
    """Copy the pristine data disk for one test, keeping it sparse (16 MiB, ~1 MiB used)."""
    _run(["cp", "--sparse=always", str(image.disk), str(dest)])
    return dest


def _build(outdir: Path, kernel: Package, busybox: Package) -> None:
    with tempfile.TemporaryDirectory(dir=outdir, prefix=".build-") as tmp_name:
        tmp = Path(tmp_name)
        kernel_root, busybox_root = _unpack([kernel, busybox], tmp)
        busybox_bin = busybox_root / "bin" / "busybox"
        (vmlinuz,) = (kernel_root / "boot").glob("vmlinuz-*")
        kver = vmlinuz.name.removeprefix("vmlinuz-")
        modules = _module_index(kernel_root, kver)
        for name, acpi in (("initrd.img", True), ("initrd-noacpi.img", False)):
            roots = BASE_MODULES + ACPI_MODULES if acpi else BASE_MODULES
            archive = _initramfs(busybox_bin, kernel_root, _load_order(modules, roots), acpi)
            (tmp / name).write_bytes(gzip.compress(archive, compresslevel=6, mtime=0))
        _make_disk(tmp / "disk.img")
        shutil.copyfile(vmlinuz, tmp / "vmlinuz")
        for name in OUTPUTS:
            os.replace(tmp / name, outdir / name)


def _resolve_packages() -> tuple[Package, Package]:
    """Ask apt which versioned kernel the meta package pulls in, plus the busybox version.

    One apt-cache call: this image keeps no pkgcache.bin, so each call costs over a second.
    """
    out = _run(["apt-cache", "show", "--no-all-versions", KERNEL_META_PACKAGE, BUSYBOX_PACKAGE])
    kernel = busybox = None
    for record in out.split("\n\n"):
        fields = dict(re.findall(r"^([\w-]+): (.*)$", record, re.MULTILINE))
        if fields.get("Package") == KERNEL_META_PACKAGE:
            dep = re.search(r"(linux-image-\S+)\s*\(=\s*([^)\s]+)\)", fields.get("Depends", ""))
            if dep:
                kernel = Package(dep[1], dep[2])
        elif fields.get("Package") == BUSYBOX_PACKAGE:
            busybox = Package(BUSYBOX_PACKAGE, fields["Version"])
    if kernel is None or busybox is None:
        raise GuestBuildError(f"apt-cache cannot resolve {KERNEL_META_PACKAGE}/{BUSYBOX_PACKAGE}")
    return kernel, busybox


def _unpack(packages: list[Package], tmp: Path) -> list[Path]:
    """Download all in one apt-get call (each call re-reads the package lists), then extract."""
    # Root's downloads are otherwise sandboxed to _apt, which cannot write to our 0700 tmp.
    specs = [f"{package.name}={package.version}" for package in packages]
    _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *specs], cwd=tmp)
    roots = []
    for package in packages:
        (deb,) = tmp.glob(f"{package.name}_*.deb")
        root = tmp / package.name
        _run(["dpkg-deb", "-x", str(deb), str(root)])
        deb.unlink()
        roots.append(root)
    return roots


def _module_index(kernel_root: Path, kver: str) -> dict[str, Path]:
    """Module name -> .ko path; the package ships no modules.dep, so we resolve deps ourselves."""
    for base in (kernel_root / "lib" / "modules" / kver, kernel_root / "usr/lib/modules" / kver):
        if base.is_dir():
            return {ko.stem.replace("-", "_"): ko for ko in base.rglob("*.ko")}
    raise GuestBuildError(f"no modules for kernel {kver}")


def _load_order(modules: dict[str, Path], roots: tuple[str, ...]) -> list[Path]:
    """Dependencies first, as insmod by path needs (busybox modprobe would need modules.dep)."""
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name not in modules:
            raise GuestBuildError(f"kernel module {name} not in the kernel package")
        info = re.search(rb"(?:^|\0)depends=([^\0]*)", modules[name].read_bytes())
        for dep in info[1].decode().split(",") if info and info[1] else ():
            visit(dep.replace("-", "_"))
        order.append(modules[name])

    for root in roots:
        visit(root)
    return order


def _initramfs(busybox: Path, kernel_root: Path, modules: list[Path], acpi: bool) -> bytes:
    cpio = _Cpio()
    for directory in ("dev", "proc", "sys", "mnt", "run", "tmp", "etc/tinyguest"):
        cpio.add_dir(directory)
    # The kernel opens /dev/console for init before devtmpfs is mounted.
    cpio.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    cpio.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    applets = _run([str(busybox), "--list-full"]).split()
    for applet in applets:
        if applet != "bin/busybox":
            cpio.add_symlink(applet, "/bin/busybox")
    cpio.add_file("init", (HERE / "init.sh").read_bytes(), 0o755)
    cpio.add_file("etc/tinyguest/poweroff", (HERE / "poweroff.sh").read_bytes(), 0o755)
    cpio.add_file("etc/tinyguest/agent.awk", (HERE / "agent.awk").read_bytes(), 0o644)
    cpio.add_file("etc/tinyguest/ssh", (HERE / "ssh.sh").read_bytes(), 0o755)
    guest_paths = ["/" + str(ko.relative_to(kernel_root)) for ko in modules]
    config = f'MODULES="{" ".join(guest_paths)}"\nACPI={int(acpi)}\n'
    cpio.add_file("etc/tinyguest/config", config.encode(), 0o644)
    for ko, guest_path in zip(modules, guest_paths, strict=True):
        cpio.add_file(guest_path.lstrip("/"), ko.read_bytes(), 0o644)
    if acpi:
        # busybox acpid maps the KEY_POWER input event to PWRF/00000080.
        cpio.add_symlink("etc/acpi/PWRF/00000080", "/etc/tinyguest/poweroff")
    return cpio.finish()


class _Cpio:
    """newc archive built in memory: no staging tree, and device nodes need no mknod."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._dirs: set[str] = set()
        self._inode = 0

    def add(self, path: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        parent = os.path.dirname(path)
        if parent and parent not in self._dirs:
            self.add_dir(parent)
        self._inode += 1
        name = path.encode() + b"\0"
        fields = (self._inode, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(name), 0)
        self._data += b"070701" + b"".join(b"%08X" % field for field in fields) + name
        self._pad()
        self._data += data
        self._pad()

    def add_dir(self, path: str) -> None:
        if path not in self._dirs:
            self.add(path, stat.S_IFDIR | 0o755)
            self._dirs.add(path)

    def add_file(self, path: str, data: bytes, perm: int) -> None:
        self.add(path, stat.S_IFREG | perm, data)

    def add_symlink(self, path: str, target: str) -> None:
        self.add(path, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return bytes(self._data)

    def _pad(self) -> None:
        self._data += b"\0" * (-len(self._data) % 4)


def _make_disk(path: Path) -> None:
    with path.open("wb") as disk:
        disk.truncate(DISK_SIZE)
    mkfs = shutil.which("mkfs.ext4", path=os.pathsep.join((os.environ.get("PATH", ""), "/sbin")))
    if mkfs is None:
        raise GuestBuildError("mkfs.ext4 not found (install e2fsprogs)")
    _run([mkfs, "-q", "-F", "-L", "tinyguest", str(path)])


def _recipe_hash() -> str:
    """A change to this builder or to a guest script invalidates the cache too."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for name in GUEST_FILES:
        digest.update((HERE / name).read_bytes())
    return digest.hexdigest()


def _read_stamp(path: Path) -> object:
    try:
        return json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise builders sharing an outdir (parallel pytest workers, CLI + fixture)."""
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _run(argv: list[str], cwd: Path | None = None) -> str:
    env = {**os.environ, "LC_ALL": "C"}
    try:
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        raise GuestBuildError(f"{argv[0]} failed: {detail}") from exc
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--ignore-acpi", action="store_true", help="initrd without acpid")
    args = parser.parse_args()
    try:
        image = build(args.outdir, ignore_acpi=args.ignore_acpi)
    except GuestBuildError as exc:
        print(f"build.py: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({field: str(path) for field, path in asdict(image).items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
