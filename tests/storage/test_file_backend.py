"""The file backend on real O_DIRECT files: byte-exact I/O at any alignment, trim,
zero, block status, errors and close. Runs on uvloop with the real engines.

The backend's answers are checked against a plain bytearray model and against
the file itself (read without O_DIRECT after the backend is done with it).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from conftest import on_uvloop, pattern

from nbdserver.backend.base import BASE_ALLOCATION, STATE_HOLE, STATE_ZERO, ReadResult
from nbdserver.backend.file import STATUS_SCAN_LIMIT, FileBackend
from nbdserver.errors import NbdError
from nbdserver.storage.buffers import BufferPool
from nbdserver.storage.device import open_device
from nbdserver.storage.engine import make_engine

KiB = 1024
MiB = 1024 * KiB
HOLE = STATE_HOLE | STATE_ZERO
LoopFactory = Callable[..., Path]


@asynccontextmanager
async def backend_for(path: Path, *, size: int | None = 8 * MiB, engine: str = "aio",
                      read_only: bool = False) -> AsyncIterator[FileBackend]:
    eng = make_engine(asyncio.get_running_loop(), engine)
    buffers = BufferPool()
    dev = open_device(path, create_size=size, read_only=read_only)
    be = FileBackend(dev, eng, buffers, description="t", read_only=read_only)
    try:
        yield be
    finally:
        if dev.fd >= 0:
            await be.close()
        eng.close()
        buffers.clear()


def _settle(fut: asyncio.Future[object]) -> Callable[[object], None]:
    def done(result: object) -> None:
        if not fut.done():
            fut.set_result(result)
    return done


def start_read(be: FileBackend, offset: int, length: int) -> asyncio.Future[object]:
    fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    be.read(offset, length, _settle(fut))
    be.engine.kick()
    return fut


def start_write(be: FileBackend, offset: int, data: bytes,
                fua: bool = False) -> asyncio.Future[object]:
    fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    be.write(offset, memoryview(data), fua, _settle(fut))
    be.engine.kick()
    return fut


async def read(be: FileBackend, offset: int, length: int) -> bytes:
    result = await asyncio.wait_for(start_read(be, offset, length), 10)
    if isinstance(result, NbdError):
        raise result
    assert isinstance(result, ReadResult)
    pos = offset
    out = bytearray()
    for off, n, view in result.chunks:
        assert off == pos, "chunks must be in order and contiguous"
        out += bytes(view) if view is not None else bytes(n)
        pos += n
    assert pos == offset + length
    result.release()
    return bytes(out)


async def write(be: FileBackend, offset: int, data: bytes, fua: bool = False) -> None:
    result = await asyncio.wait_for(start_write(be, offset, data, fua), 10)
    if result is not None:
        raise result  # type: ignore[misc]


async def trim(be: FileBackend, offset: int, length: int) -> object:
    fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    be.trim(offset, length, False, _settle(fut))
    return await asyncio.wait_for(fut, 10)


async def zero(be: FileBackend, offset: int, length: int, *, may_trim: bool = True,
               fast_only: bool = False, fua: bool = False) -> object:
    fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    be.zero(offset, length, may_trim=may_trim, fast_only=fast_only, fua=fua,
            done=_settle(fut))
    be.engine.kick()
    return await asyncio.wait_for(fut, 10)


async def flush(be: FileBackend) -> object:
    fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    be.flush(_settle(fut))
    return await asyncio.wait_for(fut, 10)


async def status(be: FileBackend, offset: int, length: int,
                 context: str = BASE_ALLOCATION) -> object:
    fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    be.block_status(offset, length, context, _settle(fut))
    result = await asyncio.wait_for(fut, 10)
    return list(result) if isinstance(result, (list, tuple)) else result


# -- reads and writes ---------------------------------------------------------------------


@on_uvloop
async def test_aligned_round_trip(tmp_path: Path) -> None:
    async with backend_for(tmp_path / "f.img") as be:
        assert be.size == 8 * MiB and be.alignment == 512
        assert await read(be, 0, 64 * KiB) == bytes(64 * KiB)  # a new file reads as zeros
        data = pattern(1 * MiB, seed=1)
        await write(be, 2 * MiB, data)
        await write(be, 4096, data[:4096], fua=True)
        assert await read(be, 2 * MiB, 1 * MiB) == data
        assert await read(be, 4096, 4096) == data[:4096]
    with open(tmp_path / "f.img", "rb") as f:
        f.seek(2 * MiB)
        assert f.read(1 * MiB) == data


@pytest.mark.parametrize("engine", ["aio", "threads"])
@on_uvloop
async def test_unaligned_reads_and_writes_match_a_model(tmp_path: Path, engine: str) -> None:
    """Random writes and reads at any offset and length, one at a time: byte-exact."""
    rng = random.Random(42)
    size = 256 * KiB
    model = bytearray(pattern(size, seed=2))
    (tmp_path / "f.img").write_bytes(model)
    async with backend_for(tmp_path / "f.img", engine=engine) as be:
        for i in range(300):
            offset = rng.randrange(size - 1)
            length = rng.choice([1, 2, 511, 512, 513, 4095, 4097, rng.randrange(1, 20000)])
            length = min(length, size - offset)
            if rng.random() < 0.6:
                data = pattern(length, seed=1000 + i)
                await write(be, offset, data, fua=rng.random() < 0.1)
                model[offset:offset + length] = data
            else:
                assert await read(be, offset, length) == model[offset:offset + length], \
                    (i, offset, length)
        assert await read(be, 0, size) == model
    assert (tmp_path / "f.img").read_bytes() == model


@pytest.mark.parametrize("engine", ["aio", "threads"])
@on_uvloop
async def test_concurrent_unaligned_writes_to_one_block_keep_every_update(
        tmp_path: Path, engine: str) -> None:
    """Hundreds of small writes to disjoint bytes of the same few device blocks, all in
    flight together: each is a read-modify-write of a shared block, and none may be lost."""
    async with backend_for(tmp_path / "f.img", engine=engine) as be:
        base = 1 * MiB
        rng = random.Random(7)
        positions = list(range(0, 4096, 8))  # 512 slots of 8 bytes over 8 device blocks
        rng.shuffle(positions)
        expected = bytearray(4096)
        futs = []
        for n, pos in enumerate(positions):
            length = rng.randrange(1, 8)
            data = bytes([(n % 255) + 1]) * length
            expected[pos:pos + length] = data
            futs.append(start_write(be, base + pos, data))
        results = await asyncio.wait_for(asyncio.gather(*futs), 30)
        assert results == [None] * len(futs)
        got = await read(be, base, 4096)
        lost = [p for p in positions if got[p] != expected[p]]
        assert not lost, f"{len(lost)} of {len(positions)} updates lost"
        # The blocks around were not touched.
        assert await read(be, base - 4096, 4096) == bytes(4096)
        assert await read(be, base + 4096, 4096) == bytes(4096)


@on_uvloop
async def test_concurrent_aligned_and_unaligned_writes(tmp_path: Path) -> None:
    async with backend_for(tmp_path / "f.img") as be:
        futs = []
        expected = bytearray(2 * MiB)
        for i in range(256):
            off = i * 8192
            if i % 2:
                data = pattern(8192, seed=i)
                futs.append(start_write(be, off, data))
                expected[off:off + 8192] = data
            else:
                data = pattern(777, seed=i)
                futs.append(start_write(be, off + 3, data))
                expected[off + 3:off + 780] = data
        assert await asyncio.wait_for(asyncio.gather(*futs), 30) == [None] * 256
        assert await read(be, 0, 2 * MiB) == expected


@on_uvloop
async def test_size_not_a_multiple_of_the_alignment(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(pattern(3 * 4096 + 100, seed=3))
    with caplog.at_level(logging.WARNING):
        async with backend_for(path, size=None) as be:
            assert be.size == 3 * 4096  # the unaligned tail cannot be written with O_DIRECT
            assert await read(be, 3 * 4096 - 10, 10) == pattern(3 * 4096 + 100, seed=3)[
                3 * 4096 - 10:3 * 4096]
    assert "not a multiple" in caplog.text


@on_uvloop
async def test_file_shrunk_underneath_reads_zeros(tmp_path: Path) -> None:
    """A short read (the file shrank after it was opened) is filled with zeros, not with
    whatever a recycled buffer held before."""
    path = tmp_path / "f.img"
    path.write_bytes(b"\xff" * (64 * KiB))
    async with backend_for(path, size=None) as be:
        assert await read(be, 32 * KiB, 32 * KiB) == b"\xff" * (32 * KiB)  # dirty a buffer
        os.truncate(path, 36 * KiB)
        assert await read(be, 32 * KiB, 32 * KiB) == b"\xff" * (4 * KiB) + bytes(28 * KiB)


# -- trim, zero, flush, cache ---------------------------------------------------------------


@on_uvloop
async def test_trim_releases_only_whole_blocks(tmp_path: Path) -> None:
    path = tmp_path / "f.img"
    data = pattern(64 * KiB, seed=4)
    path.write_bytes(data)
    async with backend_for(path, size=None) as be:
        assert await trim(be, 1000, 10000) is None  # blocks 2..20 (1024..10752) go
        got = await read(be, 0, 16 * KiB)
        assert got[:1024] == data[:1024]            # partial block at the start: kept
        assert got[1024:10752] == bytes(10752 - 1024)
        assert got[10752:] == data[10752:16 * KiB]  # partial block at the end: kept
        assert await trim(be, 100, 200) is None     # inside one block: nothing to do
        assert await read(be, 100, 200) == data[100:300]


@on_uvloop
async def test_trim_where_nothing_can_be_released_succeeds(tmp_path: Path) -> None:
    """A file system without hole punching (or a device without discard) answers
    EOPNOTSUPP; TRIM is advisory, and the spec wants no ENOTSUP for it, so it succeeds
    and the data simply stays. Other errors still fail the request."""
    path = tmp_path / "f.img"
    data = pattern(64 * KiB, seed=6)
    path.write_bytes(data)
    async with backend_for(path, size=None) as be:
        def refuse(offset: int, length: int, code: int = errno.EOPNOTSUPP) -> None:
            raise OSError(code, os.strerror(code))

        be.device.discard = refuse  # type: ignore[method-assign]
        assert await trim(be, 0, 16 * KiB) is None
        assert await read(be, 0, 16 * KiB) == data[:16 * KiB]
        be.device.discard = lambda o, n: refuse(o, n, errno.EIO)  # type: ignore[method-assign]
        result = await trim(be, 0, 16 * KiB)
        assert isinstance(result, NbdError) and result.errno == errno.EIO


@on_uvloop
async def test_zero(tmp_path: Path) -> None:
    path = tmp_path / "f.img"
    data = pattern(4 * MiB, seed=5)
    path.write_bytes(data)
    async with backend_for(path, size=None) as be:
        blocks = os.stat(path).st_blocks
        assert await zero(be, 1 * MiB, 1 * MiB, may_trim=True) is None
        assert os.stat(path).st_blocks < blocks  # punched
        assert await zero(be, 100, 5000, may_trim=False, fua=True) is None  # unaligned
        assert await zero(be, 3 * MiB + 7, 3, may_trim=True) is None        # tiny
        assert await zero(be, 2 * MiB + 4096, 1 * MiB - 8192, fast_only=True) is None
        # Part of a block would be read, changed and written: not fast, and untouched.
        refused = await zero(be, 2 * MiB + 1, 1 * MiB - 2, fast_only=True)
        assert isinstance(refused, NbdError) and refused.errno == errno.ENOTSUP, refused
        expected = bytearray(data)
        expected[1 * MiB:2 * MiB] = bytes(1 * MiB)
        expected[100:5100] = bytes(5000)
        expected[3 * MiB + 7:3 * MiB + 10] = bytes(3)
        expected[2 * MiB + 4096:3 * MiB - 4096] = bytes(1 * MiB - 8192)
        assert await read(be, 0, 4 * MiB) == expected
        assert await flush(be) is None
    assert path.read_bytes() == expected


@on_uvloop
async def test_cache_is_a_no_op(tmp_path: Path) -> None:
    async with backend_for(tmp_path / "f.img") as be:
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        be.cache(0, 1 * MiB, _settle(fut))
        assert await fut is None


# -- block status ----------------------------------------------------------------------------


@on_uvloop
async def test_block_status_from_seek_hole(tmp_path: Path) -> None:
    async with backend_for(tmp_path / "f.img", size=4 * MiB) as be:
        assert await status(be, 0, 4 * MiB) == [(4 * MiB, HOLE)]
        await write(be, 64 * KiB, pattern(64 * KiB))
        await write(be, 1 * MiB, pattern(4 * KiB))
        assert await status(be, 0, 4 * MiB) == [
            (64 * KiB, HOLE), (64 * KiB, 0), (1 * MiB - 128 * KiB, HOLE), (4 * KiB, 0),
            (3 * MiB - 4 * KiB, HOLE)]
        # From inside an extent, and a range ending inside one.
        assert await status(be, 96 * KiB, 64 * KiB) == [(32 * KiB, 0), (32 * KiB, HOLE)]
        assert await status(be, 70 * KiB, 1 * KiB) == [(1 * KiB, 0)]
        # Trimmed data shows as a hole again.
        assert await trim(be, 64 * KiB, 64 * KiB) is None
        assert (await status(be, 0, 1 * MiB)) == [(1 * MiB, HOLE)]
        err = await status(be, 0, 4096, "qemu:dirty-bitmap:x")
        assert isinstance(err, NbdError) and err.errno == errno.EINVAL


@on_uvloop
async def test_block_status_scan_is_limited(tmp_path: Path) -> None:
    async with backend_for(tmp_path / "big.img", size=3 * STATUS_SCAN_LIMIT) as be:
        await write(be, STATUS_SCAN_LIMIT // 2, pattern(4096))
        extents = await status(be, 0, 3 * STATUS_SCAN_LIMIT)
        assert isinstance(extents, list)
        assert sum(n for n, _ in extents) == STATUS_SCAN_LIMIT
        assert extents[1] == (4096, 0)


# -- errors and close ------------------------------------------------------------------------


@on_uvloop
async def test_errors_are_reported_not_raised(tmp_path: Path) -> None:
    async with backend_for(tmp_path / "f.img") as be:
        await write(be, 0, pattern(8192))
        fd = be.device.fd
        os.close(fd)  # every operation on the descriptor now fails with EBADF
        be.device.fd = be._fd = 10**6
        results = [
            await asyncio.wait_for(start_read(be, 0, 4096), 10),
            await asyncio.wait_for(start_write(be, 0, bytes(4096)), 10),
            await asyncio.wait_for(start_write(be, 5, b"abc"), 10),  # read-modify-write
            await flush(be),
            await zero(be, 0, 4096),
            await trim(be, 0, 4096),
            await status(be, 0, 4096),
        ]
        for r in results:
            assert isinstance(r, NbdError), results
            assert r.errno == errno.EBADF, r
        be.device.fd = -1  # already closed


@on_uvloop
async def test_read_only_backend(tmp_path: Path) -> None:
    path = tmp_path / "f.img"
    path.write_bytes(pattern(64 * KiB))
    async with backend_for(path, size=None, read_only=True) as be:
        assert be.read_only
        assert await read(be, 100, 1000) == pattern(64 * KiB)[100:1100]
        result = await asyncio.wait_for(start_write(be, 0, bytes(512)), 10)
        assert isinstance(result, NbdError) and result.errno == errno.EBADF
    assert path.read_bytes() == pattern(64 * KiB)


@on_uvloop
async def test_close_waits_for_unaligned_writes(tmp_path: Path) -> None:
    path = tmp_path / "f.img"
    eng = make_engine(asyncio.get_running_loop(), "aio")
    dev = open_device(path, create_size=1 * MiB)
    be = FileBackend(dev, eng, BufferPool())
    futs = [start_write(be, i * 1000 + 1, b"\x42" * 999) for i in range(100)]
    await be.close()  # must not cut the read-modify-writes short
    assert all(f.done() and f.result() is None for f in futs)
    assert dev.fd == -1
    eng.close()
    data = path.read_bytes()
    assert all(data[i * 1000 + 1:i * 1000 + 1000] == b"\x42" * 999 for i in range(100))


# -- on a block device -----------------------------------------------------------------------


@on_uvloop
async def test_on_a_block_device(loop_device: LoopFactory) -> None:
    dev_path = loop_device("16M", sector_size=4096)
    async with backend_for(dev_path, size=None) as be:
        assert be.alignment == 4096 and not be.can_fast_zero
        assert await status(be, 0, 1 * MiB) == [(1 * MiB, 0)]  # no allocation info: data
        err = await zero(be, 0, 4096, fast_only=True)
        assert isinstance(err, NbdError) and err.errno == errno.ENOTSUP
        await write(be, 4096 + 512, b"\x11" * 512)  # RMW of a 4 KiB sector
        assert await read(be, 4096, 8192) == bytes(512) + b"\x11" * 512 + bytes(7168)
        assert await zero(be, 4096, 8192, may_trim=False) is None
        assert await read(be, 4096, 8192) == bytes(8192)
        await write(be, 1 * MiB, pattern(64 * KiB))
        assert await trim(be, 1 * MiB, 64 * KiB) is None
        assert await read(be, 1 * MiB, 64 * KiB) == bytes(64 * KiB)  # loop: discard zeroes
