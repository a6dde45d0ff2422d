"""Opening files and block devices with O_DIRECT: alignment, creation, sizes, errors,
and the blocking discard/zero/flush helpers.

Files live under tmp_path (ext4 on a 512-byte-sector disk here); block devices
are loop devices (``loop_device``), with 512- or 4096-byte sectors, which also
lets a filesystem on a 4 KiB-sector disk be tested.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import pattern, require_root, run

from nbdserver.errors import UserError
from nbdserver.storage import device as device_mod
from nbdserver.storage.buffers import AlignedBuffer
from nbdserver.storage.device import BlockDevice, open_device

KiB = 1024
MiB = 1024 * KiB
LoopFactory = Callable[..., Path]


def direct_write(dev: BlockDevice, offset: int, data: bytes) -> None:
    buf = AlignedBuffer(max(4096, len(data)), 12)
    try:
        buf.view[:len(data)] = data
        dev.pwrite(buf, len(data), offset)
    finally:
        buf.close()


def direct_read(dev: BlockDevice, offset: int, length: int) -> bytes:
    buf = AlignedBuffer(max(4096, length), 12)
    try:
        n = dev.pread(buf, length, offset)
        return bytes(buf.view[:n])
    finally:
        buf.close()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


# -- opening files --------------------------------------------------------------------------


def test_create_sparse_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "new.img"  # parents are created
    dev = open_device(path, create_size=16 * MiB)
    try:
        assert dev.size == 16 * MiB == path.stat().st_size
        assert allocated(path) == 0  # sparse
        assert not dev.is_block_device and not dev.read_only
        assert dev.fast_zero
        assert fcntl.fcntl(dev.fd, fcntl.F_GETFL) & os.O_DIRECT, "not opened with O_DIRECT"
        assert not os.get_inheritable(dev.fd)
    finally:
        dev.close()
        dev.close()  # idempotent
    assert dev.fd == -1


def test_existing_file_keeps_its_size_and_data(tmp_path: Path) -> None:
    path = tmp_path / "old.img"
    data = pattern(3 * MiB, seed=1)
    path.write_bytes(data)
    dev = open_device(path, create_size=99 * MiB)  # ignored: the file exists
    try:
        assert dev.size == 3 * MiB
        assert direct_read(dev, 1 * MiB, 64 * KiB) == data[1 * MiB:1 * MiB + 64 * KiB]
    finally:
        dev.close()
    assert path.read_bytes() == data


def test_an_empty_file_is_refused_with_a_way_out(tmp_path: Path) -> None:
    """A size creates a missing file only: an empty one is never resized (another process
    may be making it), and the error says what to do."""
    path = tmp_path / "touched.img"
    path.touch()
    for create_size in (None, 8 * MiB):
        with pytest.raises(UserError, match=r"the file is empty \(an export's size: only "
                                            r"creates a missing file; delete"):
            open_device(path, create_size=create_size)
    assert path.stat().st_size == 0


def test_alignment_on_this_filesystem(tmp_path: Path) -> None:
    """The probed alignment is one that direct I/O accepts, and half of it is not."""
    path = tmp_path / "a.img"
    path.write_bytes(pattern(1 * MiB, seed=2))  # data, so reads do reach the disk
    dev = open_device(path)
    try:
        assert dev.alignment in (512, 4096)
        direct_read(dev, dev.alignment, dev.alignment)
        with pytest.raises(OSError) as exc:
            direct_read(dev, dev.alignment // 2, dev.alignment)
        assert exc.value.errno == errno.EINVAL
    finally:
        dev.close()


def test_alignment_fallback_without_statx(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel does not report the direct-I/O alignment, it is probed by
    reading data; a file with no data (a read of a hole accepts any alignment) gets
    4096, which every device accepts."""
    monkeypatch.setattr(device_mod, "_statx_dio_alignment", lambda fd: None)
    sparse = open_device(tmp_path / "sparse.img", create_size=1 * MiB)
    assert sparse.alignment == 4096
    sparse.close()
    full = tmp_path / "full.img"
    full.write_bytes(bytes(8 * KiB) + pattern(8 * KiB))
    dev = open_device(full)
    assert dev.alignment == 512  # this disk has 512-byte sectors
    dev.close()


def test_statx_reports_this_filesystem(tmp_path: Path) -> None:
    """The kernel here (6.x) reports STATX_DIOALIGN for ext4: the main path is used."""
    path = tmp_path / "s.img"
    path.write_bytes(bytes(4096))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert device_mod._statx_dio_alignment(fd) == 512
    finally:
        os.close(fd)


FOUR_K_SCRIPT = """
import os, sys
from nbdserver.storage import device
from nbdserver.storage.buffers import AlignedBuffer
if sys.argv[2] == "fallback":
    device._statx_dio_alignment = lambda fd: None
mnt = sys.argv[1]
with open(os.path.join(mnt, "data.img"), "wb") as f:
    f.write(os.urandom(1 << 20))
out = []
for name in ("sparse.img", "data.img"):
    dev = device.open_device(os.path.join(mnt, name), create_size=1 << 20)
    buf = AlignedBuffer(4096, 12)
    dev.pwrite(buf, dev.alignment, dev.alignment)   # the probed alignment must work
    out.append(dev.alignment)
print(out)
"""


@pytest.mark.parametrize("path", ["statx", "fallback"])
def test_alignment_on_a_4k_sector_filesystem(loop_device: LoopFactory, tmp_path: Path,
                                             path: str) -> None:
    """ext4 on a disk with 4 KiB logical sectors: 512-byte direct I/O fails there, so a
    new sparse file must not be probed as 512-aligned (its reads hit no disk)."""
    require_root("it mounts a filesystem in a private mount namespace")
    dev = loop_device("64M", sector_size=4096)
    run(["mkfs.ext4", "-q", "-F", dev])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = f"'{sys.executable}' -c \"$SCRIPT\" '{mnt}' {path}"
    proc = run(["unshare", "-m", "sh", "-c", f"mount '{dev}' '{mnt}' && {script}"],
               env={**os.environ, "SCRIPT": FOUR_K_SCRIPT}, timeout=60)
    assert proc.stdout.strip() == "[4096, 4096]"


def test_read_only(tmp_path: Path) -> None:
    path = tmp_path / "r.img"
    path.write_bytes(pattern(64 * KiB))
    dev = open_device(path, read_only=True)
    try:
        assert dev.read_only
        with pytest.raises(OSError) as exc:
            direct_write(dev, 0, bytes(4096))
        assert exc.value.errno == errno.EBADF
        with pytest.raises(OSError):
            dev.discard(0, 4096)
    finally:
        dev.close()
    assert path.read_bytes() == pattern(64 * KiB)


@pytest.mark.parametrize("case", ["missing", "empty", "directory", "fifo", "socket",
                                  "parent-is-a-file", "dev-null"])
def test_open_errors_name_the_path(tmp_path: Path, case: str) -> None:
    path = tmp_path / "x"
    create: int | None = None
    if case == "empty":
        path.touch()
    elif case == "directory":
        path.mkdir()
    elif case == "fifo":
        os.mkfifo(path)
    elif case == "socket":
        import socket
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    elif case == "parent-is-a-file":
        path.touch()
        path = path / "child.img"
        create = 1 * MiB
    elif case == "dev-null":
        path = Path("/dev/null")
    start = time.monotonic()
    with pytest.raises(UserError) as exc:
        open_device(path, create_size=create)
    assert time.monotonic() - start < 5  # a FIFO must not block the open
    assert str(path) in str(exc.value)
    words = {"missing": "no such file", "empty": "empty", "directory": "not a regular file",
             "fifo": "not a regular file", "socket": "not a regular file",
             "parent-is-a-file": "Not a directory", "dev-null": "not a regular file"}
    assert words[case] in str(exc.value)


def test_no_descriptor_leaks_on_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").touch()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(UserError):
            open_device(tmp_path / "empty")
    assert len(os.listdir("/proc/self/fd")) == before


# -- the blocking helpers on files ------------------------------------------------------------


def test_discard_punches_a_hole(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    path.write_bytes(pattern(4 * MiB, seed=5))
    dev = open_device(path)
    try:
        before = allocated(path)
        dev.discard(1 * MiB, 2 * MiB)
        assert allocated(path) <= before - 2 * MiB
        assert direct_read(dev, 1 * MiB, 2 * MiB) == bytes(2 * MiB)
        assert direct_read(dev, 0, 1 * MiB) == pattern(4 * MiB, seed=5)[:1 * MiB]
        assert path.stat().st_size == 4 * MiB  # size kept
        dev.discard(4 * MiB - 4096, 1 * MiB)  # past the end: still no growth
        assert path.stat().st_size == 4 * MiB
    finally:
        dev.close()


@pytest.mark.parametrize("deallocate", [True, False])
def test_write_zeroes(tmp_path: Path, deallocate: bool) -> None:
    path = tmp_path / "z.img"
    data = pattern(4 * MiB, seed=6)
    path.write_bytes(data)
    dev = open_device(path)
    try:
        before = allocated(path)
        dev.write_zeroes(1 * MiB, 1 * MiB, may_deallocate=deallocate)
        assert direct_read(dev, 1 * MiB, 1 * MiB) == bytes(1 * MiB)
        assert direct_read(dev, 0, 1 * MiB) == data[:1 * MiB]
        assert direct_read(dev, 2 * MiB, 1 * MiB) == data[2 * MiB:3 * MiB]
        if deallocate:
            assert allocated(path) <= before - 1 * MiB
        else:
            assert allocated(path) == before
        dev.flush()
    finally:
        dev.close()


def test_write_zeroes_falls_back_to_writing(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem without fallocate modes (EOPNOTSUPP) gets zeros written."""
    path = tmp_path / "z.img"
    data = pattern(3 * MiB + 8192, seed=7)
    path.write_bytes(data)
    dev = open_device(path)

    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(device_mod, "fallocate", unsupported)
    try:
        dev.write_zeroes(4096, 2 * MiB + 4096, may_deallocate=True)  # over a 1 MiB chunk
        got = direct_read(dev, 0, 3 * MiB)
        assert got[:4096] == data[:4096]
        assert got[4096:2 * MiB + 8192] == bytes(2 * MiB + 4096)
        assert got[2 * MiB + 8192:] == data[2 * MiB + 8192:3 * MiB]
    finally:
        dev.close()


def test_write_zeroes_other_errors_are_raised(tmp_path: Path) -> None:
    path = tmp_path / "z.img"
    path.write_bytes(bytes(8192))
    dev = open_device(path, read_only=True)
    try:
        with pytest.raises(OSError) as exc:
            dev.write_zeroes(0, 4096, may_deallocate=False)
        assert exc.value.errno == errno.EBADF
    finally:
        dev.close()


def test_pwrite_short_write_is_an_error(tmp_path: Path) -> None:
    dev = open_device(tmp_path / "p.img", create_size=1 * MiB)
    try:
        with pytest.raises(OSError):
            direct_write(dev, 1, bytes(512))  # unaligned: EINVAL from the kernel
    finally:
        dev.close()


# -- block devices ------------------------------------------------------------------------------


@pytest.mark.parametrize("sector", [512, 4096])
def test_block_device(loop_device: LoopFactory, sector: int) -> None:
    path = loop_device("32M", sector_size=sector)
    dev = open_device(path)
    try:
        assert stat.S_ISBLK(os.stat(path).st_mode)
        assert dev.is_block_device
        assert dev.size == 32 * MiB
        assert dev.alignment == sector
        assert not dev.fast_zero  # BLKZEROOUT may write every block
        data = pattern(64 * KiB, seed=sector)
        direct_write(dev, 1 * MiB, data)
        assert direct_read(dev, 1 * MiB, 64 * KiB) == data
        dev.write_zeroes(1 * MiB, 16 * KiB, may_deallocate=False)
        assert direct_read(dev, 1 * MiB, 64 * KiB) == bytes(16 * KiB) + data[16 * KiB:]
        dev.discard(1 * MiB + 32 * KiB, 32 * KiB)  # a loop device's discard reads as zero
        assert direct_read(dev, 1 * MiB + 32 * KiB, 32 * KiB) == bytes(32 * KiB)
        dev.flush()
        if sector == 4096:
            with pytest.raises(OSError) as exc:
                direct_write(dev, 512, bytes(512))
            assert exc.value.errno == errno.EINVAL
    finally:
        dev.close()


def test_missing_device_path(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file or device"):
        open_device("/dev/nbdserver-test-no-such-device")
