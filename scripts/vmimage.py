"""A tiny Linux VM for the real-VM test and ``scripts/vm-demo``.

:func:`build_rootfs` makes an ext4 image (``mkfs.ext4 -d``, no loop mounts, no
root needed) holding a static busybox, ``/golden.txt`` and ``/golden.bin``
(known contents), an empty ``/data`` and ``/sbin/init``, a shell script that:

* prints ``NBDVM-BEGIN <vm>``, then what the image holds: ``NBDVM-GOLDEN
  <text of /golden.txt>``, ``NBDVM-GOLDEN-MD5 <md5 of /golden.bin>``, one
  ``NBDVM-SAW <file> <text or md5>`` per file in ``/data`` (the files earlier
  boots of this volume or its ancestors wrote) and ``NBDVM-SCRATCH <md5 of
  /scratch.bin, or absent>``; it overwrites 256 KiB of ``/scratch.bin`` with
  zeros, syncs, drops the page cache and prints ``NBDVM-SCRATCH-ZEROED <md5>``;
* writes ``/data/<vm>.txt`` (``hello from <vm>``) and ``/data/<vm>.bin`` (2 MiB
  of random bytes, synced, then 256 KiB of it overwritten with zeros:
  ``NBDVM-WROTE <vm>.bin <md5>``) and a 1 MiB ``/tmp.bin``,
  syncs, deletes ``/tmp.bin`` and golden's ``/scratch.bin`` and runs ``fstrim``
  (so the disk sees TRIMs of chunks the fork shares with golden:
  ``NBDVM-TRIM <n> bytes trimmed``), drops the page cache and reads its file
  back (``NBDVM-REREAD <vm>.bin <md5>``) and checks ``/golden.bin`` again;
* remounts ``/`` read-only, prints ``NBDVM-END <vm> golden=<text> saw=<files>``
  and powers off. On any failure it prints ``NBDVM-ERROR <what>`` and powers off.

The VM name comes from the kernel command line (``vmname=vm1``).

Two ways to boot (:class:`BootFiles`), both with the newest Debian kernel found by
globbing ``/boot`` (:func:`find_kernel`): ``debian`` uses its initramfs-tools
initrd as installed (udev loads virtio_blk and ext4, mounts ``root=/dev/vda``
rw); ``fast`` starts the same kernel decompressed, at its PVH entry point, with
a 5 MiB initramfs built here (busybox, the virtio/ext4 modules from
``/lib/modules``, a ten-line init) -- about half the boot time under TCG.
:func:`boot` / :class:`Vm` run ``qemu-system-x86_64`` (TCG, serial console on
stdout), timestamp each console line and return a :class:`Boot` with the
markers parsed and the seconds from starting qemu to ``NBDVM-END``;
:func:`boot_problems` says what a boot got wrong.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import random
import re
import shutil
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BOOT_DIR = Path("/boot")
GOLDEN_BIN_BYTES = 4 * 1024 * 1024
SCRATCH_BYTES = 1024 * 1024
SCRATCH_ZEROED = (128 * 1024, 384 * 1024)  # the byte range init overwrites with zeros
MARK = "NBDVM-"

INIT = r"""#!/bin/sh
# Init of the nbdserver test VM; see scripts/vmimage.py.
PATH=/bin:/sbin
export PATH
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
fail() {
    echo "NBDVM-ERROR $*"
    poweroff -f
    sleep 5
    exit 1
}
name=
for word in $(cat /proc/cmdline); do
    case "$word" in vmname=*) name=${word#vmname=} ;; esac
done
[ -n "$name" ] || name=anonymous
echo "NBDVM-BEGIN $name"
mount -o remount,rw / || fail "remount rw"
[ -f /golden.txt ] || fail "no /golden.txt"
golden=$(cat /golden.txt)
echo "NBDVM-GOLDEN $golden"
golden_md5=$(md5sum < /golden.bin | cut -d' ' -f1)
echo "NBDVM-GOLDEN-MD5 $golden_md5"
saw=
for f in /data/*; do
    [ -f "$f" ] || continue
    b=${f##*/}
    case "$b" in
        *.txt) echo "NBDVM-SAW $b $(cat "$f")" ;;
        *) echo "NBDVM-SAW $b $(md5sum < "$f" | cut -d' ' -f1)" ;;
    esac
    saw="$saw,$b"
done
if [ -f /scratch.bin ]; then
    echo "NBDVM-SCRATCH $(md5sum < /scratch.bin | cut -d' ' -f1)"
    dd if=/dev/zero of=/scratch.bin bs=64k seek=2 count=4 conv=notrunc 2>/dev/null \
        || fail "zero /scratch.bin"
    sync || fail sync
    echo 3 > /proc/sys/vm/drop_caches
    echo "NBDVM-SCRATCH-ZEROED $(md5sum < /scratch.bin | cut -d' ' -f1)"
else
    echo "NBDVM-SCRATCH absent"
fi
echo "hello from $name" > "/data/$name.txt" || fail "write $name.txt"
dd if=/dev/urandom of="/data/$name.bin" bs=64k count=32 2>/dev/null || fail "write $name.bin"
sync || fail sync
dd if=/dev/zero of="/data/$name.bin" bs=64k seek=8 count=4 conv=notrunc 2>/dev/null \
    || fail "zero part of $name.bin"
echo "NBDVM-WROTE $name.bin $(md5sum < "/data/$name.bin" | cut -d' ' -f1)"
dd if=/dev/urandom of=/tmp.bin bs=64k count=16 2>/dev/null || fail "write /tmp.bin"
sync || fail sync
rm -f /scratch.bin /tmp.bin
sync || fail sync
trimmed=$(fstrim -v / 2>&1) || fail "fstrim: $trimmed"
echo "NBDVM-TRIM ${trimmed#*: }"
echo 3 > /proc/sys/vm/drop_caches
echo "NBDVM-REREAD $name.bin $(md5sum < "/data/$name.bin" | cut -d' ' -f1)"
[ "$(md5sum < /golden.bin | cut -d' ' -f1)" = "$golden_md5" ] || fail "golden.bin changed"
mount -o remount,ro / || fail "remount ro"
echo "NBDVM-END $name golden=$golden saw=${saw#,}"
poweroff -f
sleep 5
"""


# -- the kernel ---------------------------------------------------------------------------


def _version_key(version: str) -> list[tuple[int, int | str]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-+~]", version)]


def find_kernel(boot_dir: Path = BOOT_DIR) -> tuple[Path, Path]:
    """The newest ``vmlinuz-V`` in `boot_dir` that has an ``initrd.img-V``, as
    (kernel, initrd). FileNotFoundError (naming the package) when there is none."""
    found = []
    for kernel in boot_dir.glob("vmlinuz-*"):
        version = kernel.name[len("vmlinuz-"):]
        initrd = boot_dir / f"initrd.img-{version}"
        if initrd.is_file() and os.access(kernel, os.R_OK) and os.access(initrd, os.R_OK):
            found.append((_version_key(version), kernel, initrd))
    if not found:
        raise FileNotFoundError(f"no readable {boot_dir}/vmlinuz-* with a matching initrd.img-* "
                                "(install linux-image-amd64, or run scripts/install-deps)")
    _, kernel, initrd = max(found)
    return kernel, initrd


@dataclass(frozen=True)
class BootFiles:
    """What qemu boots. `profile` is ``debian`` (the distribution's compressed kernel and
    initramfs-tools initrd, as installed) or ``fast`` (the same kernel decompressed and
    started at its PVH entry point, which skips the slow decompression under TCG, and
    the minimal initramfs of :func:`build_initramfs`)."""

    profile: str
    kernel: Path
    initrd: Path


def debian_boot(boot_dir: Path = BOOT_DIR) -> BootFiles:
    kernel, initrd = find_kernel(boot_dir)
    return BootFiles("debian", kernel, initrd)


def fast_boot(workdir: Path, boot_dir: Path = BOOT_DIR) -> BootFiles:
    """The ``fast`` profile for the kernel :func:`find_kernel` picks, its files built in
    `workdir` (the compressed kernel is used when it cannot be unpacked or has no PVH
    entry point)."""
    kernel, _ = find_kernel(boot_dir)
    version = kernel_version(kernel)
    initrd = build_initramfs(workdir / f"initramfs-{version}.cpio", kernel)
    vmlinux = extract_vmlinux(kernel, workdir / f"vmlinux-{version}")
    return BootFiles("fast", vmlinux or kernel, initrd)


def _has_pvh_note(elf: bytes) -> bool:
    """Whether an ELF64 kernel has the Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY),
    which qemu needs to boot an uncompressed kernel."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", elf,
                                                                phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def extract_vmlinux(kernel: Path, out: Path) -> Path | None:
    """Decompress the ELF kernel inside bzImage `kernel` to `out` (reused when there),
    or None when it is not xz, gzip or zstd compressed or has no PVH entry point."""
    if out.is_file():
        return out
    data = kernel.read_bytes()
    for magic, unpack in ((b"\xfd7zXZ\x00", _unxz), (b"\x1f\x8b\x08", _gunzip),
                          (b"\x28\xb5\x2f\xfd", _unzstd)):
        start = data.find(magic)
        while start >= 0:
            try:
                elf = unpack(data[start:])
            except (lzma.LZMAError, zlib.error, EOFError, ValueError):
                elf = b""
            if elf[:4] == b"\x7fELF":
                if not _has_pvh_note(elf):
                    return None
                tmp = out.with_name(out.name + ".tmp")
                tmp.write_bytes(elf)
                tmp.replace(out)
                return out
            start = data.find(magic, start + 1)
    return None


def _unxz(data: bytes) -> bytes:
    return lzma.LZMADecompressor().decompress(data)


def _gunzip(data: bytes) -> bytes:
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)


def _unzstd(data: bytes) -> bytes:
    if shutil.which("zstd") is None:
        return b""
    return subprocess.run(["zstd", "-dc"], input=data, capture_output=True,
                          check=False).stdout


MINI_INIT = r"""#!/bin/sh
# The minimal initramfs of scripts/vmimage.py: load virtio-blk and ext4, mount /dev/vda
# read-write and hand over to its /sbin/init.
PATH=/bin
export PATH
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules/order); do
    insmod "/modules/$m" || echo "NBDVM-ERROR initramfs: insmod $m"
done
n=0
while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
mount -t ext4 -o rw /dev/vda /root || { echo "NBDVM-ERROR initramfs: mount /dev/vda"; \
    poweroff -f; }
umount /proc /sys
mount --move /dev /root/dev
exec switch_root /root /sbin/init
"""

#: Modules the minimal initramfs loads (with what modules.dep says they need, first).
MINI_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")


def kernel_version(kernel: Path) -> str:
    return kernel.name[len("vmlinuz-"):]


def _module_order(moddir: Path, wanted: Sequence[str]) -> list[str]:
    """Paths (relative to `moddir`) of `wanted` modules and their dependencies, each
    after what it depends on, from modules.dep."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        by_name[re.sub(r"\.ko(\.[a-z]+)?$", "", mod.rsplit("/", 1)[-1]).replace("-", "_")] = mod
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        for dep in deps.get(mod, []):
            visit(dep)
        order.append(mod)

    for name in wanted:
        if name not in by_name:  # built into the kernel
            continue
        visit(by_name[name])
    return order


def _module_bytes(path: Path) -> bytes:
    """The module at `path`, decompressed (busybox insmod loads plain .ko files)."""
    data = path.read_bytes()
    if path.suffix == ".xz":
        import lzma
        return lzma.decompress(data)
    if path.suffix == ".gz":
        import gzip
        return gzip.decompress(data)
    if path.suffix == ".zst":
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    return data


def _newc(entries: Sequence[tuple[str, int, bytes, int]]) -> bytes:
    """A cpio archive (newc, what the kernel unpacks) of (name, mode, data, rdev) entries,
    all owned by root."""
    out = bytearray()
    for ino, (name, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", 0)], 1):
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev >> 8, rdev & 0xFF,
                  len(encoded), 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + encoded
        out += bytes(-len(out) % 4)
        out += data
        out += bytes(-len(out) % 4)
    return bytes(out)


def build_initramfs(out: Path, kernel: Path, modules_root: Path = Path("/lib/modules")) -> Path:
    """Write a minimal initramfs for `kernel` to `out`: busybox, MINI_MODULES from
    ``/lib/modules/<version>`` and MINI_INIT. Boots in a fraction of the time of the
    distribution's initrd (no udev, a few hundred KiB instead of tens of MiB)."""
    moddir = modules_root / kernel_version(kernel)
    if not (moddir / "modules.dep").is_file():
        raise FileNotFoundError(f"no {moddir}/modules.dep (the kernel's modules are missing)")
    busybox = find_busybox()
    order = _module_order(moddir, MINI_MODULES)
    dir_mode, file_mode, exe_mode, link_mode = 0o40755, 0o100644, 0o100755, 0o120777
    entries: list[tuple[str, int, bytes, int]] = [
        (d, dir_mode, b"", 0) for d in ("bin", "dev", "proc", "sys", "root", "modules")]
    entries.append(("dev/console", 0o20600, b"", (5 << 8) | 1))
    entries.append(("bin/busybox", exe_mode, busybox.read_bytes(), 0))
    for applet in ("sh", "mount", "umount", "insmod", "sleep", "cat", "switch_root",
                   "poweroff"):
        entries.append((f"bin/{applet}", link_mode, b"busybox", 0))
    names = []
    for mod in order:
        name = re.sub(r"\.ko(\.[a-z]+)?$", ".ko", mod.rsplit("/", 1)[-1])
        names.append(name)
        entries.append((f"modules/{name}", file_mode, _module_bytes(moddir / mod), 0))
    entries.append(("modules/order", file_mode, ("\n".join(names) + "\n").encode(), 0))
    entries.append(("init", exe_mode, MINI_INIT.encode(), 0))
    out.write_bytes(_newc(entries))
    return out


# -- the root filesystem ------------------------------------------------------------------


@dataclass(frozen=True)
class RootImage:
    """A built root filesystem image and what its golden files hold."""

    path: Path
    size: int
    golden_text: str
    golden_md5: str
    scratch_md5: str
    scratch_zeroed_md5: str  # after the init script zeroes SCRATCH_ZEROED of it


def tool(name: str) -> str:
    """The path of command `name`, also looking in /usr/sbin and /sbin (not on a normal
    user's PATH on Debian, where mkfs.ext4, e2fsck and debugfs live)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise FileNotFoundError(f"no {name} (run scripts/install-deps)")
    return found


def find_busybox() -> Path:
    """A statically linked busybox (``busybox-static``)."""
    path = shutil.which("busybox")
    if path is None:
        raise FileNotFoundError("no busybox on PATH (install busybox-static)")
    out = subprocess.run(["file", "-L", path], capture_output=True, text=True,
                         check=False).stdout if shutil.which("file") else ""
    if "dynamically linked" in out:
        raise FileNotFoundError(f"{path} is dynamically linked (install busybox-static)")
    return Path(path)


def build_rootfs(image: Path, *, size: int = 64 * 1024 * 1024, golden_text: str | None = None,
                 seed: int = 1) -> RootImage:
    """Build the root filesystem image at `image` (`size` bytes, ext4); see the module note.

    `golden_text` (one line, default a fresh random token) goes into ``/golden.txt``;
    ``/golden.bin`` is GOLDEN_BIN_BYTES of bytes from `seed`."""
    if golden_text is None:
        golden_text = f"golden-{random.SystemRandom().getrandbits(64):016x}"
    if not re.fullmatch(r"[A-Za-z0-9._-]+", golden_text):
        raise ValueError(f"golden text must be one word of [A-Za-z0-9._-]: {golden_text!r}")
    busybox = find_busybox()
    mkfs = tool("mkfs.ext4")
    root = image.parent / f"{image.name}.root"
    if root.exists():
        shutil.rmtree(root)
    try:
        for d in ("bin", "sbin", "proc", "sys", "dev", "run", "tmp", "data", "mnt", "root",
                  "etc"):
            (root / d).mkdir(parents=True)
        shutil.copy2(busybox, root / "bin" / "busybox")
        (root / "bin" / "busybox").chmod(0o755)
        applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True,
                                 check=True).stdout.split()
        for applet in applets:
            if applet != "busybox" and not (root / "bin" / applet).exists():
                (root / "bin" / applet).symlink_to("busybox")
        init = root / "sbin" / "init"
        init.write_text(INIT)
        init.chmod(0o755)
        (root / "init").symlink_to("sbin/init")
        (root / "golden.txt").write_text(golden_text + "\n")
        rng = random.Random(seed)
        payload = rng.randbytes(GOLDEN_BIN_BYTES)
        (root / "golden.bin").write_bytes(payload)
        scratch = rng.randbytes(SCRATCH_BYTES)
        (root / "scratch.bin").write_bytes(scratch)
        zeroed = scratch[:SCRATCH_ZEROED[0]] + bytes(SCRATCH_ZEROED[1] - SCRATCH_ZEROED[0]) \
            + scratch[SCRATCH_ZEROED[1]:]
        (root / "etc" / "hostname").write_text("nbdvm\n")
        image.unlink(missing_ok=True)
        subprocess.run([mkfs, "-q", "-F", "-t", "ext4", "-L", "nbdvm", "-E", "root_owner=0:0",
                        "-d", str(root), str(image), f"{size // 1024}k"],
                       check=True, capture_output=True, text=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return RootImage(path=image, size=image.stat().st_size, golden_text=golden_text,
                     golden_md5=hashlib.md5(payload).hexdigest(),
                     scratch_md5=hashlib.md5(scratch).hexdigest(),
                     scratch_zeroed_md5=hashlib.md5(zeroed).hexdigest())


# -- booting ----------------------------------------------------------------------------------


@dataclass
class Boot:
    """What one boot printed: console lines with the seconds since qemu started."""

    name: str
    returncode: int | None = None
    lines: list[tuple[float, str]] = field(default_factory=list)
    end_seconds: float | None = None  # qemu start -> NBDVM-END
    total_seconds: float = 0.0  # qemu start -> qemu exit
    timed_out: bool = False

    @property
    def console(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def markers(self, kind: str) -> list[str]:
        """The rest of each ``NBDVM-<kind> ...`` line, in order."""
        prefix = f"{MARK}{kind} "
        out = []
        for _, line in self.lines:
            i = line.find(prefix)
            if i >= 0:
                out.append(line[i + len(prefix):].strip())
        return out

    def marker(self, kind: str) -> str | None:
        found = self.markers(kind)
        return found[-1] if found else None

    @property
    def saw(self) -> dict[str, str]:
        """Files in /data at boot: name -> text (.txt) or md5 (others)."""
        out = {}
        for item in self.markers("SAW"):
            fname, _, value = item.partition(" ")
            out[fname] = value
        return out

    @property
    def wrote_md5(self) -> str | None:
        item = self.marker("WROTE")
        return item.partition(" ")[2] if item else None

    @property
    def reread_md5(self) -> str | None:
        item = self.marker("REREAD")
        return item.partition(" ")[2] if item else None

    @property
    def ok(self) -> bool:
        return (self.end_seconds is not None and not self.markers("ERROR")
                and self.returncode == 0)


def disk_args(drive: str, *, blockdev: bool = False,
              reconnect_delay: int | None = None) -> list[str]:
    """qemu arguments attaching `drive` as a virtio disk (TRIM passed through, zero writes
    sent as WRITE_ZEROES). `drive` is a file or an NBD URI; with `blockdev`, which needs
    an ``nbd+unix:///EXPORT?socket=PATH`` URI, qemu's NBD driver is configured through
    ``-blockdev`` instead of ``-drive file=URI``, and `reconnect_delay` (seconds) lets it
    reconnect to a restarted server, holding the guest's requests meanwhile."""
    if not blockdev:
        return ["-drive", f"file={drive},format=raw,if=virtio,cache=none,discard=unmap,"
                          "detect-zeroes=unmap"]
    m = re.fullmatch(r"nbd\+unix:///([^?]*)\?socket=(.+)", drive)
    if m is None:
        raise ValueError(f"blockdev wants nbd+unix:///EXPORT?socket=PATH, not {drive!r}")
    node: dict[str, Any] = {
        "driver": "raw", "node-name": "vda", "discard": "unmap", "detect-zeroes": "unmap",
        "cache": {"direct": True},
        "file": {"driver": "nbd", "export": m.group(1),
                 "server": {"type": "unix", "path": m.group(2)}}}
    if reconnect_delay is not None:
        node["file"]["reconnect-delay"] = reconnect_delay
    return ["-blockdev", json.dumps(node), "-device", "virtio-blk-pci,drive=vda"]


def qemu_command(drive: str, name: str, *, boot_files: BootFiles, memory: str = "512M",
                 blockdev: bool = False, reconnect_delay: int | None = None,
                 extra_append: str = "") -> list[str]:
    """The qemu command line booting `drive` (an NBD URI or a file) as /dev/vda."""
    append = (f"console=ttyS0 root=/dev/vda rootfstype=ext4 rw fsck.mode=skip panic=-1 "
              f"quiet loglevel=3 init=/sbin/init vmname={name} {extra_append}").strip()
    return [
        "qemu-system-x86_64", "-accel", "tcg", "-m", memory, "-smp", "1",
        "-nodefaults", "-display", "none", "-no-reboot", "-no-user-config",
        "-serial", "stdio", "-monitor", "none",
        "-kernel", str(boot_files.kernel), "-initrd", str(boot_files.initrd),
        "-append", append,
        *disk_args(drive, blockdev=blockdev, reconnect_delay=reconnect_delay),
    ]


class Vm:
    """A running VM (``start``), then its :class:`Boot` (``wait``)."""

    def __init__(self, drive: str, name: str, *, boot_files: BootFiles | None = None,
                 log: Path | None = None, echo: bool = False, blockdev: bool = False,
                 reconnect_delay: int | None = None, extra_args: Sequence[str] = ()) -> None:
        self.boot_files = boot_files or debian_boot()
        self.cmd = [*qemu_command(drive, name, boot_files=self.boot_files, blockdev=blockdev,
                                  reconnect_delay=reconnect_delay), *extra_args]
        self.boot = Boot(name)
        self.log = log
        self.echo = echo
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._start = 0.0

    def start(self) -> Vm:
        self._start = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        logf = open(self.log, "w") if self.log else None  # noqa: SIM115
        try:
            for raw in self.proc.stdout:
                now = time.monotonic() - self._start
                line = raw.decode(errors="replace").rstrip("\r\n")
                self.boot.lines.append((now, line))
                if f"{MARK}END " in line and self.boot.end_seconds is None:
                    self.boot.end_seconds = now
                if logf:
                    logf.write(f"[{now:7.2f}] {line}\n")
                    logf.flush()
                if self.echo:
                    print(f"    {self.boot.name} [{now:6.2f}s] {line}", flush=True)
        finally:
            if logf:
                logf.close()

    def elapsed(self) -> float:
        """Seconds since qemu started (the clock of the console timestamps)."""
        return time.monotonic() - self._start

    def wait_for(self, kind: str, timeout: float = 180.0) -> bool:
        """Wait until the console has shown an ``NBDVM-<kind>`` line (True), or qemu
        exited or `timeout` passed without one (False)."""
        deadline = time.monotonic() + timeout
        while not self.boot.markers(kind):
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                return bool(self.boot.markers(kind))
            time.sleep(0.02)
        return True

    def wait(self, timeout: float = 180.0) -> Boot:
        assert self.proc is not None and self._reader is not None, "not started"
        try:
            self.boot.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.boot.timed_out = True
            self.kill()
        self._reader.join(10)
        self.boot.total_seconds = time.monotonic() - self._start
        return self.boot

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.boot.returncode = self.proc.wait(30)


def boot(drive: str, name: str, *, timeout: float = 180.0, **kwargs: Any) -> Boot:
    """Boot `drive` as VM `name` until it powers off (see :class:`Vm`)."""
    vm = Vm(drive, name, **kwargs)
    try:
        return vm.start().wait(timeout)
    finally:
        vm.kill()


def boot_problems(boot: Boot, root: RootImage, expect_saw: dict[str, str], *,
                  scratch: bool = True) -> list[str]:
    """What is wrong with `boot` (empty when nothing): it must have run init to the end
    and powered off, seen golden's files, exactly `expect_saw` in /data (name -> text of
    a .txt, md5 of others), golden's /scratch.bin unless an ancestor deleted it
    (`scratch` False), trimmed something, and read its own file back intact."""
    problems = []

    def expect(what: str, got: object, want: object) -> None:
        if got != want:
            problems.append(f"{what}: got {got!r}, expected {want!r}")

    if boot.timed_out:
        problems.append("did not power off in time")
    problems += [f"init failed: {e}" for e in boot.markers("ERROR")]
    if boot.end_seconds is None:
        problems.append(f"never printed {MARK}END")
    expect("qemu exit status", boot.returncode, 0)
    expect("BEGIN", boot.markers("BEGIN"), [boot.name])
    expect("/golden.txt", boot.marker("GOLDEN"), root.golden_text)
    expect("md5 of /golden.bin", boot.marker("GOLDEN-MD5"), root.golden_md5)
    expect("files in /data", boot.saw, expect_saw)
    expect("md5 of /scratch.bin", boot.marker("SCRATCH"),
           root.scratch_md5 if scratch else "absent")
    expect("md5 of /scratch.bin after zeroing part", boot.marker("SCRATCH-ZEROED"),
           root.scratch_zeroed_md5 if scratch else None)
    trim = boot.marker("TRIM") or ""
    if not re.fullmatch(r"[1-9][0-9]* bytes trimmed", trim):
        problems.append(f"fstrim trimmed nothing: {trim!r}")
    if not boot.wrote_md5:
        problems.append("wrote nothing")
    expect("md5 of its file read back", boot.reread_md5, boot.wrote_md5)
    expect("END", boot.marker("END"),
           f"{boot.name} golden={root.golden_text} saw={','.join(sorted(expect_saw))}")
    return problems
