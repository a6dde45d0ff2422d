"""The VM test's own machinery (scripts/vmimage.py), without booting anything: the root
image, the initramfs archive, and that :func:`vmimage.boot_problems` catches each way a
boot can go wrong, so that test_vm_boot.py cannot pass on a VM that saw the wrong thing."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from conftest import REPO, run

sys.path.insert(0, str(REPO / "scripts"))
import vmimage
from vmimage import Boot, RootImage

ROOT = RootImage(path=Path("root.img"), size=0, golden_text="golden-x", golden_md5="g" * 32,
                 scratch_md5="s" * 32, scratch_zeroed_md5="z" * 32)
GOOD_VM2 = """\
Linux version 6.1.0
NBDVM-BEGIN vm2
NBDVM-GOLDEN golden-x
NBDVM-GOLDEN-MD5 gggggggggggggggggggggggggggggggg
NBDVM-SAW vm1.bin 11111111111111111111111111111111
NBDVM-SAW vm1.txt hello from vm1
NBDVM-SCRATCH absent
NBDVM-WROTE vm2.bin 22222222222222222222222222222222
NBDVM-TRIM 48552960 bytes trimmed
NBDVM-REREAD vm2.bin 22222222222222222222222222222222
NBDVM-END vm2 golden=golden-x saw=vm1.bin,vm1.txt
reboot: Power down"""
VM1_FILES = {"vm1.txt": "hello from vm1", "vm1.bin": "1" * 32}


def fake_boot(console: str, name: str = "vm2", returncode: int = 0) -> Boot:
    boot = Boot(name, returncode=returncode)
    boot.lines = [(float(i), line) for i, line in enumerate(console.splitlines())]
    boot.end_seconds = next((t for t, line in boot.lines if "NBDVM-END" in line), None)
    return boot


def test_boot_problems_accepts_a_good_boot() -> None:
    assert vmimage.boot_problems(fake_boot(GOOD_VM2), ROOT, VM1_FILES, scratch=False) == []


@pytest.mark.parametrize(("old", "new", "complaint"), [
    ("NBDVM-GOLDEN golden-x", "NBDVM-GOLDEN golden-y", "/golden.txt"),
    ("NBDVM-GOLDEN-MD5 g", "NBDVM-GOLDEN-MD5 h", "md5 of /golden.bin"),
    ("NBDVM-SAW vm1.txt hello from vm1\n", "", "files in /data"),
    ("NBDVM-SAW vm1.txt hello from vm1", "NBDVM-SAW vm1.txt hello from vm9", "files in /data"),
    ("NBDVM-SCRATCH absent", "NBDVM-SCRATCH " + "s" * 32, "md5 of /scratch.bin"),
    ("NBDVM-TRIM 48552960", "NBDVM-TRIM 0", "fstrim"),
    ("NBDVM-REREAD vm2.bin 2", "NBDVM-REREAD vm2.bin 3", "read back"),
    ("NBDVM-END vm2 golden=golden-x saw=vm1.bin,vm1.txt\n", "", "never printed"),
    ("NBDVM-BEGIN vm2", "NBDVM-BEGIN vm2\nNBDVM-ERROR remount rw", "init failed"),
    ("NBDVM-BEGIN vm2", "NBDVM-BEGIN vm1", "BEGIN"),
])
def test_boot_problems_catches(old: str, new: str, complaint: str) -> None:
    assert old in GOOD_VM2
    problems = vmimage.boot_problems(fake_boot(GOOD_VM2.replace(old, new)), ROOT, VM1_FILES,
                                     scratch=False)
    assert any(complaint in p for p in problems), problems


def test_boot_problems_catches_a_crash_and_a_fork_that_sees_a_sibling() -> None:
    assert "qemu exit status" in " ".join(
        vmimage.boot_problems(fake_boot(GOOD_VM2, returncode=1), ROOT, VM1_FILES,
                              scratch=False))
    # vm3 (a fork of golden) must not see vm1's files, and must see /scratch.bin
    problems = vmimage.boot_problems(fake_boot(GOOD_VM2.replace("vm2", "vm3"), "vm3"), ROOT, {})
    assert any("files in /data" in p for p in problems), problems
    assert any("/scratch.bin" in p for p in problems), problems


def debugfs(request: str, image: Path) -> str:
    return run([vmimage.tool("debugfs"), "-R", request, image]).stdout


def test_root_image_holds_busybox_init_and_golden(tmp_path: Path) -> None:
    root = vmimage.build_rootfs(tmp_path / "root.img", size=32 * 1024 * 1024,
                                golden_text="golden-test")
    assert root.size == 32 * 1024 * 1024 and root.golden_text == "golden-test"
    assert root.scratch_md5 != root.scratch_zeroed_md5
    run([vmimage.tool("e2fsck"), "-fn", root.path])
    ls = debugfs("ls -p /", root.path)
    for name in ("bin", "sbin", "proc", "sys", "dev", "data", "golden.txt", "golden.bin",
                 "scratch.bin"):
        assert f"/{name}/" in ls, ls
    assert debugfs("cat /golden.txt", root.path) == "golden-test\n"
    init = debugfs("cat /sbin/init", root.path)
    assert init == vmimage.INIT
    stat = debugfs("stat /sbin/init", root.path)
    assert "Mode:  0755" in stat, stat
    assert "/busybox/" in debugfs("ls -p /bin", root.path)


def test_initramfs_is_a_cpio_with_init_console_and_modules(tmp_path: Path) -> None:
    kernel, _ = vmimage.find_kernel()
    out = vmimage.build_initramfs(tmp_path / "initramfs.cpio", kernel)
    assert shutil.which("cpio"), "cpio is missing: run scripts/install-deps"
    listing = run(["cpio", "-itv", "-F", out]).stdout
    names = {line.split()[-1] if "->" not in line else line.split()[-3]
             for line in listing.splitlines()}
    for name in ("init", "bin/busybox", "bin/switch_root", "dev/console", "modules/order",
                 "modules/virtio_blk.ko", "modules/ext4.ko"):
        assert name in names, listing
    assert any(line.startswith("crw") and line.endswith("dev/console")
               for line in listing.splitlines()), listing
    order = run(["sh", "-c", 'cpio -i --quiet --to-stdout modules/order < "$1"', "sh",
                 out]).stdout.split()
    # every module comes after what it needs (Debian builds all of these as modules)
    assert order.index("virtio.ko") < order.index("virtio_pci.ko") < order.index("ext4.ko")
    assert order.index("virtio_ring.ko") < order.index("virtio_blk.ko")
    assert order.index("jbd2.ko") < order.index("ext4.ko")
    assert len(order) == len(set(order))
