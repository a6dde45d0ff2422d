"""A file or block device opened with O_DIRECT, and its blocking helpers.

Opening probes what the rest of the stack relies on, so that a problem is a
clear message at start rather than a failed request later:

- O_DIRECT must work: some filesystems refuse it at ``open`` (ramfs, some FUSE
  filesystems, tmpfs before Linux 6.6) and some only at the first read.
  ``open_device`` tries both and raises :class:`UserError` naming the path.
- The direct-I/O alignment: the device's logical block size (``BLKSSZGET``) for
  a block device; for a file, what the kernel reports (``statx`` with
  ``STATX_DIOALIGN``, Linux 6.1+; 0 there means no direct I/O). Where it does
  not say, the smallest of 512 and 4096 that an O_DIRECT read accepts, read
  where the file has data: a read of a hole does no device I/O and so accepts
  any alignment (a new sparse file on a 4 KiB-sector disk would pass at 512,
  and 512-byte writes then fail), and with no data at all, 4096, which every
  device accepts.
- The size: ``st_size`` of a file, ``BLKGETSIZE64`` of a block device.

A new file is sparse: the filesystem allocates its blocks as they are first
written. ``preallocate`` allocates them all at once (``fallocate``, mode 0: no
data is written, the blocks read as zeros), so that a first write does not wait
for the filesystem's allocator and a full host filesystem cannot fail a write
later. Such blocks are *unwritten* extents (ext4, XFS): the first write to each
still makes the filesystem convert its extent, a journalled change that cost
ext4 about three times the CPU of an overwrite (docs/benchmarks.md, Run T).
``preallocate(full=True)`` also writes zeros over the whole file, once, so that
every later write is an overwrite, as on a block device.

Trimming and zeroing map to ``fallocate`` (punch hole / zero range) on files
and to the ``BLKDISCARD`` / ``BLKZEROOUT`` ioctls on block devices. These block,
so the server calls them through ``IoEngine.run_blocking``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nbdserver.errors import UserError
from nbdserver.sizes import format_size
from nbdserver.storage.buffers import AlignedBuffer

_BLKGETSIZE64 = 0x80081272
_BLKSSZGET = 0x1268
_BLKDISCARD = 0x1277
_BLKZEROOUT = 0x127F
_BLKROTATIONAL = 0x127E
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
ZERO_FILL_STEP = 8 << 20  # bytes per write of zeros (preallocate(full=True), write_zeroes)
PREALLOCATE_MODES = ("falloc", "full")  # a pool file's: fallocate only; and zeros written

_STATX_DIOALIGN = 0x2000
_AT_EMPTY_PATH = 0x1000
_STATX_SIZE = 256
_STATX_DIO_MEM_ALIGN = 152  # offset of stx_dio_mem_align, then stx_dio_offset_align

_libc = ctypes.CDLL(None, use_errno=True)
_statx = getattr(_libc, "statx", None)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` with a mode (os.posix_fallocate has none). Raises OSError."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass
class BlockDevice:
    """An open O_DIRECT file descriptor and what was learnt about it."""

    path: Path
    fd: int
    size: int
    alignment: int  # direct-I/O alignment of offsets, lengths and buffers
    is_block_device: bool
    read_only: bool
    rotational: bool = False

    # -- blocking helpers (call from worker threads in the server) --------------------

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range; it then reads as zeros on a file, unspecified on a device."""
        if self.is_block_device:
            fcntl.ioctl(self.fd, _BLKDISCARD, struct.pack("QQ", offset, length))
        else:
            fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)

    def write_zeroes(self, offset: int, length: int, *, may_deallocate: bool,
                     fast_only: bool = False) -> None:
        """Make a range read as zeros, deallocating it if allowed and possible. Where the
        filesystem has no fallocate for it, zeros are written, unless `fast_only`: then
        OSError(ENOTSUP)."""
        if self.is_block_device:
            fcntl.ioctl(self.fd, _BLKZEROOUT, struct.pack("QQ", offset, length))
            return
        mode = (_FALLOC_FL_PUNCH_HOLE if may_deallocate else _FALLOC_FL_ZERO_RANGE)
        try:
            fallocate(self.fd, mode | _FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            if fast_only:
                raise OSError(errno.ENOTSUP, "this filesystem cannot zero a range without "
                              "writing zeros: not fast") from e
            self._write_zeroes_slowly(offset, length)

    @property
    def fast_zero(self) -> bool:
        """Whether write_zeroes is cheap (a file's fallocate) rather than writing zeros."""
        return not self.is_block_device

    def _write_zeroes_slowly(self, offset: int, length: int,
                             progress: Callable[[int, int], None] | None = None) -> None:
        """Write zeros over [offset, offset+length), ZERO_FILL_STEP bytes per write,
        calling ``progress(done, length)`` after each. OSError on failure or a short write."""
        if length <= 0:
            return
        size = min(ZERO_FILL_STEP, -(-length // 4096) * 4096)  # (a small range: a small buffer)
        buf = AlignedBuffer(size, (size - 1).bit_length())  # (its own, not a pool's)
        try:
            done = 0
            while done < length:
                n = min(size, length - done)
                if os.pwritev(self.fd, [buf.view[:n]], offset + done) != n:
                    raise OSError(errno.EIO, "short write")
                done += n
                if progress is not None:
                    progress(done, length)
        finally:
            buf.close()

    def preallocate(self, *, full: bool = False,
                    progress: Callable[[int, int], None] | None = None) -> None:
        """Allocate every block of a file now (no-op on a block device); with `full`, then
        write zeros over all of it, calling ``progress(done, total)`` every ZERO_FILL_STEP
        bytes. UserError if the filesystem cannot (no ``fallocate``) or has no room."""
        if self.is_block_device:
            return
        try:
            fallocate(self.fd, 0, 0, self.size)  # room first: no GiB written in vain
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise UserError(f"{self.path}: this filesystem cannot preallocate a file "
                                "(no fallocate); create the pool without preallocating") from e
            raise UserError(f"{self.path}: cannot preallocate {format_size(self.size)}: "
                            f"{e.strerror}") from e
        if full:
            self._fill_zeros(progress)

    def _fill_zeros(self, progress: Callable[[int, int], None] | None) -> None:
        """Write zeros over the file (its blocks become written extents), but for a tail
        shorter than the direct-I/O alignment, which O_DIRECT cannot write and a pool
        never uses (its pages and chunks are whole blocks)."""
        try:
            self._write_zeroes_slowly(0, self.size - self.size % self.alignment, progress)
        except OSError as e:
            raise UserError(f"{self.path}: cannot write zeros over it: "
                            f"{e.strerror or e}") from e

    @property
    def allocated(self) -> int:
        """Bytes of the file its filesystem has allocated (a block device: its size), at
        most its size (the blocks of the filesystem's own index of a large file are
        counted too, and are not the file's)."""
        if self.is_block_device:
            return self.size
        return min(self.size, os.fstat(self.fd).st_blocks * 512)

    def pread(self, buf: AlignedBuffer, length: int, offset: int) -> int:
        """Blocking aligned read into `buf`; returns bytes read (short at the end of the file)."""
        return os.preadv(self.fd, [buf.view[:length]], offset)

    def pwrite(self, buf: AlignedBuffer, length: int, offset: int) -> None:
        """Blocking aligned write from `buf`. Raises OSError on failure or a short write."""
        n = os.pwritev(self.fd, [buf.view[:length]], offset)
        if n != length:
            raise OSError(errno.EIO, f"short write at {offset}: {n} of {length}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _statx_dio_alignment(fd: int) -> int | None:
    """The direct-I/O alignment the kernel reports for `fd` (offsets and memory), 0 if
    it says the file cannot do direct I/O, None if it does not say."""
    if _statx is None:
        return None
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if _statx(fd, b"", _AT_EMPTY_PATH, _STATX_DIOALIGN, buf) != 0:
        return None
    (mask,) = struct.unpack_from("=I", buf, 0)
    if not mask & _STATX_DIOALIGN:
        return None
    mem_align, offset_align = struct.unpack_from("=II", buf, _STATX_DIO_MEM_ALIGN)
    return max(mem_align, offset_align) if offset_align else 0


def _probe_alignment(fd: int, path: Path) -> int:
    """The direct-I/O alignment of a file; see the module note."""
    reported = _statx_dio_alignment(fd)
    if reported == 0:
        raise UserError(
            f"{path}: this filesystem does not support O_DIRECT (direct I/O) for this file; "
            "put the file on a filesystem that does (ext4, xfs, btrfs) or use a block device")
    if reported is not None:
        return reported
    try:
        at: int | None = os.lseek(fd, 0, os.SEEK_DATA) & ~4095
    except OSError:  # ENXIO: no data at all (or SEEK_DATA unsupported)
        at = None
    buf = AlignedBuffer(4096, 12)
    try:
        last_error: OSError | None = None
        for align in (512, 4096):
            try:
                os.preadv(fd, [buf.view[:align]], at or 0)
                return align if at is not None else 4096
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise UserError(f"{path}: cannot read with O_DIRECT: {e.strerror}") from e
                last_error = e
        raise UserError(
            f"{path}: the filesystem accepts O_DIRECT at open but refuses direct reads "
            f"({last_error.strerror if last_error else 'EINVAL'}); put the file on a filesystem "
            "that supports direct I/O (ext4, xfs, btrfs) or use a block device"
        )
    finally:
        buf.close()


def file_identity(path: str | Path) -> tuple[str, int, int]:
    """What every path to one file or device shares (symbolic and hard links alike)
    and no other has: a block device's device number, a file's device and inode
    numbers. Raises OSError (a missing file, say)."""
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        return ("block", st.st_rdev, 0)
    return ("file", st.st_dev, st.st_ino)


def open_device(path: str | Path, *, read_only: bool = False,
                create_size: int | None = None) -> BlockDevice:
    """Open `path` with O_DIRECT, creating a sparse file of `create_size` bytes if missing.

    Raises UserError with a message that names the path for every expected failure
    (missing, permission, not a file or device, O_DIRECT unsupported, empty).
    """
    path = Path(path)
    try:
        os.stat(path)
        missing = False
    except FileNotFoundError:
        missing = True
    except OSError as e:  # not absent, but unusable: a loop, a name too long, under a file
        raise UserError(f"{path}: {e.strerror}") from None
    if missing:
        if create_size is None:
            raise UserError(f"{path}: no such file or device")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "xb") as f:
                try:
                    f.truncate(create_size)
                except OSError:
                    path.unlink(missing_ok=True)  # (no empty file left behind)
                    raise
        except FileExistsError:
            pass
        except OSError as e:
            raise UserError(f"{path}: cannot create: {e.strerror}") from e
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise UserError(f"{path}: cannot open: {e.strerror}") from e
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):  # opening a FIFO would block
        raise UserError(f"{path}: not a regular file or block device")
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_DIRECT | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise UserError(
                f"{path}: this filesystem does not support O_DIRECT (direct I/O); put the "
                "file on a filesystem that does (ext4, xfs, btrfs) or use a block device"
            ) from e
        raise UserError(f"{path}: cannot open: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            size = struct.unpack("Q", fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8))[0]
            alignment = struct.unpack("i", fcntl.ioctl(fd, _BLKSSZGET, b"\0" * 4))[0]
            try:
                rot = struct.unpack("H", fcntl.ioctl(fd, _BLKROTATIONAL, b"\0" * 2))[0]
            except OSError:
                rot = 0
            return BlockDevice(path, fd, size, alignment, True, read_only, bool(rot))
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{path}: not a regular file or block device")
        if st.st_size == 0:  # (a size creates a missing file only: never resized here)
            raise UserError(f"{path}: the file is empty (an export's size: only creates a "
                            "missing file; delete the empty one to have it created, or grow "
                            "it: truncate -s SIZE FILE)")
        alignment = _probe_alignment(fd, path)
        return BlockDevice(path, fd, st.st_size, alignment, False, read_only)
    except BaseException:
        os.close(fd)
        raise
