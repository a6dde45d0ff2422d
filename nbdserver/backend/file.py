"""A raw file or block device served through O_DIRECT.

Requests of any alignment are served. A request aligned to the device's
direct-I/O alignment (the common case: clients honour the advertised block
size) is one AIO operation into a pooled aligned buffer. An unaligned write
is split into head, aligned body and tail: the partial device blocks at the
ends are read, patched and written back with the body in one operation.
Two such read-modify-writes on the same device block would lose one update,
so they are serialized by a lock table over device blocks; an aligned write
needs no lock, because it covers whole device blocks and so overlaps any
read-modify-write of those blocks in the client's own byte range (NBD leaves
the order of overlapping in-flight writes undefined).

Trim punches a hole (files) or discards (devices); write-zeroes uses
fallocate/BLKZEROOUT. Block status on a file uses SEEK_DATA/SEEK_HOLE.
Flush is fdatasync of the one descriptor every connection shares, so a flush
on one connection covers writes acknowledged on all of them (multi-conn).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any

from nbdserver.backend.base import (
    BASE_ALLOCATION,
    STATE_HOLE,
    STATE_ZERO,
    Done,
    ReadDone,
    ReadResult,
    StatusDone,
    StatusExtent,
)
from nbdserver.backend.ranges import RangeLocks
from nbdserver.errors import NbdError
from nbdserver.storage.buffers import AlignedBuffer, BufferPool
from nbdserver.storage.device import BlockDevice
from nbdserver.storage.engine import IoEngine

log = logging.getLogger(__name__)

STATUS_SCAN_LIMIT = 1 << 30  # a block-status answer covers at most this much of a file


def _errno_of(exc: BaseException) -> int:
    return exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO


class FileBackend:
    """Backend over one :class:`BlockDevice`; see the module note."""

    def __init__(self, device: BlockDevice, engine: IoEngine, buffers: BufferPool, *,
                 description: str = "", read_only: bool = False) -> None:
        self.device = device
        self.engine = engine
        self.buffers = buffers
        self.description = description
        self.read_only = read_only or device.read_only
        self.alignment = device.alignment
        # An unaligned tail at the end of a file could not be written with O_DIRECT.
        self.size = device.size - device.size % device.alignment
        if self.size != device.size:
            log.warning("%s: size %d is not a multiple of %d; serving the first %d bytes",
                        device.path, device.size, device.alignment, self.size)
        self.can_trim = True
        self.can_zero = True
        self.can_fast_zero = device.fast_zero
        self.rotational = device.rotational
        self.preferred_block = max(4096, device.alignment)
        self.meta_contexts: tuple[str, ...] = (BASE_ALLOCATION,)
        self._fd = device.fd
        self._mask = device.alignment - 1
        self._rmw_locks = RangeLocks()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- reads ---------------------------------------------------------------------------

    def read(self, offset: int, length: int, done: ReadDone) -> None:
        mask = self._mask
        start = offset & ~mask
        end = (offset + length + mask) & ~mask
        span = end - start
        buf = self.buffers.get(span)
        buffers = self.buffers

        def complete(res: int) -> None:
            if res < 0:
                buffers.put(buf)
                done(NbdError(-res, f"read at {offset}: {os.strerror(-res)}"))
                return
            if res < span:  # only possible past the end of a growing file
                buf.view[res:span] = bytes(span - res)
            skip = offset - start
            done(ReadResult([(offset, length, buf.view[skip:skip + length])],
                            lambda: buffers.put(buf)))

        self.engine.read(self._fd, buf, 0, span, start, complete)

    # -- writes --------------------------------------------------------------------------

    def write(self, offset: int, data: memoryview, fua: bool, done: Done) -> None:
        length = len(data)
        if not ((offset | length) & self._mask):
            buf = self.buffers.get(length)
            buf.view[:length] = data
            buffers = self.buffers

            def complete(res: int) -> None:
                buffers.put(buf)
                if res == length:
                    done(None)
                elif res < 0:
                    done(NbdError(-res, f"write at {offset}: {os.strerror(-res)}"))
                else:
                    done(NbdError(errno.EIO, f"short write at {offset}: {res} of {length}"))

            self.engine.write(self._fd, buf, 0, length, offset, complete, fua)
            return
        self._spawn(self._write_unaligned(offset, bytes(data), fua), done)

    async def _write_unaligned(self, offset: int, data: bytes, fua: bool) -> None:
        mask = self._mask
        al = self.alignment
        start = offset & ~mask
        end = (offset + len(data) + mask) & ~mask
        async with self._rmw_locks.hold(start, end):
            buf = self.buffers.get(end - start)
            try:
                if offset != start:
                    await self._read_block(buf, 0, start)
                tail = end - al
                if (offset + len(data)) != end and (tail != start or offset == start):
                    await self._read_block(buf, tail - start, tail)
                buf.view[offset - start:offset - start + len(data)] = data
                await self.engine.awrite(self._fd, buf, 0, end - start, start, fua)
            finally:
                self.buffers.put(buf)

    async def _read_block(self, buf: AlignedBuffer, at: int, offset: int) -> None:
        n = await self.engine.aread(self._fd, buf, at, self.alignment, offset)
        if n < self.alignment:
            buf.view[at + n:at + self.alignment] = bytes(self.alignment - n)

    # -- trim, zero, flush, cache -------------------------------------------------------------

    def trim(self, offset: int, length: int, fua: bool, done: Done) -> None:
        # Trim is advisory; only whole device blocks inside the range are released.
        mask = self._mask
        start = (offset + mask) & ~mask
        end = (offset + length) & ~mask
        if end <= start:
            done(None)
            return
        self._blocking(self._trim_sync, start, end - start, fua, done=done)

    def _trim_sync(self, offset: int, length: int, fua: bool) -> None:
        try:
            self.device.discard(offset, length)
        except OSError as e:  # no hole punching or discard here: nothing to release
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENOTTY):
                raise  # (the spec wants no ENOTSUP for a TRIM, which is advisory)
        if fua:
            self.device.flush()

    def zero(self, offset: int, length: int, *, may_trim: bool, fast_only: bool, fua: bool,
             done: Done) -> None:
        if fast_only and not self.can_fast_zero:
            done(NbdError(errno.ENOTSUP, "zeroing a block device is not fast"))
            return
        mask = self._mask
        if not ((offset | length) & mask):
            self._blocking(self._zero_sync, offset, length, may_trim, fua, fast_only, done=done)
            return
        if fast_only:  # the partial blocks would be read, changed and written
            done(NbdError(errno.ENOTSUP,
                          f"zeroing part of a {self.alignment}-byte block writes it: not fast"))
            return
        self._spawn(self._zero_unaligned(offset, length, may_trim, fua), done)

    async def _zero_unaligned(self, offset: int, length: int, may_trim: bool, fua: bool) -> None:
        mask = self._mask
        inner_start = (offset + mask) & ~mask
        inner_end = (offset + length) & ~mask
        if inner_end > inner_start:
            await self.engine.call_blocking(self._zero_sync, inner_start, inner_end - inner_start,
                                            may_trim, False)
            head, tail = (offset, inner_start - offset), (inner_end, offset + length - inner_end)
        else:
            head, tail = (offset, length), (offset + length, 0)
        for at, n in (head, tail):
            if n:
                await self._write_unaligned(at, bytes(n), False)
        if fua:
            await self.engine.call_blocking(self.device.flush)

    def _zero_sync(self, offset: int, length: int, may_trim: bool, fua: bool,
                   fast_only: bool = False) -> None:
        self.device.write_zeroes(offset, length, may_deallocate=may_trim, fast_only=fast_only)
        if fua:
            self.device.flush()

    def flush(self, done: Done) -> None:
        self._blocking(self.device.flush, done=done)

    def cache(self, offset: int, length: int, done: Done) -> None:
        # O_DIRECT bypasses the page cache and we keep no data cache: nothing to prefetch.
        done(None)

    # -- block status --------------------------------------------------------------------

    def block_status(self, offset: int, length: int, context: str, done: StatusDone) -> None:
        if context != BASE_ALLOCATION:
            done(NbdError(errno.EINVAL, f"unknown metadata context {context}"))
            return
        if self.device.is_block_device:
            done([(length, 0)])
            return
        length = min(length, STATUS_SCAN_LIMIT)

        def finish(result: list[StatusExtent] | BaseException) -> None:
            if isinstance(result, BaseException):
                done(NbdError(_errno_of(result), f"block status: {result}"))
            else:
                done(result)

        self.engine.run_blocking(self._scan_allocation, offset, length, callback=finish)

    def _scan_allocation(self, offset: int, length: int) -> list[StatusExtent]:
        """Data and hole extents of [offset, offset+length) with SEEK_DATA/SEEK_HOLE."""
        extents: list[StatusExtent] = []
        end = offset + length
        pos = offset
        fd = self._fd
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: only a hole remains
                    raise
                data = end
            if data > pos:
                extents.append((min(data, end) - pos, STATE_HOLE | STATE_ZERO))
                pos = min(data, end)
                continue
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            extents.append((min(hole, end) - pos, 0))
            pos = min(hole, end)
        return extents

    # -- plumbing ------------------------------------------------------------------------

    def _blocking(self, fn: Callable[..., None], *args: object, done: Done) -> None:
        def finish(result: object) -> None:
            if isinstance(result, BaseException):
                done(NbdError(_errno_of(result), str(result)))
            else:
                done(None)

        self.engine.run_blocking(fn, *args, callback=finish)

    def _spawn(self, coro: Coroutine[Any, Any, None], done: Done) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def finish(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            exc = t.exception()
            if exc is None:
                done(None)
            elif isinstance(exc, NbdError):
                done(exc)
            else:
                if not isinstance(exc, OSError):
                    log.error("unexpected error in %s", coro, exc_info=exc)
                done(NbdError(_errno_of(exc), str(exc)))

        task.add_done_callback(finish)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if not self.read_only:
            await self.engine.call_blocking(self.device.flush)
        self.device.close()
