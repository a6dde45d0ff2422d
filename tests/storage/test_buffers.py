"""Aligned buffers and their pool: alignment, size classes, reuse, the cap, O_DIRECT use."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

from nbdserver.storage.buffers import (
    MAX_CLASS_SHIFT,
    AlignedBuffer,
    BufferPool,
    zero_fill,
)

KiB = 1024
MiB = 1024 * KiB


def test_buffer_is_page_aligned_and_writable() -> None:
    for size in (4096, 8192, 1 * MiB):
        buf = AlignedBuffer(size, size.bit_length() - 1)
        try:
            assert buf.address % 4096 == 0
            assert buf.size == len(buf.view) == size
            buf.view[:4] = b"abcd"
            buf.view[-1:] = b"z"
            assert ctypes.string_at(buf.address, 4) == b"abcd"  # the address is the memory
            assert ctypes.string_at(buf.address + size - 1, 1) == b"z"
        finally:
            buf.close()


@pytest.mark.parametrize("length, size", [(1, 4096), (4096, 4096), (4097, 8192),
                                          (65536, 65536), (65537, 131072),
                                          (32 * MiB, 32 * MiB)])
def test_size_classes(length: int, size: int) -> None:
    pool = BufferPool()
    buf = pool.get(length)
    assert buf.size == size >= length
    assert buf.address % 4096 == 0
    pool.put(buf)
    pool.clear()


def test_too_large() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        BufferPool().get((1 << MAX_CLASS_SHIFT) + 1)


def test_reuse_within_a_class_only() -> None:
    pool = BufferPool()
    a = pool.get(5000)
    pool.put(a)
    assert pool.get(3000) is not a      # another class (4 KiB)
    assert pool.get(8000) is a          # same class (8 KiB): recycled
    b = pool.get(8000)
    assert b is not a                   # the free list is empty again
    pool.put(a)
    pool.put(b)
    assert {id(pool.get(8192)), id(pool.get(8192))} == {id(a), id(b)}
    pool.clear()


def test_cap_on_pooled_bytes() -> None:
    pool = BufferPool(max_pooled_bytes=64 * KiB)
    bufs = [pool.get(16 * KiB) for _ in range(6)]
    for buf in bufs:
        pool.put(buf)
    kept = [pool.get(16 * KiB) for _ in range(6)]
    reused = [k for k in kept if any(k is b for b in bufs)]
    assert len(reused) == 4  # 4 x 16 KiB fit under the cap; the rest were dropped
    dropped = [b for b in bufs if not any(b is k for k in kept)]
    assert len(dropped) == 2
    for buf in dropped:  # dropped, not unmapped: a view still held elsewhere stays valid
        buf.view[0] = 7
        assert buf.view[0] == 7
    pool.clear()


def test_put_over_the_cap_while_a_view_is_held() -> None:
    """A reply uvloop has not sent yet still views its buffer: putting that buffer back
    over the cap must neither fail nor invalidate the view."""
    pool = BufferPool(max_pooled_bytes=0)
    buf = pool.get(4096)
    buf.view[:4] = b"nbd!"
    held = buf.view[:4]
    pool.put(buf)
    assert bytes(held) == b"nbd!"


def test_clear_unmaps_free_buffers() -> None:
    pool = BufferPool()
    buf = pool.get(4096)
    pool.put(buf)
    pool.clear()
    with pytest.raises(ValueError):
        buf.view[0]
    assert pool.get(4096) is not buf


def test_get_zeroed_and_zero_fill() -> None:
    pool = BufferPool()
    buf = pool.get(8192)
    buf.view[:8192] = b"\xff" * 8192
    pool.put(buf)
    again = pool.get_zeroed(6000)
    assert again is buf
    assert bytes(again.view[:6000]) == bytes(6000)
    assert bytes(again.view[6000:8192]) == b"\xff" * 2192  # only what was asked
    zero_fill(again, 7000, 100)
    assert bytes(again.view[7000:7100]) == bytes(100)
    assert again.view[6999] == 0xFF and again.view[7100] == 0xFF
    zero_fill(again, 0, 0)  # nothing
    pool.clear()


def test_buffers_work_for_direct_io(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    path.write_bytes(os.urandom(64 * KiB))
    pool = BufferPool()
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        buf = pool.get(64 * KiB)
        assert os.preadv(fd, [buf.view[:64 * KiB]], 0) == 64 * KiB
        assert bytes(buf.view[:64 * KiB]) == path.read_bytes()
        buf.view[:4096] = b"\x5a" * 4096
        assert os.pwritev(fd, [buf.view[:4096]], 8192) == 4096
        pool.put(buf)
    finally:
        os.close(fd)
        pool.clear()
    assert path.read_bytes()[8192:12288] == b"\x5a" * 4096
