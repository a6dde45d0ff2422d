"""Page-aligned I/O buffers for O_DIRECT, recycled through size classes.

O_DIRECT needs the user buffer aligned to the device's logical block size; an
anonymous ``mmap`` is page aligned (4 KiB), which satisfies every device we
serve. Allocating an mmap per request costs two system calls and page faults
on first touch, so buffers are kept in free lists by power-of-two size class
(4 KiB .. 64 MiB) and handed out again. ``MAX_POOLED_BYTES`` caps what the
free lists may hold; a buffer released beyond the cap is unmapped.

Cost: ``get`` and ``put`` are O(1) list operations on the hot path.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap

MIN_CLASS_SHIFT = 12  # 4 KiB
# 64 MiB: the largest NBD payload we accept (32 MiB), rounded out to the chunks or
# device blocks it touches (a 1 MiB chunk at most, each side), which may be past 32 MiB.
MAX_CLASS_SHIFT = 26
MAX_POOLED_BYTES = 256 * 1024 * 1024


class AlignedBuffer:
    """One page-aligned buffer. ``view`` is a writable memoryview, ``address`` its C address."""

    __slots__ = ("_cdata", "_map", "address", "size", "size_class", "view")

    def __init__(self, size: int, size_class: int) -> None:
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._cdata = (ctypes.c_char * size).from_buffer(self._map)
        self.address: int = ctypes.addressof(self._cdata)
        self.view = memoryview(self._map)
        self.size = size
        self.size_class = size_class

    def close(self) -> None:
        self.view.release()
        del self._cdata
        self._map.close()


def _size_class(length: int) -> int:
    shift = max(MIN_CLASS_SHIFT, (length - 1).bit_length())
    if shift > MAX_CLASS_SHIFT:
        raise ValueError(f"buffer of {length} bytes exceeds the {1 << MAX_CLASS_SHIFT} byte limit")
    return shift


class BufferPool:
    """Free lists of aligned buffers by size class."""

    def __init__(self, max_pooled_bytes: int = MAX_POOLED_BYTES) -> None:
        self._free: list[list[AlignedBuffer]] = [[] for _ in range(MAX_CLASS_SHIFT + 1)]
        self._pooled = 0
        self._max_pooled = max_pooled_bytes

    def get(self, length: int) -> AlignedBuffer:
        """A buffer of at least `length` bytes (contents undefined). O(1)."""
        shift = (length - 1).bit_length()  # (_size_class, inline: every request)
        if shift <= MIN_CLASS_SHIFT:
            shift = MIN_CLASS_SHIFT
        elif shift > MAX_CLASS_SHIFT:
            _size_class(length)  # (raises)
        free = self._free[shift]
        if free:
            buf = free.pop()
            self._pooled -= buf.size
            return buf
        return AlignedBuffer(1 << shift, shift)

    def get_zeroed(self, length: int) -> AlignedBuffer:
        """A buffer whose first `length` bytes are zero."""
        buf = self.get(length)
        ctypes.memset(buf.address, 0, length)
        return buf

    def put(self, buf: AlignedBuffer) -> None:
        """Return `buf` for reuse; the caller must not touch it afterwards. O(1).

        Beyond the cap the buffer is dropped, not unmapped: views of it may still
        exist (a reply uvloop has not sent yet), and unmapping under them would
        fail; the garbage collector frees it once the last view is gone.
        """
        if self._pooled + buf.size > self._max_pooled:
            return
        self._pooled += buf.size
        self._free[buf.size_class].append(buf)

    def clear(self) -> None:
        """Unmap every free buffer (one still viewed elsewhere is left to the GC)."""
        for free in self._free:
            for buf in free:
                with contextlib.suppress(BufferError):
                    buf.close()
            free.clear()
        self._pooled = 0


def zero_fill(buf: AlignedBuffer, start: int, length: int) -> None:
    """Set `length` bytes of `buf` from `start` to zero (memset, no Python loop)."""
    if length > 0:
        ctypes.memset(buf.address + start, 0, length)
