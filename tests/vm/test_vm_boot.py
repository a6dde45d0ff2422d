"""Real VMs booting from forks of a golden volume served by nbdserver.

For every registered block-map design (radix at least; extent and linear run
too once they register themselves), in a pool with 64 KiB chunks:

1. ``pool create`` and ``volume create golden`` (offline CLI), then a server
   exporting golden read-write; the root image built by ``scripts/vmimage.py``
   is written into it with ``qemu-img convert`` over NBD.
2. ``volume fork golden vm1`` with no server running (the offline path).
3. A server exporting vm1 (and golden, read-only): qemu boots vm1 with its disk
   on ``-drive file=nbd+unix://...,if=virtio,cache=none`` (for radix, with
   Debian's own kernel and initrd, ``root=/dev/vda``; the guest's I/O is the
   same either way, so the other designs save the time and boot ``fast``).
   While it boots, ``volume fork golden vm3`` and, while its init writes,
   ``volume snapshot vm1 vm1-live`` go through the server's control socket;
   after it powers off, so does ``volume fork vm1 vm2`` (vm1 still exported).
   A design that cannot fork a fork (linear) must refuse vm2 instead (and gets
   no vm1-live).
   The server also serves the pool's volumes named vm* by pattern: vm3 is listed
   (``nbdinfo --list``) as soon as it is forked.
4. A server serving vm2 and vm3 by pattern (``volumes: vm[23]``) boots both VMs
   at once (``-blockdev`` with ``reconnect-delay``, and the ``fast`` boot of
   scripts/vmimage.py: the same kernel unpacked, a minimal initramfs, half the
   time), and is restarted
   (SIGTERM, start) while they write: qemu reconnects and the guests carry on.
5. Each VM's console (see the init script in scripts/vmimage.py) shows golden's
   content, only the files its ancestors and itself wrote (vm2 sees vm1's, vm3
   does not), golden's /scratch.bin unless an ancestor deleted it, and its own
   writes, zero writes (WRITE_ZEROES) and fstrim (TRIM) read back intact after
   dropping the guest's page cache.
6. With the last server still up: golden compares byte for byte with the image
   (``qemu-img compare``), though every fork trimmed and zeroed chunks it
   shares with golden; every volume's filesystem is copied out over NBD and
   passes ``e2fsck -fn`` and holds exactly the /data files expected (vm1 does
   not see vm2's writes); vm1-live is crash-consistent (once e2fsck has replayed
   its journal, only the superblock's free counts may be stale); ``pool check``
   is clean through the control socket, then again offline.

The seconds from starting qemu to the init script's final line are printed
(``-s`` shows them); ``scripts/vm-demo`` measures them properly.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import pytest
from conftest import REPO, SERVER_CMD, NbdServerProcess, ServerFactory, run

from nbdserver.blockmap.base import designs

sys.path.insert(0, str(REPO / "scripts"))
import vmimage
from vmimage import Boot, BootFiles, RootImage, Vm

DESIGNS = sorted(designs())
assert "radix" in DESIGNS, DESIGNS
IMAGE_SIZE = 64 * 1024 * 1024
CHUNK = "64K"  # larger than ext4's 4 KiB blocks: the guest's writes are partial-chunk CoWs
BOOT_TIMEOUT = 240.0
DEBIAN_BOOT_DESIGN = "radix"  # its vm1 boots Debian's own initrd; the rest boot "fast"
#: What e2fsck may still find in a crash-consistent ext4 once its journal is replayed.
STALE_SUPER_COUNT = re.compile(r"Free (blocks|inodes) count wrong \(\d+, counted=\d+\)\.")
RECONNECT_DELAY = 60  # seconds qemu holds requests while the server restarts

pytestmark = [pytest.mark.slow, pytest.mark.vm]


@pytest.fixture(scope="module")
def boot_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BootFiles]:
    """Both boot profiles of scripts/vmimage.py for the newest kernel in /boot."""
    for name in ("qemu-system-x86_64", "qemu-img", "mkfs.ext4", "debugfs", "e2fsck",
                 "busybox"):
        vmimage.tool(name)  # FileNotFoundError naming scripts/install-deps
    fast = vmimage.fast_boot(tmp_path_factory.mktemp("kernel"))
    assert fast.kernel.name.startswith("vmlinux-"), "the kernel did not unpack for a PVH boot"
    return {"debian": vmimage.debian_boot(), "fast": fast}


@pytest.fixture(scope="module")
def root_image(tmp_path_factory: pytest.TempPathFactory) -> RootImage:
    return vmimage.build_rootfs(tmp_path_factory.mktemp("rootfs") / "root.img", size=IMAGE_SIZE)


def cli(*args: str | Path, check: bool = True) -> Any:
    """Run ``nbdserver ARGS --json`` and return the parsed output."""
    proc = run([*SERVER_CMD, *args, "--json"], timeout=120, check=check)
    return json.loads(proc.stdout) if proc.returncode == 0 else proc


def serve(factory: ServerFactory, pool: Path, name: str, exports: list[tuple[str, bool]],
          volumes: str | None = None) -> NbdServerProcess:
    """A server holding `pool`, exporting volumes (name, read_only), and with `volumes`
    the pool's other volumes whose names match it."""
    return factory(
        [*({"name": vol, "pool": "p", "volume": vol, **({"read-only": True} if ro else {})}
           for vol, ro in exports),
         *([{"pool": "p", "volumes": volumes}] if volumes else [])],
        pools=[{"name": "p", "path": pool}], tcp=False, name=name)


def check_boot(boot: Boot, root: RootImage, expect_saw: dict[str, str], *,
               scratch: bool = True) -> None:
    """See :func:`vmimage.boot_problems`."""
    problems = vmimage.boot_problems(boot, root, expect_saw, scratch=scratch)
    assert not problems, "\n".join([f"{boot.name}:", *problems,
                                     f"--- console of {boot.name}", boot.console])


def e2fsck(*args: str | Path) -> CompletedProcess[str]:
    return run([vmimage.tool("e2fsck"), *args], check=False, timeout=60)


def debugfs(request: str, image: Path) -> str:
    return run([vmimage.tool("debugfs"), "-R", request, image], timeout=60).stdout


def data_files(srv: NbdServerProcess, vol: str, workdir: Path, *,
               replay: bool = False) -> dict[str, str]:
    """Copy volume `vol` out over NBD, fsck it, and return /data's files: the text of
    the .txt files and the md5 of the others. With `replay` (a volume snapshotted while
    its VM was writing: crash-consistent, not clean) e2fsck first replays the journal,
    and then may find the superblock's total free counts wrong (ext4 keeps them up to
    date in memory only) but nothing else."""
    copy = workdir / f"{vol}.copy"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.unix_uri(vol), copy], timeout=120)
    if replay:
        fsck = e2fsck("-E", "journal_only", "-p", copy)
        assert fsck.returncode in (0, 1), f"journal replay of {vol}:\n{fsck.stdout}{fsck.stderr}"
    fsck = e2fsck("-fn", copy)
    lines = fsck.stdout.splitlines()
    problems = [lines[i - 1] for i, line in enumerate(lines) if line.startswith("Fix? no")]
    if replay:
        problems = [p for p in problems if not STALE_SUPER_COUNT.fullmatch(p)]
    assert not problems and fsck.returncode in ((0, 4) if replay else (0,)), \
        f"e2fsck of {vol}:\n{fsck.stdout}{fsck.stderr}"
    listing = debugfs("ls -p /data", copy)
    out = {}
    for line in listing.splitlines():
        fields = line.strip("/").split("/")  # /inode/mode/uid/gid/name/size/
        if len(fields) >= 6 and fields[4] not in (".", "..", "lost+found"):
            name = fields[4]
            if name.endswith(".txt"):
                out[name] = debugfs(f"cat /data/{name}", copy).strip()
            else:
                dumped = workdir / f"{vol}.{name}"
                debugfs(f"dump /data/{name} {dumped}", copy)
                out[name] = hashlib.md5(dumped.read_bytes()).hexdigest()
                dumped.unlink()
    copy.unlink()
    return out


@pytest.fixture
def vms() -> Iterator[list[Vm]]:
    started: list[Vm] = []
    yield started
    for vm in started:
        vm.kill()


@pytest.mark.parametrize("design", DESIGNS)
def test_vms_boot_from_forks_of_golden(design: str, boot_files: dict[str, BootFiles],
                                        root_image: RootImage, tmp_path: Path,
                                        nbd_server_factory: ServerFactory,
                                        vms: list[Vm]) -> None:
    pool = tmp_path / "pool.img"
    chain = designs()[design].supports_clone_of_clone
    cli("pool", "create", pool, "--size", "512M", "--blockmap", design, "--chunk-size", CHUNK)
    cli("volume", "create", pool, "golden", "--size", str(IMAGE_SIZE))

    def start_vm(srv: NbdServerProcess, name: str, profile: str, blockdev: bool = False) -> Vm:
        vm = Vm(srv.unix_uri(name), name, boot_files=boot_files[profile],
                log=tmp_path / f"{name}.console", blockdev=blockdev,
                reconnect_delay=RECONNECT_DELAY if blockdev else None)
        vms.append(vm)
        return vm.start()

    # 1. Load the root image into golden through the server.
    srv = serve(nbd_server_factory, pool, "load", [("golden", False)])
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", root_image.path,
         srv.unix_uri("golden")], timeout=120)
    srv.stop()

    # 2. Offline fork.
    assert cli("volume", "fork", pool, "golden", "vm1")["parent"] == "golden"

    # 3. Boot vm1; fork through the control socket while it runs and after it stops.
    srv = serve(nbd_server_factory, pool, "vm1", [("vm1", False), ("golden", True)],
                volumes="vm*")
    vm = start_vm(srv, "vm1", "debian" if design == DEBIAN_BOOT_DESIGN else "fast")
    vm3 = cli("volume", "fork", pool, "golden", "vm3")
    assert vm3["parent"] == "golden" and vm3["depth"] == 1
    listing = json.loads(run(["nbdinfo", "--json", "--list", srv.unix_uri()]).stdout)
    assert [e["export-name"] for e in listing["exports"]] == ["vm1", "golden", "vm3"]
    listed = {v["name"]: v for v in cli("volume", "list", pool)}
    assert listed["vm1"]["in_use"] == "export 'vm1'", listed  # (only the server knows)
    assert listed["golden"]["in_use"] == "export 'golden' (read-only)", listed
    if chain:  # a snapshot of vm1 while its VM writes (checked for consistency in step 5)
        assert vm.wait_for("SCRATCH", BOOT_TIMEOUT), vm.boot.console
        live = cli("volume", "snapshot", pool, "vm1", "vm1-live")
        assert live["parent"] == "vm1" and live["read_only"], live
    vm1 = vm.wait(BOOT_TIMEOUT)
    check_boot(vm1, root_image, {})
    srv.assert_alive()
    if chain:
        vm2 = cli("volume", "fork", pool, "vm1", "vm2")
        assert vm2["parent"] == "vm1" and vm2["depth"] == 2
    else:
        refused = cli("volume", "fork", pool, "vm1", "vm2", check=False)
        assert refused.returncode == 1 and "error" in refused.stderr, refused.stderr
    srv.stop()

    # 4. Boot vm2 and vm3 at once, restarting the server under them.
    children = ["vm2", "vm3"] if chain else ["vm3"]
    live_export = [("vm1-live", True)] if chain else []
    srv = serve(nbd_server_factory, pool, "children",  # (children: served by pattern)
                [("golden", True), ("vm1", True), *live_export], volumes="vm[23]")
    started = [start_vm(srv, c, "fast", blockdev=True) for c in children]
    # Restart the server under the running VMs once the first is writing: qemu reconnects.
    assert started[0].wait_for("SCRATCH", BOOT_TIMEOUT), started[0].boot.console
    srv.stop()
    srv.start()
    restarted = {v.boot.name: v.elapsed() for v in started}
    boots = {v.boot.name: v.wait(BOOT_TIMEOUT) for v in started}
    # 5. What each VM saw.
    vm1_files = {"vm1.txt": "hello from vm1", "vm1.bin": vm1.wrote_md5 or "?"}
    if chain:
        check_boot(boots["vm2"], root_image, vm1_files, scratch=False)
    check_boot(boots["vm3"], root_image, {})
    # At least the first VM still had writing to do (its remount read-only flushes).
    first = boots[children[0]]
    assert (first.end_seconds or 0) > restarted[first.name], first.console
    times = {b.name: round(b.end_seconds or 0, 1) for b in [vm1, *boots.values()]}
    print(f"\n{design}: seconds from qemu start to the final marker: {times}")

    # 6. Golden is unchanged, and each volume holds only its own and its ancestors' files.
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", root_image.path,
         srv.unix_uri("golden")], timeout=120)
    wrote = {b.name: {f"{b.name}.txt": f"hello from {b.name}", f"{b.name}.bin": b.wrote_md5}
             for b in [vm1, *boots.values()]}
    expect = {"vm1": wrote["vm1"], "vm3": wrote["vm3"],
              "vm2": {**wrote["vm1"], **wrote.get("vm2", {})}}
    for vol in ["vm1", *children]:
        assert data_files(srv, vol, tmp_path) == expect[vol], vol
    assert data_files(srv, "golden", tmp_path) == {}
    if chain:
        assert set(data_files(srv, "vm1-live", tmp_path, replay=True)) <= set(expect["vm1"])
    report = cli("pool", "check", pool)
    assert report["ok"] and not report["problems"], report
    srv.stop()

    # ... and the pool is clean offline too, with the expected family tree.
    report = cli("pool", "check", pool)
    assert report["ok"] and not report["problems"], report
    assert report["volumes"] == 2 + len(children) + len(live_export), report
    parents = {v["name"]: v["parent"] for v in cli("volume", "list", pool)}
    assert parents == {"golden": None, "vm1": "golden", "vm3": "golden",
                       **({"vm2": "vm1", "vm1-live": "vm1"} if chain else {})}
